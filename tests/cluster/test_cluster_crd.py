"""The CRD on the real API server: examples accepted, mistakes refused with the field named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness import Kubectl

REPO = Path(__file__).resolve().parents[2]
VALID = sorted((REPO / "examples").glob("*.yaml"))
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))


def expected_field(path: Path) -> str:
    """The field the API server must name, from the file's "error names: ..." header line."""
    match = re.search(r"^#.*error names:\s*(\S+)", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} lacks an 'error names: spec...' header"
    return match.group(1)


@pytest.fixture(scope="module", autouse=True)
def namespaces(kubectl: Kubectl, crd_installed: None) -> None:
    kubectl.run("apply", "-f", str(REPO / "examples" / "00-namespaces.yaml"))


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_server_accepts_example(kubectl: Kubectl, path: Path) -> None:
    kubectl.run("apply", "--dry-run=server", "-f", str(path))


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_server_refuses_invalid_example_naming_the_field(kubectl: Kubectl, path: Path) -> None:
    result = kubectl.run("apply", "--dry-run=server", "-f", str(path), check=False)
    assert result.returncode != 0, f"{path.name} was accepted"
    field = expected_field(path)
    assert field in result.stderr, f"error does not name {field}: {result.stderr}"


def test_get_shows_printer_columns(kubectl: Kubectl) -> None:
    kubectl.run("apply", "-f", str(REPO / "examples" / "sales-customer-churn.yaml"))
    try:
        out = kubectl.run("get", "dp", "-A").stdout
        header = out.splitlines()[0].split()
        assert header == ["NAMESPACE", "NAME", "DOMAIN", "PHASE", "RECORDS", "AGE"]
        assert re.search(r"^sales\s+customer-churn\s+sales\s", out, re.MULTILINE), out
        wide = kubectl.run("get", "dataproducts", "-n", "sales", "-o", "wide").stdout.splitlines()[0].split()
        assert "READY" in wide and "COLLECTION" in wide
        assert "customer-churn" in kubectl.run("get", "datamesh", "-n", "sales").stdout  # category
    finally:
        kubectl.run("delete", "-f", str(REPO / "examples" / "sales-customer-churn.yaml"), "--wait=false", check=False)


def test_explain_shows_field_descriptions(kubectl: Kubectl) -> None:
    out = " ".join(kubectl.run("explain", "dataproduct.spec.semanticSearch").stdout.split())
    assert "Semantic search over the key fields." in out
    assert "keyFields <[]string> Schema fields whose text is embedded; each must be declared in schema.fields." in out
    assert "embeddingModel <string>" in out and "builtin:ngram-<dim>" in out
