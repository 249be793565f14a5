"""``datamesh operator --query-port``: the operator and the query API in one process, one embedded store.

The chart's ``store.mode: embedded`` runs this command: Qdrant's embedded engine is locked to one
process, so the operator serves the query API itself. Here it runs as a subprocess on the real
control plane (its own namespace, finalizer and annotation prefix, so it never meets the
session's in-process operator): products it reconciles become answerable through its query port
(catalog read through the ConfigMap watch), bearer tokens are enforced, and SIGTERM stops both
promptly with exit code 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from datamesh.web.serving import free_ports
from tests.harness import Kubectl, wait_for

REPO = Path(__file__).resolve().parents[2]
NS = "datamesh-embedded-products"
PLATFORM_NS = "datamesh-embedded-platform"
PREFIX = "embedded-test.datamesh.io"


def _post(url: str, body: dict[str, Any], token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture
def embedded_operator(kubectl: Kubectl, crd_installed: None, tmp_path: Path) -> Any:
    for ns in (NS, PLATFORM_NS):
        kubectl.run("create", "namespace", ns, check=False)
    query_port, health_port = free_ports(2)
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"t0k3n": {"identity": "ci@example.com", "groups": ["qa"]}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATAMESH_", "KUBERNETES_"))}
    env.update(
        KUBECONFIG=str(kubectl.kubeconfig),
        DATAMESH_PLATFORM_NAMESPACE=PLATFORM_NS,
        DATAMESH_METRICS_PORT="0",
        DATAMESH_FINALIZER=f"{PREFIX}/finalizer",
        DATAMESH_ANNOTATION_PREFIX=PREFIX,
        DATAMESH_CATALOG_FLUSH_SECONDS="0.2",
        DATAMESH_QDRANT_PATH=str(tmp_path / "store"),
        DATAMESH_QUERY_TOKENS_FILE=str(tokens),
        # Ignored: the embedded query API reads the catalog its own operator writes.
        DATAMESH_QUERY_CATALOG_NAMESPACE="somewhere-else",
    )
    script = Path(sys.executable).with_name("datamesh")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "datamesh"]
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *command,
                "operator",
                "--namespace",
                NS,
                "--liveness",
                f"http://127.0.0.1:{health_port}/healthz",
                "--query-port",
                str(query_port),
                "--query-host",
                "127.0.0.1",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        yield proc, f"http://127.0.0.1:{query_port}", log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kubectl.run("delete", "dataproducts", "--all", "-n", NS, "--wait=false", check=False)
        for item in kubectl.json("get", "dataproducts", "-n", NS)["items"]:
            kubectl.run(
                "patch",
                "dataproduct",
                item["metadata"]["name"],
                "-n",
                NS,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        for ns in (NS, PLATFORM_NS):
            kubectl.run("delete", "namespace", ns, "--wait=false", check=False)


def test_operator_serves_the_query_api_over_its_own_store(embedded_operator: Any, kubectl: Kubectl) -> None:
    proc, url, log = embedded_operator

    def alive() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"the operator exited ({proc.returncode}):\n{log.read_text()[-4000:]}")

    def ready() -> bool:
        alive()
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    wait_for(ready, timeout=60, what="the embedded query API's /readyz")
    product = yaml.safe_load((REPO / "examples" / "sales-customer-churn.yaml").read_text())
    product["metadata"]["namespace"] = NS
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump(product))

    def answered() -> dict[str, Any] | None:
        alive()
        status, body = _post(f"{url}/v1/query", {"question": "why do enterprise customers churn?"}, "t0k3n")
        hits = [r for r in body.get("results", []) if r["product"] == f"{NS}/customer-churn" and r["hits"]]
        return body if status == 200 and hits else None

    try:
        answer = wait_for(answered, timeout=60, what="an answer from the product through the embedded query API")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- operator log ---\n{log.read_text()[-4000:]}") from None
    assert answer["merged"], answer
    assert _post(f"{url}/v1/query", {"question": "churn"})[0] == 401, "a query without a token is refused"

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-4000:]
    assert time.monotonic() - t0 < 20, "SIGTERM must stop the operator and the query API promptly"
    text = log.read_text()
    assert "Traceback" not in text, text[-4000:]
