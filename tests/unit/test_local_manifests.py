"""Local mode checks a manifest as kubectl and the API server do (datamesh.resource.manifest)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from datamesh.resource.manifest import (
    ManifestFileError,
    Verdict,
    check_document,
    check_file,
    parse_documents,
)
from datamesh.resource.models import (
    INLINE_MAX_COLUMNS,
    INLINE_MAX_ROWS,
    INLINE_MAX_VALUE_LENGTH,
    DataProductSpec,
)

REPO = Path(__file__).resolve().parents[2]
INVALID = sorted((REPO / "examples" / "invalid").rglob("*.yaml"))
VALID = sorted([*(REPO / "examples").glob("*.yaml"), *(REPO / "examples" / "inference").glob("*.yaml")])
ANNOTATIONS_LIMIT = 262_144  # bytes, all annotations of one object together (apimachinery)


def product(**changes: Any) -> dict[str, Any]:
    """A valid DataProduct document; ``changes`` replace top-level keys (None removes one)."""
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / "sales-customer-churn.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def refusal(doc: Any) -> str:
    checked = check_document(doc)
    assert checked.verdict is Verdict.refused, f"accepted: {doc}"
    return checked.message


def header_token(path: Path) -> str:
    """What the refusal must name: the file's "error names: ..." or "naming: ..." header."""
    head = path.read_bytes().split(b"\n", 2)[1].decode("ascii")
    match = re.search(r"(?:error names|naming): (.+)$", head)
    assert match, f"{path.name}: second line must say what the error names"
    return match.group(1).strip()


def test_a_valid_product_passes_with_its_spec_parsed() -> None:
    checked = check_document(product())
    assert checked.verdict is Verdict.product and checked.key == "sales/customer-churn"
    assert checked.spec is not None and checked.spec.domain == "sales"


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_examples_pass(path: Path) -> None:
    checked = check_file(path)
    assert checked.error is None
    assert all(d.verdict is not Verdict.refused for d in checked.documents), [d.message for d in checked.documents]


@pytest.mark.parametrize("path", INVALID, ids=lambda p: str(p.relative_to(REPO / "examples" / "invalid")))
def test_every_invalid_example_is_refused_naming_what_the_api_server_names(path: Path) -> None:
    checked = check_file(path)
    messages = [checked.error] if checked.error else [d.message for d in checked.documents if d.message]
    assert messages, f"{path.name} was accepted"
    assert header_token(path) in " ".join(messages)


def test_wrong_api_version_is_refused_with_the_served_one() -> None:
    message = refusal(product(apiVersion="datamesh.io/v1"))
    assert 'no matches for kind "DataProduct" in version "datamesh.io/v1"' in message
    assert "datamesh.io/v1alpha1" in message


@pytest.mark.parametrize("kind", ["Dataproduct", "dataproduct", "DataProducts", "DataProdcut"])
def test_kind_typos_are_refused_with_a_hint(kind: str) -> None:
    message = refusal(product(kind=kind))
    assert f'no matches for kind "{kind}"' in message and "did you mean DataProduct?" in message


def test_other_objects_are_skipped_not_refused() -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "sales"}}
    assert check_document(namespace).verdict is Verdict.other
    assert check_document({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}).verdict is Verdict.other


def test_an_object_of_our_group_with_another_kind_is_refused() -> None:
    assert "no matches for kind" in refusal(product(kind="DataSet"))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("My_Recipes!", "RFC 1123 subdomain"),
        ("-starts-with-dash", "RFC 1123 subdomain"),
        ("a" * 254, "no more than 253 characters"),
    ],
)
def test_names_follow_the_api_server_rules(name: str, why: str) -> None:
    message = refusal(product(metadata={"name": name, "namespace": "sales"}))
    assert message.startswith("metadata.name: Invalid value:") and why in message


@pytest.mark.parametrize("name", ["churn", "churn.v2", "a" * 253, "0-1"])
def test_names_the_api_server_accepts_pass(name: str) -> None:
    assert check_document(product(metadata={"name": name, "namespace": "sales"})).verdict is Verdict.product


def test_missing_name_and_invalid_namespace() -> None:
    assert "metadata.name: Required value" in refusal(product(metadata={"namespace": "sales"}))
    message = refusal(product(metadata={"name": "churn", "namespace": "Sales"}))
    assert message.startswith('metadata.namespace: Invalid value: "Sales"') and "RFC 1123 label" in message
    assert check_document(product(metadata={"name": "churn", "namespace": ""})).key == "default/churn"
    assert check_document(product(metadata={"name": "churn"})).key == "default/churn"


def test_labels_annotations_and_unknown_fields() -> None:
    meta = {"name": "churn", "namespace": "sales"}
    assert "metadata.labels" in refusal(product(metadata={**meta, "labels": {"team": "sales analytics"}}))
    assert "metadata.labels" in refusal(product(metadata={**meta, "labels": {"bad key!": "x"}}))
    fine = {"app.kubernetes.io/part-of": "mesh", "team": "sales", "empty": ""}
    assert check_document(product(metadata={**meta, "labels": fine})).verdict is Verdict.product
    huge = {"note": "x" * ANNOTATIONS_LIMIT}
    assert "metadata.annotations: Too long" in refusal(product(metadata={**meta, "annotations": huge}))
    assert 'unknown field "metadata.lables"' in refusal(product(metadata={**meta, "lables": {}}))
    assert 'unknown field "Spec"' in refusal({**product(), "Spec": {}})


def test_missing_spec_kind_and_api_version() -> None:
    assert refusal(product(spec=None)) == "spec: Required value"
    assert "kind not set" in refusal(product(kind=None))
    assert "apiVersion not set" in refusal(product(apiVersion=None))
    assert "not a Kubernetes object" in refusal(["a", "list"])


def test_timestamps_and_dates_stay_text_as_kubectl_leaves_them() -> None:
    docs = parse_documents("a: 2026-12-01\nb: 2026-12-01T10:00:00Z\nc: yes\nd: 1.5\n")
    assert docs == [{"a": "2026-12-01", "b": "2026-12-01T10:00:00Z", "c": True, "d": 1.5}]


def test_file_problems_say_where() -> None:
    with pytest.raises(ManifestFileError, match=r"not valid YAML: line 2, column \d+"):
        parse_documents("kind: DataProduct\n  bad: [indent\n")


def test_a_non_utf8_file_is_refused_with_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("a: 1\nnote: Client évalue\n".encode("latin-1"))
    checked = check_file(path)
    assert checked.error is not None and "not UTF-8 text: byte 0xe9 at line 2, column 14" in checked.error


# ---- the inline size limit ---------------------------------------------------------------------


def biggest_inline_spec() -> dict[str, Any]:
    """The largest inline spec the CRD accepts: every row full, 63-character column names, ASCII values."""
    spec: dict[str, Any] = copy.deepcopy(product()["spec"])
    columns = [f"c{i}_{'x' * 60}" for i in range(INLINE_MAX_COLUMNS)]
    spec["schema"] = {"fields": [{"name": c, "primaryKey": i == 0} for i, c in enumerate(columns)]}
    spec["semanticSearch"] = {"enabled": True, "keyFields": [columns[1]]}
    spec["source"] = {
        "inline": [
            dict.fromkeys(columns, f"{r:04d}" + "v" * (INLINE_MAX_VALUE_LENGTH - 4)) for r in range(INLINE_MAX_ROWS)
        ]
    }
    return spec


def test_the_biggest_accepted_inline_spec_leaves_room_for_two_copies_in_the_annotations() -> None:
    spec = biggest_inline_spec()
    DataProductSpec.model_validate(spec)
    size = len(json.dumps(spec, separators=(",", ":")))  # kopf's last-handled-configuration encoding
    # kubectl apply keeps one copy of the object, kopf another: both must fit, with room for the rest.
    assert 2 * size < 0.85 * ANNOTATIONS_LIMIT, size


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda rows: rows.append(dict(rows[0])), "spec.source.inline: Too many: 41: must have at most 40 items"),
        (lambda rows: rows[3].update(extra="x"), "spec.source.inline[3]: Too many: 9: must have at most 8 items"),
        (lambda rows: rows[5].update({next(iter(rows[5])): "y" * 257}), "spec.source.inline[5]"),
        (lambda rows: rows[0].update({next(iter(rows[0])): ["a"]}), "not a nested list or object"),
    ],
)
def test_one_step_past_the_limit_is_refused_naming_inline_and_the_way_out(change: Any, named: str) -> None:
    spec = biggest_inline_spec()
    change(spec["source"]["inline"])
    message = refusal(product(spec=spec))
    assert named in message
    assert "spec.source.configMapRef" in message and "spec.source.url" in message


def test_values_the_api_server_takes_as_they_are_pass() -> None:
    spec = copy.deepcopy(product()["spec"])
    first_two = dict(list(spec["source"]["inline"][0].items())[:2])
    spec["source"]["inline"][0] = {**first_two, "n": 1, "f": 1.5, "b": True, "z": None, "e": [], "o": {}}
    assert check_document(product(spec=spec)).verdict is Verdict.product
    spec["source"]["inline"][0] = {1: "key as number", **spec["source"]["inline"][0]}
    assert "Too many: 9:" in refusal(product(spec=spec))  # the number key counts, as text
