"""Large sources ingested by real Kubernetes Jobs on the control plane: the Job's whole lifecycle.

The operator (the session's, reconfigured for Jobs) creates a real Job; kube-controller-manager's
Job controller makes its pods, retries a failed one after its backoff, and applies the pod failure
policy. No kwok node takes these pods (their template asks for a node that does not exist), because
kwok runs no container: this test plays the kubelet's part instead. It runs the pod's own command,
``datamesh ingest NAMESPACE/NAME``, as a process here against the operator's store folder, and
writes the pod's end into its status (exit code and termination message) as a kubelet would. The
real-node tier (tests/e2e) runs the same Job's container on a real kubelet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.core.jobs import EXIT_PERMANENT, PRODUCT_NAME_LABEL
from datamesh.core.ports import SearchRequest
from datamesh.web.serving import free_port
from tests.cluster.test_reconcile_cluster import product
from tests.conftest import PLATFORM_NAMESPACE
from tests.harness import Kubectl, OperatorThread, wait_for
from tests.httpserver import ServerThread

NS = "ingest-jobs"
ROWS = 300


def csv_rows(count: int, id_column: str = "id") -> str:
    lines = [f"{id_column},text,amount"]
    lines += [f"r{i},parcel {i} was held at customs for inspection,{i}" for i in range(count)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def source() -> Iterator[str]:
    """A csv server on 127.0.0.1: /rows.csv (valid rows) and /bad.csv (no id column: every row refused)."""
    app = FastAPI()

    @app.get("/rows.csv", response_class=PlainTextResponse)
    def rows() -> str:
        return csv_rows(ROWS)

    @app.get("/bad.csv", response_class=PlainTextResponse)
    def bad() -> str:
        return csv_rows(20, id_column="key")

    port = free_port()
    with ServerThread(app, port=port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def job_operator(operator: OperatorThread, kubectl: Kubectl, tmp_path: Path) -> Iterator[OperatorThread]:
    """The session's operator with ingestion Jobs on (any url source over 1,000 bytes), in its own namespace."""
    template = tmp_path / "ingest-pod.yaml"
    pod = {
        "spec": {
            # No node has this label: the test runs the pod's command itself (see the module's docstring).
            "nodeSelector": {"datamesh.io/test-node": "played-by-the-test"},
            "containers": [{"name": "ingest", "image": "datamesh:test"}],
        }
    }
    template.write_text(yaml.safe_dump(pod))
    kubectl.run("create", "namespace", NS, check=False)
    with operator.reconfigured(ingest_job_min_bytes=1000, ingest_job_template=template, ingest_job_backoff_limit=2):
        try:
            yield operator
        finally:
            kubectl.run("delete", "dataproducts", "--all", "-n", NS, "--wait=true", check=False, timeout=120)


def apply_url_product(kubectl: Kubectl, name: str, url: str) -> None:
    body = product(name, [])
    body["metadata"]["namespace"] = NS
    body["spec"]["source"] = {"url": {"url": url, "format": "csv"}}
    kubectl.run("apply", "-f", "-", input=json.dumps(body))


def status(kubectl: Kubectl, name: str) -> dict[str, Any]:
    return (kubectl.get("dataproduct", name, NS) or {}).get("status") or {}


def condition(kubectl: Kubectl, name: str, kind: str) -> dict[str, Any]:
    return next((c for c in status(kubectl, name).get("conditions") or [] if c["type"] == kind), {})


def jobs_of(kubectl: Kubectl, name: str) -> list[dict[str, Any]]:
    selector = f"{PRODUCT_NAME_LABEL}={name}"
    return list(kubectl.json("get", "jobs", "-n", PLATFORM_NAMESPACE, "-l", selector)["items"])


def pods_of(kubectl: Kubectl, job: str) -> list[dict[str, Any]]:
    return list(kubectl.json("get", "pods", "-n", PLATFORM_NAMESPACE, "-l", f"job-name={job}")["items"])


def run_pod_command(pod: dict[str, Any], store: Path, tmp_path: Path) -> tuple[int, str]:
    """The pod's container command run here, as the kubelet would run it: its exit code and its report."""
    args = pod["spec"]["containers"][0]["args"]
    assert args[0] == "ingest", args
    report = tmp_path / f"{pod['metadata']['name']}.report"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATAMESH_", "KUBERNETES_"))}
    env["DATAMESH_QDRANT_PATH"] = str(store)
    script = Path(sys.executable).with_name("datamesh")
    done = subprocess.run(
        [str(script), *args, "--report", str(report)], env=env, capture_output=True, text=True, timeout=120
    )
    assert report.exists(), done.stdout + done.stderr
    return done.returncode, report.read_text()


def end_pod(kubectl: Kubectl, pod: dict[str, Any], exit_code: int, message: str) -> None:
    """Write the pod's end into its status as a kubelet does: phase, exit code, termination message."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    container = pod["spec"]["containers"][0]
    terminated = {
        "exitCode": exit_code,
        "reason": "Completed" if exit_code == 0 else "Error",
        "message": message,
        "startedAt": now,
        "finishedAt": now,
    }
    patch = {
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }
    }
    kubectl.run(
        "patch",
        "pod",
        pod["metadata"]["name"],
        "-n",
        PLATFORM_NAMESPACE,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(patch),
    )


def test_a_large_source_is_ingested_by_a_job_that_kubernetes_retries_and_the_operator_adopts(
    kubectl: Kubectl, job_operator: OperatorThread, source: str, tmp_path: Path
) -> None:
    apply_url_product(kubectl, "big-parcels", f"{source}/rows.csv")

    wait_for(
        lambda: condition(kubectl, "big-parcels", "Ingested").get("reason") == "IngestingInJob",
        60,
        what="the product to say a Job ingests it",
    )
    (job,) = wait_for(lambda: jobs_of(kubectl, "big-parcels") or None, 30, what="the ingestion Job")
    name = job["metadata"]["name"]
    assert status(kubectl, "big-parcels")["ingestion"]["job"] == f"{PLATFORM_NAMESPACE}/{name}"
    assert status(kubectl, "big-parcels").get("phase") != "Ready"

    # The first pod dies (a node lost, say): Kubernetes makes another after its backoff.
    (first,) = wait_for(lambda: pods_of(kubectl, name) or None, 30, what="the Job's pod")
    end_pod(kubectl, first, 1, "node lost")
    failed_at = time.monotonic()
    second = wait_for(
        lambda: next((p for p in pods_of(kubectl, name) if p["metadata"]["uid"] != first["metadata"]["uid"]), None),
        60,
        what="the Job controller to retry the pod",
    )
    print(f"\nsecond pod {time.monotonic() - failed_at:.1f} s after the first failed")
    assert condition(kubectl, "big-parcels", "Ingested").get("reason") == "IngestingInJob", (
        "one failed pod is not the end"
    )

    code, report = run_pod_command(second, job_operator.store.root, tmp_path)  # type: ignore[attr-defined]
    assert code == 0, report
    end_pod(kubectl, second, code, report)

    ready = wait_for(lambda: status(kubectl, "big-parcels").get("phase") == "Ready", 60, what="Ready after the Job")
    assert ready
    final = status(kubectl, "big-parcels")
    assert final["records"] == ROWS and not final.get("ingestion"), final
    assert condition(kubectl, "big-parcels", "Ingested")["message"].startswith(f"{ROWS} records")
    wait_for(lambda: not jobs_of(kubectl, "big-parcels"), 30, what="the finished Job to be deleted")
    events = kubectl.json("get", "events", "-n", NS, "--field-selector", "reason=IngestedInJob")["items"]
    assert any(name in e["message"] for e in events)
    # Its rows answer from the operator's store, as inline ones do.
    (vector,) = job_operator.call(resolve_provider("builtin:ngram-384").embed(["parcel 42 held at customs"]))
    hits = job_operator.call(
        job_operator.store.search(final["collection"], SearchRequest(vector, "parcel 42 customs", 3))
    )
    assert "r42" in [h.payload["id"] for h in hits]


def test_a_job_that_fails_for_good_fails_the_product_at_once_and_goes_with_it(
    kubectl: Kubectl, job_operator: OperatorThread, source: str, tmp_path: Path
) -> None:
    apply_url_product(kubectl, "bad-parcels", f"{source}/bad.csv")
    (job,) = wait_for(lambda: jobs_of(kubectl, "bad-parcels") or None, 60, what="the ingestion Job")
    (pod,) = wait_for(lambda: pods_of(kubectl, job["metadata"]["name"]) or None, 30, what="the Job's pod")
    code, report = run_pod_command(pod, job_operator.store.root, tmp_path)  # type: ignore[attr-defined]
    assert code == EXIT_PERMANENT, report
    end_pod(kubectl, pod, code, report)

    wait_for(lambda: status(kubectl, "bad-parcels").get("phase") == "Failed", 60, what="the product to fail")
    ingested = condition(kubectl, "bad-parcels", "Ingested")
    assert ingested["reason"] == "IngestionJobFailed" and "20 of 20 rows rejected" in ingested["message"], ingested
    (kept,) = jobs_of(kubectl, "bad-parcels")
    assert any(c["type"] == "Failed" and c["reason"] == "PodFailurePolicy" for c in kept["status"]["conditions"])
    assert len(pods_of(kubectl, kept["metadata"]["name"])) == 1, "exit 2 is not retried"

    kubectl.run("delete", "dataproduct", "bad-parcels", "-n", NS, "--wait=true", timeout=60)
    wait_for(lambda: not jobs_of(kubectl, "bad-parcels"), 30, what="the product's Job to go with it")
