"""`datamesh local` as a user meets it: refusals name their file, problems are found before any
work starts and name the option that fixes them, and the exit status tells whether all went well."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import httpx
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from datamesh import cli
from datamesh.adapters.edge import EdgeStore
from datamesh.local import StateLock
from datamesh.web.serving import free_port
from tests.harness import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
INVALID = EXAMPLES / "invalid"
DATAMESH = [sys.executable, "-m", "datamesh"]
ENV = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def local(folder: Path, *args: str, cwd: Path) -> Result:
    """`datamesh local` as typer runs it, in this process: the same command without an interpreter
    start per test (the tests about other processes holding a lock use :func:`local_process`)."""
    # The command's console was made at import, with whatever width this process had then.
    with contextlib.chdir(cwd), mock.patch.object(cli, "console", Console(width=250)):
        result = CliRunner().invoke(cli.app, ["local", str(folder), *args], env={"COLUMNS": "250", "NO_PROXY": "*"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


def local_process(folder: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DATAMESH, "local", str(folder), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def flat(result: Result | subprocess.CompletedProcess[str]) -> str:
    return " ".join((result.stdout + result.stderr).split())


def folder_with(tmp_path: Path, *files: Path) -> Path:
    folder = tmp_path / "manifests"
    folder.mkdir(exist_ok=True)
    for f in files:
        shutil.copy(f, folder)
    return folder


def nothing_reconciled(state: Path) -> bool:
    return not (state / "status.json").exists() and not (state / "catalog.json").exists()


def test_all_ready_exits_0(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, EXAMPLES / "00-namespaces.yaml", EXAMPLES / "sales-customer-churn.yaml")
    result = local(folder, "--no-serve", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 0, flat(result)
    out = flat(result)
    assert "sales/customer-churn" in out and "Ready" in out and "everyone" in out
    assert "skipped objects that mean nothing without a cluster: Namespace ×" in out


def test_a_kind_typo_is_refused_with_a_hint_and_exits_1(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path, EXAMPLES / "sales-customer-churn.yaml", INVALID / "manifest" / "kind-wrong-case.yaml"
    )
    result = local(folder, "--no-serve", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 1
    out = flat(result)
    assert "sales/customer-churn" in out and "Ready" in out
    assert "refused" in out and "kind-wrong-case.yaml" in out
    assert 'no matches for kind "Dataproduct"' in out and "did you mean DataProduct?" in out
    assert "1 manifest refused: exit status 1" in out


@pytest.mark.parametrize(
    ("file", "named"),
    [
        ("manifest/api-version-v1.yaml", 'in version "datamesh.io/v1": DataProduct is served at apiVersion'),
        ("manifest/name-not-dns-subdomain.yaml", 'metadata.name: Invalid value: "My_Recipes!"'),
        ("manifest/not-utf8.yaml", "not UTF-8 text: byte 0xe9 at line"),
        ("manifest/not-yaml.yaml", "not valid YAML: line"),
        ("inline-too-many-rows.yaml", "spec.source.inline: Too many: 41"),
    ],
)
def test_every_file_problem_names_the_file_and_the_rest_still_run(tmp_path: Path, file: str, named: str) -> None:
    folder = folder_with(tmp_path, EXAMPLES / "sales-customer-churn.yaml", INVALID / file)
    result = local(folder, "--no-serve", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 1, flat(result)
    out = flat(result)
    assert "Traceback" not in out
    assert f"refused {folder / Path(file).name}" in out and named in out
    assert "sales/customer-churn" in out and "Ready" in out


def test_a_busy_port_is_found_before_any_work_and_names_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        state = tmp_path / "state"
        result = local(EXAMPLES, "--port", str(port), "--state-dir", str(state), cwd=tmp_path)
    assert result.returncode == 2, flat(result)
    out = flat(result)
    assert f"port {port} on 127.0.0.1 is already in use" in out and "--port" in out and "--no-serve" in out
    assert "Traceback" not in out and "rows" not in out
    assert nothing_reconciled(state)


def test_a_state_folder_used_by_another_datamesh_local_is_found_before_any_work(tmp_path: Path) -> None:
    state = tmp_path / "state"
    other = StateLock(state)  # what a running `datamesh local` holds
    other.acquire()
    try:
        result = local_process(EXAMPLES, "--no-serve", "--state-dir", str(state), cwd=tmp_path, timeout=60)
    finally:
        other.release()
    assert result.returncode == 2, flat(result)
    out = flat(result)
    assert f"the state folder {state} is in use by another `datamesh local` (pid {os.getpid()})" in out
    assert "--state-dir" in out and "Traceback" not in out
    assert nothing_reconciled(state)
    again = local_process(
        folder_with(tmp_path, EXAMPLES / "sales-customer-churn.yaml"),
        "--no-serve",
        "--state-dir",
        str(state),
        cwd=tmp_path,
    )
    assert again.returncode == 0, "the lock goes with the process that held it"


async def test_a_store_held_by_another_process_is_found_before_any_work(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, EXAMPLES / "sales-customer-churn.yaml")
    state = tmp_path / "state"
    assert local_process(folder, "--no-serve", "--state-dir", str(state), cwd=tmp_path).returncode == 0
    status_before = (state / "status.json").read_text()
    store = EdgeStore(state / "store")  # another process (this one) opens the store, which locks its WAL
    try:
        assert len(await store.sample("sales.customer-churn", 100)) == 25
        result = local_process(folder, "--no-serve", "--state-dir", str(state), cwd=tmp_path, timeout=60)
    finally:
        await store.close()
    assert result.returncode == 2, flat(result)
    out = flat(result)
    assert "is in use by another process" in out and "--state-dir" in out and "Traceback" not in out
    assert (state / "status.json").read_text() == status_before, "nothing was reconciled"


def test_a_failed_product_exits_1(tmp_path: Path) -> None:
    doc = yaml.safe_load((EXAMPLES / "sales-customer-churn.yaml").read_text())
    doc["spec"]["semanticSearch"]["embeddingModel"] = "nosuch:model"
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "churn.yaml").write_text(yaml.safe_dump(doc))
    result = local(folder, "--no-serve", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 1, flat(result)
    out = flat(result)
    assert "Failed" in out and "1 product Failed: exit status 1" in out


def test_a_restricted_product_says_who_may_read_it_and_that_local_mode_cannot_ask_it(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, EXAMPLES / "finance-expense-exceptions.yaml", EXAMPLES / "sales-customer-churn.yaml")
    result = local(folder, "--no-serve", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 0, flat(result)
    out = flat(result)
    assert "restricted: group:finance, cfo@example.com" in out
    assert "finance/expense-exceptions is restricted to group:finance, cfo@example.com" in out
    assert "answers anonymous callers only" in out and "datamesh ask" in out


def test_a_folder_without_products_exits_1(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, EXAMPLES / "00-namespaces.yaml")
    result = local(folder, "--no-serve", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 1
    assert f"no DataProduct in {folder}" in flat(result)


def test_the_exit_status_survives_ctrl_c_while_serving(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path, EXAMPLES / "sales-customer-churn.yaml", INVALID / "manifest" / "kind-wrong-case.yaml"
    )
    port = free_port()
    server = subprocess.Popen(
        [*DATAMESH, "local", str(folder), "--port", str(port), "--state-dir", str(tmp_path / "state")],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: _ready(f"http://127.0.0.1:{port}"), 90, interval=0.5, what="local query API")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate(timeout=5)
    assert server.returncode == 1, out
    assert "Traceback" not in out


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_command_starts_from_a_module_that_child_processes_can_import_cheaply() -> None:
    """The operator's child processes (collection builders, the built-in embedder) import the program's main
    script again. The ``datamesh`` script imports ``datamesh.__main__``, which must not pull in the command line:
    typer, rich, pydantic and the models cost each child about 28 MiB."""
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "datamesh"]
    assert script.value == "datamesh.__main__:main"
    heavy = ("datamesh.cli", "typer", "rich", "pydantic", "numpy")
    code = f"import sys, datamesh.__main__; print([m for m in {heavy!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV)
    assert loaded.stdout.strip() == "[]"
    help_text = subprocess.run([*DATAMESH, "--help"], capture_output=True, text=True, env=ENV)
    assert help_text.returncode == 0 and "local" in help_text.stdout
