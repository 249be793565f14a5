"""Local mode is the API server's twin on bad input, and docs/bad-input.md says so from their answers.

Every file under examples/invalid/ goes to the real API server (``kubectl apply --dry-run=server``)
and through local mode's checks (``datamesh.local.load_files``, what ``datamesh local`` runs):
both must refuse it, naming what the file's second line says they name. The one exception a
file may declare is ``kubectl accepts it``: then local mode refuses on its own, for a reason
the file gives. The answers side by side are docs/bad-input.md; this test fails when the
committed file differs from what it would write (``DATAMESH_WRITE_DOCS=1`` rewrites it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import kopf
import pytest
import yaml

from datamesh.controller.handlers import kopf_settings
from datamesh.local import load_files
from datamesh.resource.models import INLINE_MAX_COLUMNS, INLINE_MAX_ROWS, INLINE_MAX_VALUE_LENGTH
from datamesh.settings import OperatorSettings
from tests.harness import Kubectl
from tests.unit.test_local_manifests import ANNOTATIONS_LIMIT, biggest_inline_spec

REPO = Path(__file__).resolve().parents[2]
INVALID = REPO / "examples" / "invalid"
FILES = sorted(p.relative_to(REPO) for p in INVALID.rglob("*.yaml"))
DOC = REPO / "docs" / "bad-input.md"
WRITE = "DATAMESH_WRITE_DOCS"
REGENERATE = f"{WRITE}=1 .venv/bin/pytest tests/cluster/test_bad_input.py"
CELL_MAX = 420
# Lines kubectl adds that are not about the mistake.
_NOISE = re.compile(r"^(\* )?<nil>: Invalid value: null: some validation rules were not checked.*$|^ensure CRDs.*$")


@dataclass(frozen=True)
class Case:
    path: Path  # relative to the repository, as the docs show it
    what: str  # the file's first line: what is wrong
    named: str  # what both answers (or local mode's, when kubectl accepts the file) must name
    kubectl_accepts: bool

    @classmethod
    def of(cls, path: Path) -> Case:
        first, second = (REPO / path).read_bytes().decode("utf-8", "replace").splitlines()[:2]
        what = first.removeprefix("# INVALID:").strip()
        match = re.search(r"(?:error names|naming): (.+)$", second)
        assert first.startswith("# INVALID:") and match, f"{path}: needs '# INVALID: ...' and '... error names: X'"
        return cls(path, what, match.group(1).strip(), "kubectl accepts it" in second)


@dataclass(frozen=True)
class Answers:
    kubectl_status: int
    kubectl: str
    local: str


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _NOISE.match(line.strip())]
    if sum(line.startswith("* ") for line in lines) == 1:  # one error left of a bulleted list
        lines = [line.removeprefix("* ") for line in lines]
    return " ".join(" ".join(lines).split())


def ask_kubectl(kubectl: Kubectl, path: Path) -> tuple[int, str]:
    """kubectl's answer to a server-side dry run, run from the repository so it names the file as the docs do."""
    result = subprocess.run(
        [str(kubectl.binary), "--kubeconfig", str(kubectl.kubeconfig), "apply", "--dry-run=server", "-f", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, _one_line(result.stderr if result.returncode else result.stdout)


def ask_local(path: Path) -> str:
    """What `datamesh local` prints about the file: its refusal lines (empty when it would use it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # so it names the file as the docs do
        loaded = load_files([path])
    return " ".join(err.line() for err in loaded.errors)


@pytest.fixture(scope="module")
def answers(kubectl: Kubectl, crd_installed: None) -> dict[Path, Answers]:
    kubectl.run("apply", "-f", str(REPO / "examples" / "00-namespaces.yaml"))
    out = {}
    for path in FILES:
        status, said = ask_kubectl(kubectl, path)
        out[path] = Answers(status, said, ask_local(path))
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to("examples/invalid")))
def test_local_mode_refuses_what_the_api_server_refuses_naming_the_same_cause(
    answers: dict[Path, Answers], path: Path
) -> None:
    case, said = Case.of(path), answers[path]
    assert said.local.startswith(f"refused {path} "), f"local mode did not refuse {path}: {said.local!r}"
    assert case.named in said.local, f"local mode does not name {case.named!r}: {said.local}"
    if case.kubectl_accepts:
        assert said.kubectl_status == 0, f"{path} says kubectl accepts it, but: {said.kubectl}"
    else:
        assert said.kubectl_status != 0, f"the API server accepted {path}: {said.kubectl}"
        assert case.named in said.kubectl, f"kubectl does not name {case.named!r}: {said.kubectl}"


def _cell(text: str) -> str:
    text = text if len(text) <= CELL_MAX else text[: CELL_MAX - 1].rstrip() + "…"
    return text.replace("|", "\\|")


def render(answers: dict[Path, Answers]) -> str:
    rows = []
    for path in FILES:
        case, said = Case.of(path), answers[path]
        kubectl = f"accepted: {said.kubectl}" if said.kubectl_status == 0 else said.kubectl
        local = said.local.removeprefix(f"refused {path} ")
        rows.append(
            f"| [`{path.relative_to('examples/invalid')}`](../{path}) | {_cell(case.what)} | `{case.named}` "
            f"| {_cell(kubectl)} | {_cell(local)} |"
        )
    return f"""# Bad input: what kubectl says, what local mode says

<!-- Generated by tests/cluster/test_bad_input.py from examples/invalid/; do not edit.
     Regenerate: {REGENERATE} -->

`datamesh local` checks manifests with the same rules as the API server (the CRD is generated
from the same models, and `datamesh.resource.manifest` checks apiVersion, kind, metadata and
the file itself), so a file local mode takes is one `kubectl apply` takes, and a mistake is
refused by both, naming the same field. Each row is a file of `examples/invalid/` with one
mistake, what `kubectl apply --dry-run=server -f FILE` answered (Kubernetes v1.34) and what
`datamesh local` prints for it; *named* is what both answers name. A refused file never stops
the other products: local mode reconciles them and exits 1.

Local mode is stricter in one place, on purpose: kubectl takes a file that is not UTF-8 and
silently turns each invalid byte into U+FFFD, changing the data; local mode refuses the file.

Inline rows are bounded because they live in the object: `kubectl apply` keeps a copy of the
object in an annotation, and all annotations of an object together may hold 262,144 bytes
(the operator keeps only digests of the spec there). The bounds are ones the API server
enforces itself: at most {INLINE_MAX_ROWS} rows (`maxItems`), {INLINE_MAX_COLUMNS} columns a row (`maxProperties`) and
{INLINE_MAX_VALUE_LENGTH} characters a value (`maxLength`; nested lists and objects are refused). The largest spec
they allow is about 40% of the annotations' room in ASCII; in 4-byte characters it is more than
the room, and only `kubectl apply --server-side` (which keeps no copy) stores it. The API
server's message for too many rows names `spec.source.inline` but cannot say where larger data
goes (it cannot look into untyped rows): a ConfigMap (`source.configMapRef`) or a file served
over http(s) (`source.url`), as `kubectl explain dataproducts.spec.source.inline` says.

| file | what is wrong | named | `kubectl apply --dry-run=server` | `datamesh local` |
|---|---|---|---|---|
{chr(10).join(rows)}
"""


def test_docs_bad_input_is_current(answers: dict[Path, Answers]) -> None:
    text = render(answers)
    if os.environ.get(WRITE) == "1":
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, (
        f"{DOC.relative_to(REPO)} is stale (examples/invalid/ or an answer changed): run `{REGENERATE}` and commit it"
    )


def test_the_biggest_inline_spec_the_crd_accepts_is_stored_with_both_annotation_copies(
    kubectl: Kubectl, crd_installed: None
) -> None:
    """kubectl apply's last-applied copy and the operator's last-handled copy of it fit together."""
    body = {
        "apiVersion": "datamesh.io/v1alpha1",
        "kind": "DataProduct",
        "metadata": {"name": "biggest-inline", "namespace": "default"},
        "spec": biggest_inline_spec(),
    }
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump(body))  # client-side: keeps last-applied-configuration
    try:
        stored = kubectl.json("get", "dataproduct", "biggest-inline", "-n", "default")
        storage = kopf_settings(OperatorSettings()).persistence.diffbase_storage
        kbody = kopf.Body(stored)
        patch = kopf.Patch()
        storage.store(body=kbody, patch=patch, essence=storage.build(body=kbody))
        kubectl.run("patch", "dataproduct", "biggest-inline", "-n", "default", "--type=merge", "-p", json.dumps(patch))
        annotations = kubectl.json("get", "dataproduct", "biggest-inline", "-n", "default")["metadata"]["annotations"]
        assert "datamesh.io/last-handled-configuration" in annotations
        assert "kubectl.kubernetes.io/last-applied-configuration" in annotations
        used = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
        assert used < 0.85 * ANNOTATIONS_LIMIT, used
    finally:
        kubectl.run("delete", "dataproduct", "biggest-inline", "-n", "default", "--wait=false", check=False)
