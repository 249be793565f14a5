"""`datamesh contract`: every example becomes an ODCS v3 contract that datacontract-cli accepts and that
imports back to the same product; bad contracts get one clear error naming the file; docs/contracts.md
shows the commands' real output."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from datacontract.data_contract import DataContract
from typer.testing import CliRunner

from datamesh import cli
from datamesh.resource.manifest import Verdict, check_document, read_documents
from datamesh.resource.models import (
    KIND,
    Access,
    DataProductSpec,
    DeletionPolicy,
    Source,
    SourceFormat,
    UrlSource,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(
    p
    for p in [*REPO.glob("examples/*.yaml"), *REPO.glob("examples/inference/*.yaml")]
    if p.name != "00-namespaces.yaml"
)
CHURN = REPO / "examples" / "sales-customer-churn.yaml"
DOC = REPO / "docs" / "contracts.md"
WRITE = "DATAMESH_WRITE_DOCS"
REGENERATE = f"{WRITE}=1 .venv/bin/pytest tests/unit/test_contracts.py -k docs"


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


def datamesh(*args: str, stdin: str | None = None) -> Result:
    """The `datamesh` command, run by typer in this process; a crash is raised, not returned."""
    result = CliRunner().invoke(cli.app, list(args), input=stdin, env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


def product_of(path: Path) -> tuple[dict[str, Any], DataProductSpec]:
    """The DataProduct object in a manifest file and its spec."""
    (doc,) = [d for d in read_documents(path) if isinstance(d, dict) and d.get("kind") == KIND]
    checked = check_document(doc)
    assert checked.spec is not None, checked.message
    return doc, checked.spec


def lint(path: Path) -> list[str]:
    """What `datacontract lint` finds wrong with a contract file (warnings included)."""
    run = DataContract(data_contract_file=str(path)).lint()
    return [f"{c.result.value}: {c.name}: {c.reason}" for c in run.checks if c.result.value != "passed"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_an_example_exports_a_contract_datacontract_lint_accepts_and_imports_back(
    example: Path, tmp_path: Path
) -> None:
    doc, spec = product_of(example)
    contract = tmp_path / f"{example.stem}.odcs.yaml"
    exported = datamesh("contract", "export", str(example), "-o", str(contract))
    assert exported.exit_code == 0, exported.stderr
    assert lint(contract) == []

    # What a contract cannot say comes from the options: where the rows are and what is embedded.
    url = f"https://data.example.com/{example.stem}.csv"
    assert spec.semantic_search is not None
    options = ["--namespace", doc["metadata"]["namespace"], "--source-url", url]
    options += [arg for key in spec.semantic_search.key_fields for arg in ("--key-fields", key)]
    options += ["--embedding-model", spec.semantic_search.embedding_model]
    imported = datamesh("contract", "import", str(contract), *options)
    assert imported.exit_code == 0, imported.stderr
    assert imported.stderr == ""  # nothing of an exported contract is left out
    manifest = yaml.safe_load(imported.stdout)
    checked = check_document(manifest)  # the check local mode applies to a manifest file
    assert checked.verdict is Verdict.product, checked.message
    assert (checked.namespace, checked.name) == (doc["metadata"]["namespace"], doc["metadata"]["name"])

    # Everything a contract carries comes back; the rest is the options' or the defaults.
    assert spec.source is not None
    source = Source(url=UrlSource(url=url, format=SourceFormat.csv), refresh_interval=spec.source.refresh_interval)
    expected = spec.model_copy(
        update={"source": source, "inference": None, "access": Access(), "deletion_policy": DeletionPolicy.delete}
    )
    assert checked.spec == expected

    # And the imported product's contract is the same contract.
    again = tmp_path / "again.yaml"
    again.write_text(imported.stdout)
    assert datamesh("contract", "export", str(again)).stdout == contract.read_text()


def test_export_reads_kubectl_get_json_from_stdin_status_and_server_fields_included() -> None:
    doc, _ = product_of(CHURN)
    live = {
        **doc,
        "metadata": {
            **doc["metadata"],
            "uid": "0b6f1c3e-1111-2222-3333-444455556666",
            "resourceVersion": "4711",
            "generation": 3,
            "creationTimestamp": "2026-10-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update"}],
            "annotations": {"datamesh.io/contract-version": "2.1.0"},
        },
        "status": {"phase": "Ready", "records": 25, "conditions": []},
    }
    listed = json.dumps({"apiVersion": "v1", "kind": "List", "items": [live]})
    result = datamesh("contract", "export", "-", stdin=listed)
    assert result.exit_code == 0, result.stderr
    contract = yaml.safe_load(result.stdout)
    assert (contract["id"], contract["version"], contract["status"]) == ("sales.customer-churn", "2.1.0", "active")
    overridden = datamesh("contract", "export", "-", "--contract-version", "3.0.0", "--status", "draft", stdin=listed)
    assert yaml.safe_load(overridden.stdout)["version"] == "3.0.0"
    assert yaml.safe_load(overridden.stdout)["status"] == "draft"


def test_export_picks_one_product_of_several() -> None:
    many = "\n---\n".join(p.read_text() for p in EXAMPLES)
    result = datamesh("contract", "export", "-", stdin=many)
    assert result.exit_code == 1
    assert "error: stdin: it holds 8 DataProducts" in result.stderr and "--product" in result.stderr
    picked = datamesh("contract", "export", "-", "--product", "support/ticket-summaries", stdin=many)
    assert picked.exit_code == 0, picked.stderr
    assert yaml.safe_load(picked.stdout)["id"] == "support.ticket-summaries"


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("examples/00-namespaces.yaml", "no DataProduct (datamesh.io/v1alpha1) in it"),
        ("examples/invalid/missing-domain.yaml", "is refused as `kubectl apply` would refuse it: spec.domain"),
        ("examples/invalid/manifest/not-yaml.yaml", "not valid YAML: line"),
        ("examples/invalid/manifest/kind-wrong-case.yaml", "did you mean DataProduct? (kinds are case-sensitive)"),
        ("examples/invalid/manifest/kind-missing.yaml", "its document is refused as `kubectl apply` would refuse it"),
        ("examples/no-such-file.yaml", "No such file or directory"),
    ],
)
def test_export_of_a_file_without_a_usable_product_says_why(path: str, problem: str) -> None:
    with contextlib.chdir(REPO):
        result = datamesh("contract", "export", path)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {path}: ") and problem in result.stderr, result.stderr
    assert result.stdout == ""


def exported_churn() -> dict[str, Any]:
    return yaml.safe_load(datamesh("contract", "export", str(CHURN)).stdout)  # type: ignore[no-any-return]


def _typo(c: dict[str, Any]) -> None:
    c["schema"][0]["properties"][0]["primarykey"] = c["schema"][0]["properties"][0].pop("primaryKey")


def _array(c: dict[str, Any]) -> None:
    array = {"name": "contacts", "logicalType": "array", "items": {"logicalType": "string"}}
    c["schema"][0]["properties"].append(array)


def _no_key(c: dict[str, Any]) -> None:
    del c["schema"][0]["properties"][0]["primaryKey"]


def _bad_unit(c: dict[str, Any]) -> None:
    c["slaProperties"][0]["unit"] = "parsecs"


BAD_CONTRACTS = {
    "typo-in-a-property": (
        _typo,
        "not a valid ODCS v3 contract: schema[0].properties[0] (customer_id): unknown field 'primarykey'",
    ),
    "version-not-a-string": (
        lambda c: c.update(version=1.0),
        "not a valid ODCS v3 contract: version: 1.0 is not of type 'string'",
    ),
    "v2-contract": (lambda c: c.update(apiVersion="v2.2.2"), "apiVersion v2.2.2 is ODCS v2: only v3 contracts"),
    "nested-array": (_array, "property contacts is of type array: DataProduct columns hold single values"),
    "no-primary-key": (
        _no_key,
        "the DataProduct it gives would be refused: spec.schema.fields: a product with a source needs a primaryKey",
    ),
    "sla-unit": (_bad_unit, "slaProperties[0] (latency): unit 'parsecs' is not a unit of time"),
    "empty-schema": (lambda c: c.update(schema=[]), "its schema is empty"),
}


@pytest.mark.parametrize("case", BAD_CONTRACTS)
def test_a_bad_contract_gets_one_clear_error_naming_the_file(case: str, tmp_path: Path) -> None:
    change, problem = BAD_CONTRACTS[case]
    contract = exported_churn()
    change(contract)
    path = tmp_path / f"{case}.odcs.yaml"
    path.write_text(yaml.safe_dump(contract, sort_keys=False))
    result = datamesh("contract", "import", str(path), "--source-url", "https://data.example.com/churn.csv")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {path}: ") and result.stderr.count("\n") == 1  # the file, the problem
    assert problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"apiVersion: v3.1.0\nkind: [DataContract\n", "not valid YAML: line 3, column 1"),
        (b"kind: DataContract\xff\n", "not UTF-8 text: byte 0xff at line 1"),
        (b"- a\n- b\n", "a contract is one YAML document holding a map"),
        (b"kind: DataContract\n", "'apiVersion' is a required property"),
    ],
)
def test_a_file_that_is_no_contract_at_all_says_so(content: bytes, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "contract.yaml"
    path.write_bytes(content)
    result = datamesh("contract", "import", str(path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {path}: ") and problem in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (["--source-url", "https://x.example.com/rows"], "cannot tell the format of https://x.example.com/rows"),
        (["--source-url", "https://x.example.com/a.csv", "--configmap", "rows"], "give one source"),
        (["--configmap", "rows"], "--configmap needs --configmap-key"),
        (["--embedding-model", "builtin:ngram-64"], "--embedding-model needs --key-fields"),
        (["--object", "orders"], "--object orders: the contract's schema has customer-churn"),
    ],
)
def test_options_that_leave_something_undecided_are_usage_errors(
    options: list[str], problem: str, tmp_path: Path
) -> None:
    path = tmp_path / "churn.odcs.yaml"
    path.write_text(yaml.safe_dump(exported_churn()))
    result = datamesh("contract", "import", str(path), *options)
    assert result.exit_code == 2
    assert problem in " ".join(result.stderr.replace("│", " ").split()), result.stderr


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (
            ["--key-fields", "reason"],
            "spec.semanticSearch.keyFields: must name fields declared in schema.fields (unknown: reason) "
            "(set by: --key-fields, --embedding-model)",
        ),
        (["--namespace", "Sales"], 'metadata.namespace: Invalid value: "Sales"'),
        (["--source-url", "ftp://x.example.com/a.csv"], "spec.source.url.url: String should match pattern"),
    ],
)
def test_an_option_the_product_refuses_is_named_in_the_error(options: list[str], problem: str, tmp_path: Path) -> None:
    path = tmp_path / "churn.odcs.yaml"
    path.write_text(yaml.safe_dump(exported_churn()))
    result = datamesh("contract", "import", str(path), *options)
    assert result.exit_code == 1
    assert f"error: {path}: the DataProduct it gives would be refused: " in result.stderr
    assert problem in result.stderr and "(set by: --" in result.stderr, result.stderr


FOREIGN = """\
apiVersion: v3.0.2
kind: DataContract
id: 53581432-6c55-4ba2-a65f-72344a91553a
name: Seller Payments_v1
version: 1.1.0
status: draft
domain: seller
description:
  purpose: Views built on top of the seller tables, one row per payment.
tags: [finance]
schema:
  - name: payments
    physicalType: table
    quality:
      - {metric: rowCount, mustBeGreaterThan: 0}
    properties:
      - {name: txn_ref_dt, physicalType: date}
      - {name: rcvr_id, logicalType: string, physicalType: varchar(18), primaryKey: true, primaryKeyPosition: 1}
      - {name: amount, physicalType: "DECIMAL(12,2)", required: true}
      - {name: units, physicalType: BIGINT}
      - {name: settled, logicalType: boolean}
      - {name: payer_email, logicalType: string, classification: confidential}
      - {name: payer_phone, logicalType: string, customProperties: [{property: pii, value: "True"}]}
      - {name: cutoff, logicalType: time}
team:
  - {username: ceastwood@example.com, role: Data Scientist}
  - {username: mhopper@example.com, role: Owner}
slaProperties:
  - {property: latency, value: 4, unit: d}
  - {property: frequency, value: PT30M}
  - {property: retention, value: 3, unit: y}
  - {property: av, value: 99.5}
"""


def test_a_contract_from_elsewhere_imports_with_notes_on_what_it_leaves_out(tmp_path: Path) -> None:
    path = tmp_path / "payments.odcs.yaml"
    path.write_text(FOREIGN)
    result = datamesh("contract", "import", str(path), "--configmap", "payments", "--configmap-key", "rows.jsonl")
    assert result.exit_code == 0, result.stderr
    manifest = yaml.safe_load(result.stdout)
    assert manifest["metadata"] == {
        "name": "seller-payments-v1",
        "namespace": "seller",
        "annotations": {
            "datamesh.io/contract-id": "53581432-6c55-4ba2-a65f-72344a91553a",
            "datamesh.io/contract-version": "1.1.0",
            "datamesh.io/contract-status": "draft",
        },
    }
    spec = DataProductSpec.model_validate(manifest["spec"])
    types = {f.name: f.type for f in spec.data_schema.fields}
    assert types == {
        "txn_ref_dt": "date",
        "rcvr_id": "string",
        "amount": "number",
        "units": "integer",
        "settled": "boolean",
        "payer_email": "string",
        "payer_phone": "string",
        "cutoff": "string",
    }
    assert spec.primary_key == ["rcvr_id"]
    assert [f.name for f in spec.data_schema.fields if f.pii] == ["payer_email", "payer_phone"]
    assert [f.name for f in spec.data_schema.fields if f.required] == ["amount"]
    assert spec.sla is not None and (spec.sla.freshness, spec.sla.availability) == ("96h", "99.5")
    assert spec.source is not None and spec.source.config_map_ref is not None
    assert (spec.source.config_map_ref.format, spec.source.refresh_interval) == ("jsonl", "30m")
    # The old list-of-members team has no name: the owner's address alone cannot make an owner.
    assert spec.owner is None
    notes = result.stderr.splitlines()
    assert all(n.startswith(f"note: {path}: ") for n in notes)
    assert any("property cutoff is a time of day: kept as a string" in n for n in notes)
    assert any("slaProperties[2] (retention) has no DataProduct counterpart" in n for n in notes)
    assert any("1 data quality rule(s) left out" in n for n in notes)
    assert any("owner (email mhopper@example.com) left out" in n for n in notes)


# ==== docs/contracts.md: its output blocks are the commands' output =============================

# A block of `datamesh contract` commands, then the output of the last: yaml is stdout, text is stderr.
_EXAMPLE = re.compile(r"```sh\n((?:datamesh contract [^\n]*\n)+)```\n\n```(yaml|text)\n(.*?)```", re.DOTALL)


def render_doc(text: str, workdir: Path) -> str:
    """The doc with each output block replaced by what its commands print now (run in ``workdir``)."""

    def run(match: re.Match[str]) -> str:
        commands, kind = match.group(1), match.group(2)
        for line in commands.splitlines():
            result = datamesh(*shlex.split(line)[1:])
        out = result.stdout if kind == "yaml" else result.stderr
        return f"```sh\n{commands}```\n\n```{kind}\n{out}```"

    (workdir / "examples").symlink_to(REPO / "examples")
    with contextlib.chdir(workdir):
        return _EXAMPLE.sub(run, text)


def test_docs_contracts_shows_the_commands_real_output(tmp_path: Path) -> None:
    text = DOC.read_text()
    assert len(_EXAMPLE.findall(text)) >= 3, "docs/contracts.md lost its examples"
    rendered = render_doc(text, tmp_path)
    if os.environ.get(WRITE) == "1":
        DOC.write_text(rendered)
    assert rendered == text, f"{DOC.relative_to(REPO)} is stale: run `{REGENERATE}` and commit it"
