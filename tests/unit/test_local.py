"""Local mode: `datamesh local DIR` and `datamesh ask`, exactly as the README runs them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from datamesh.controller import metrics
from datamesh.local import LocalInferenceBackend, LocalRun, load_manifests
from datamesh.resource.models import Inference
from datamesh.web.serving import free_port
from tests.harness import wait_for

REPO = Path(__file__).resolve().parents[2]
DATAMESH = [sys.executable, "-m", "datamesh"]


def _run(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*DATAMESH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_invalid_manifests_are_reported_by_file_and_field_and_the_rest_still_run(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(REPO / "examples" / "sales-customer-churn.yaml", folder)
    shutil.copy(REPO / "examples" / "invalid" / "keyfields-not-in-schema.yaml", folder)
    (folder / "broken.yaml").write_text("kind: DataProduct\n  bad: [indent\n")
    result = _run("local", str(folder), "--no-serve", "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 1
    out = " ".join(result.stdout.split())
    assert "sales/customer-churn" in out and "Ready" in out
    assert "keyfields-not-in-schema.yaml" in out and "spec.semanticSearch.keyFields" in out
    assert "broken.yaml" in out and "not valid YAML" in out


async def test_second_run_over_unchanged_manifests_writes_nothing(tmp_path: Path) -> None:
    loaded = load_manifests(REPO / "examples")
    assert len(loaded.products) >= 7 and not loaded.errors
    first = LocalRun(tmp_path)
    try:
        results = await first.reconcile_all(loaded.products)
    finally:
        await first.close()
    assert all(o.status.phase == "Ready" for _, o in results)
    written = metrics.INGESTED_ROWS._value.get()
    second = LocalRun(tmp_path)
    try:
        again = await second.reconcile_all(loaded.products)
        assert [o.status.records for _, o in again] == [o.status.records for _, o in results]
        assert await second.store.count("sales.customer-churn") == 25
    finally:
        await second.close()
    assert metrics.INGESTED_ROWS._value.get() == written


def test_local_then_ask_from_a_second_shell(tmp_path: Path) -> None:
    """The README's main job: `datamesh local examples/`, then `datamesh ask` in another shell."""
    port = free_port()
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}
    server = subprocess.Popen(
        [*DATAMESH, "local", str(REPO / "examples"), "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        wait_for(lambda: _ready(httpx, url), 90, interval=0.5, what="local query API")
        asked = _run("ask", "why do enterprise customers churn after a price increase?", "--url", url, cwd=tmp_path)
        assert asked.returncode == 0, asked.stdout + asked.stderr
        out = asked.stdout
        assert "Routed to" in out and "Answer (merged ranking)" in out
        assert "ACC-" in out, "the answer names rows by their primary key"
        assert (
            out.index("sales/customer-churn") < min(out.index(p) for p in ("logistics/", "hr/") if p in out)
            if ("logistics/" in out or "hr/" in out)
            else True
        )
        as_json = _run("ask", "which shipments were delayed by weather?", "--url", url, "--json", cwd=tmp_path)
        answer = json.loads(as_json.stdout)
        assert answer["merged"][0]["product"] == "logistics/shipment-delays"
        assert answer["results"][0]["hits"]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
    assert (tmp_path / ".datamesh" / "catalog.json").exists(), "local state lives in the project folder"


def _ready(httpx_mod: object, url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_ask_without_a_service_says_what_to_do(tmp_path: Path) -> None:
    result = _run("ask", "anything", "--url", f"http://127.0.0.1:{free_port()}", cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert "cannot reach the query service" in result.stdout and "datamesh local examples/" in result.stdout


async def test_inference_model_is_served_in_process_once_per_model() -> None:
    backend = LocalInferenceBackend()
    try:
        check, url = await backend.ensure("sales", "churn", "uid-1", Inference(enabled=True, model="builtin:ngram-64"))
        assert check.ok and check.reason == "RuntimeServing" and url and url.startswith("http://127.0.0.1:")
        again, same_url = await backend.ensure(
            "support", "tickets", "uid-2", Inference(enabled=True, model="builtin:ngram-64")
        )
        assert again.ok and same_url == url
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/healthz")).status_code == 200
            answer = await client.post("/v1/embeddings", json={"input": ["late parcel"], "model": "builtin:ngram-64"})
            assert len(answer.json()["data"][0]["embedding"]) == 64
    finally:
        await backend.close()
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/healthz")
