"""The CRD is generated from the pydantic models, and both agree on the examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from datamesh.resource.crd import CRD_FILE, render_crd
from datamesh.resource.models import DataProductSpec

REPO = Path(__file__).resolve().parents[2]
VALID = sorted(p for p in (REPO / "examples").glob("*.yaml") if "namespace" not in p.name)
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))


def _products(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "DataProduct"]


def _check(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "datamesh", "crd", "--check", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_committed_crd_is_current() -> None:
    result = _check(REPO / "crds")
    assert result.returncode == 0, result.stderr


def test_stale_crd_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / CRD_FILE).write_text(render_crd().replace("maxItems: 200", "maxItems: 201"))
    result = _check(tmp_path)
    assert result.returncode == 1
    assert "stale" in result.stderr


def test_examples_cover_the_issue() -> None:
    domains = {_products(p)[0]["spec"]["domain"] for p in VALID}
    assert len(VALID) >= 6 and len(domains) >= 3
    assert len(INVALID) >= 8
    for path in VALID:
        product = _products(path)[0]
        assert len(product["spec"]["source"]["inline"]) >= 20, path.name


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_examples_pass_the_models(path: Path) -> None:
    for product in _products(path):
        DataProductSpec.model_validate(product["spec"])


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_examples_fail_the_models(path: Path) -> None:
    for product in _products(path):
        with pytest.raises(ValidationError):
            DataProductSpec.model_validate(product["spec"])
