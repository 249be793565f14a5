"""The chart installed for real, on a real node (containerd, kubelet, kube-proxy, a CNI bridge).

What runs: ``helm install`` of charts/datamesh with hack/e2e/values.yaml (the image built by
hack/image/build.sh, imported into the node and never pulled; ``store.mode: embedded``, since no
Qdrant image can be pulled either: the operator pod keeps the vectors in Qdrant's engine and
serves the query API behind the chart's query Service). The operator pod runs in-cluster with the
chart's ServiceAccount and RBAC and reconciles ``examples/`` and ``examples/inference/``; for the
product with ``inference.model`` it deploys an inference runtime pod, which answers
``/v1/embeddings`` and ``/v1/transform`` through its Service, also when the query service calls it
by its cluster DNS name; the query Service answers ``/v1/query``; after a ``helm upgrade`` turning
``operator.ingestJobs`` on (the store on a hostPath PersistentVolume), a url source served from the
host is ingested by a Job whose container runs on the node; ``helm test`` passes (a pod
resolving the Service's DNS name); ``kubectl logs`` reaches the kubelet; deleting the products
lets the in-cluster operator finalize them and the garbage collector remove their inference
children, and ``helm uninstall`` then leaves nothing of the release and no DataProduct children.
Services are reached from the host through their ClusterIPs (kube-proxy's rules), as a pod would.

The tests run in order and share one release (they are one scenario, timed in the e2e report).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from datamesh.resource.catalog import CATALOG_LABEL, decode_entries
from datamesh.web.serving import free_port
from tests.e2e.conftest import REPORT, E2ECluster, seconds
from tests.harness import wait_for
from tests.httpserver import ServerThread

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "datamesh"
VALUES = REPO / "hack" / "e2e" / "values.yaml"
RELEASE = "dm"
NS = "datamesh-system"
TOKEN = "e2e-token"
PRODUCT_NAMESPACES = ("sales", "support", "finance", "hr", "logistics", "product")
MANAGED_BY = "app.kubernetes.io/managed-by=datamesh-operator"

STATE: dict[str, Any] = {}


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def service_url(cluster: E2ECluster, namespace: str, name: str) -> str:
    svc = cluster.kubectl.json("get", "service", name, "-n", namespace)
    return f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


def products(cluster: E2ECluster) -> list[dict[str, Any]]:
    return list(cluster.kubectl.json("get", "dataproducts", "-A")["items"])


def operator_log(cluster: E2ECluster) -> str:
    result = cluster.kubectl.run("logs", "-n", NS, f"deployment/{RELEASE}-datamesh-operator", "--tail=60", check=False)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def release(e2e_cluster: E2ECluster) -> E2ECluster:
    """The chart installed (once for the module) and the examples applied; times recorded."""
    cluster = e2e_cluster
    t0 = time.monotonic()
    cluster.helm.run(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        NS,
        "--create-namespace",
        "-f",
        str(VALUES),
        "--set",
        f"image.tag={cluster.image.ref.rsplit(':', 1)[1]}",
        "--wait",
        "--timeout",
        "5m",
        timeout=330,
    )
    STATE["installed_at"] = t0
    REPORT.setdefault("chart", {})["helm install --wait s"] = seconds(time.monotonic() - t0)
    cluster.kubectl.run("apply", "-f", str(REPO / "examples"))
    cluster.kubectl.run("apply", "-f", str(REPO / "examples" / "inference"))
    return cluster


@pytest.mark.usefixtures("release")
class TestChartOnARealNode:
    def test_node_is_real_and_ready(self, e2e_cluster: E2ECluster) -> None:
        node = e2e_cluster.kubectl.json("get", "node", e2e_cluster.node.name)
        info = node["status"]["nodeInfo"]
        assert info["containerRuntimeVersion"].startswith("containerd://")
        assert info["kubeletVersion"] == "v1.34.3"
        addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
        assert addresses["InternalIP"] == e2e_cluster.node.ip
        assert "kwok.x-k8s.io/node" not in (node["metadata"].get("annotations") or {})

    def test_operator_runs_in_cluster_with_the_charts_account(self, e2e_cluster: E2ECluster) -> None:
        pods = e2e_cluster.kubectl.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=operator")["items"]
        (pod,) = pods
        assert pod["spec"]["serviceAccountName"] == f"{RELEASE}-datamesh-operator"
        assert pod["spec"]["nodeName"] == e2e_cluster.node.name
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"] and status["image"].endswith(e2e_cluster.image.ref.split("/", 1)[1])
        assert pod["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        # kubectl logs goes through the API server to the kubelet.
        wait_for(lambda: "query API on" in operator_log(e2e_cluster), timeout=60, what="the operator's log")

    def test_examples_become_ready(self, e2e_cluster: E2ECluster) -> None:
        def all_ready() -> list[dict[str, Any]] | None:
            items = products(e2e_cluster)
            phases = {
                f"{p['metadata']['namespace']}/{p['metadata']['name']}": (p.get("status") or {}).get("phase")
                for p in items
            }
            STATE["phases"] = phases
            return items if len(items) >= 8 and all(v == "Ready" for v in phases.values()) else None

        try:
            items = wait_for(all_ready, timeout=300, interval=1, what="every example product Ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {STATE.get('phases')}\n{operator_log(e2e_cluster)}") from None
        REPORT["chart"]["helm install to all examples Ready s"] = seconds(time.monotonic() - STATE["installed_at"])
        assert {p["metadata"]["name"] for p in items} >= {"customer-churn", "ticket-triage"}

    def test_query_service_answers_through_its_service(self, e2e_cluster: E2ECluster) -> None:
        url = service_url(e2e_cluster, NS, f"{RELEASE}-datamesh-query")

        def answered() -> dict[str, Any] | None:
            question = {"question": "why do enterprise customers churn?"}
            try:
                status, body = http("POST", f"{url}/v1/query", question, TOKEN)
            except OSError:
                return None
            hits = [r for r in (body.get("results", []) if status == 200 else []) if r["hits"]]
            return body if any(r["product"] == "sales/customer-churn" for r in hits) else None

        answer = wait_for(answered, timeout=120, interval=0.5, what="an answer from the query Service")
        REPORT["chart"]["helm install to first /v1/query answer s"] = seconds(time.monotonic() - STATE["installed_at"])
        assert answer["merged"] and answer["routedTo"][0]["product"] == "sales/customer-churn"
        assert http("POST", f"{url}/v1/query", {"question": "churn"})[0] == 401, "no token, no answer"
        status, listing = http("GET", f"{url}/v1/products", token=TOKEN)
        assert status == 200, listing
        names = {p["name"] for p in listing["products"]} if isinstance(listing, dict) else set()
        assert "expense-exceptions" in names, "the token's group sees the finance-only product"

    def test_inference_runtime_answers_through_its_service(self, e2e_cluster: E2ECluster) -> None:
        kubectl = e2e_cluster.kubectl
        deployment = kubectl.json("get", "deployment", "ticket-triage-inference", "-n", "support")
        assert deployment["status"].get("availableReplicas") == 1
        pods = kubectl.json("get", "pods", "-n", "support", "-l", "datamesh.io/product=ticket-triage")["items"]
        assert pods and all(p["spec"]["nodeName"] == e2e_cluster.node.name for p in pods)
        product = kubectl.json("get", "dataproduct", "ticket-triage", "-n", "support")
        conditions = {c["type"]: c["status"] for c in product["status"]["conditions"]}
        assert conditions.get("InferenceReady") == "True", conditions

        url = service_url(e2e_cluster, "support", "ticket-triage-inference")
        status, body = http("POST", f"{url}/v1/embeddings", {"input": ["I cannot log in since this morning"]})
        assert status == 200, body
        assert len(body["data"]) == 1 and len(body["data"][0]["embedding"]) == 384
        task = {
            "task": "classify",
            "field": "text",
            "records": [{"text": "I was charged twice on my card, please refund"}],
            "labels": [
                {"name": "billing", "description": "charges, invoices, refunds and payments"},
                {"name": "access", "description": "login, passwords, SSO and locked accounts"},
            ],
        }
        status, body = http("POST", f"{url}/v1/transform", task)
        assert status == 200 and body["results"][0]["label"] == "billing", body
        # The same through the query service: the operator pod resolves the runtime's cluster DNS name.
        query = service_url(e2e_cluster, NS, f"{RELEASE}-datamesh-query")
        status, body = http("POST", f"{query}/v1/products/support/ticket-triage/transform", task, TOKEN)
        assert status == 200 and body["records"][0]["_inference"]["label"] == "billing", body

    def test_helm_test_passes(self, e2e_cluster: E2ECluster) -> None:
        # The test pod resolves the query Service's DNS name and needs its /readyz (it is deleted on success).
        result = e2e_cluster.helm.run("test", RELEASE, "-n", NS, "--timeout", "3m", timeout=200)
        assert "Phase:          Succeeded" in result.stdout, result.stdout

    def test_a_large_source_is_ingested_by_a_job_on_the_node(self, e2e_cluster: E2ECluster, tmp_path: Path) -> None:
        """operator.ingestJobs on (a helm upgrade): the Job's container really runs ``datamesh ingest`` on the node,
        writing into the store's volume (a hostPath PersistentVolume here), and the operator takes its rows in."""
        kubectl, rows = e2e_cluster.kubectl, 500
        folder = tmp_path / "store-volume"
        folder.mkdir()
        folder.chmod(0o777)  # the chart's pods run as uid 10001; the bind mount exposes this folder only
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": "dm-e2e-store"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "e2e-manual",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(folder), "type": "Directory"},
            },
        }
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "dm-e2e-store", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "e2e-manual",
                "volumeName": "dm-e2e-store",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        kubectl.run(
            "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [volume, claim]})
        )
        t0 = time.monotonic()
        e2e_cluster.helm.run(
            "upgrade",
            RELEASE,
            str(CHART),
            "--namespace",
            NS,
            "--reuse-values",
            "--set",
            "store.embedded.existingClaim=dm-e2e-store",
            "--set",
            "operator.ingestJobs.enabled=true",
            "--set",
            "operator.ingestJobs.minBytes=1000",
            "--set",
            "operator.ingestJobs.resources.requests.cpu=100m",
            "--wait",
            "--timeout",
            "5m",
            timeout=330,
        )
        REPORT["chart"]["helm upgrade to ingestion Jobs --wait s"] = seconds(time.monotonic() - t0)

        app = FastAPI()

        @app.get("/parcels.csv", response_class=PlainTextResponse)
        def parcels() -> str:
            lines = ["id,text,amount"] + [
                f"p{i},parcel {i} held at customs for a missing invoice,{i}" for i in range(rows)
            ]
            return "\n".join(lines) + "\n"

        port = free_port()
        body = {
            "apiVersion": "datamesh.io/v1alpha1",
            "kind": "DataProduct",
            "metadata": {"name": "parcel-holds", "namespace": "logistics"},
            "spec": {
                "domain": "logistics",
                "owner": {"team": "logistics-control-tower", "email": "control-tower@example.com"},
                "description": "Parcels held at customs and why.",
                "schema": {
                    "fields": [
                        {"name": "id", "primaryKey": True},
                        {"name": "text"},
                        {"name": "amount", "type": "integer"},
                    ]
                },
                "source": {"url": {"url": f"http://{e2e_cluster.node.ip}:{port}/parcels.csv", "format": "csv"}},
                "semanticSearch": {"keyFields": ["text"]},
            },
        }
        with ServerThread(app, host="0.0.0.0", port=port):
            t0 = time.monotonic()
            kubectl.run("apply", "-f", "-", input=json.dumps(body))
            selector = "datamesh.io/product-name=parcel-holds"
            pod = wait_for(
                lambda: next(
                    (
                        p
                        for p in kubectl.json("get", "pods", "-n", NS, "-l", selector)["items"]
                        if p["spec"].get("nodeName")
                    ),
                    None,
                ),
                timeout=120,
                interval=0.5,
                what="the ingestion Job's pod, scheduled",
            )
            assert pod["spec"]["nodeName"] == e2e_cluster.node.name
            assert pod["spec"]["containers"][0]["args"] == ["ingest", "logistics/parcel-holds"]

            def ready() -> dict[str, Any] | None:
                product = kubectl.json("get", "dataproduct", "parcel-holds", "-n", "logistics")
                return product if (product.get("status") or {}).get("phase") == "Ready" else None

            try:
                product = wait_for(ready, timeout=240, interval=1, what="the product Ready after its Job")
            except AssertionError as exc:
                logs = kubectl.run("logs", "-n", NS, "-l", selector, "--tail=40", check=False)
                raise AssertionError(f"{exc}\n{logs.stdout}{logs.stderr}\n{operator_log(e2e_cluster)}") from None
        REPORT["chart"]["url source through an ingestion Job to Ready s"] = seconds(time.monotonic() - t0)
        assert product["status"]["records"] == rows
        events = kubectl.json("get", "events", "-n", "logistics", "--field-selector", "reason=IngestedInJob")["items"]
        assert events, "the product says a Job ingested it"
        wait_for(lambda: not kubectl.json("get", "jobs", "-n", NS, "-l", selector)["items"], 60, what="the Job deleted")
        # The Job's rows answer through the query Service.
        url = service_url(e2e_cluster, NS, f"{RELEASE}-datamesh-query")
        question = {"question": "which parcels are held at customs?", "products": ["logistics/parcel-holds"]}
        status, answer = http("POST", f"{url}/v1/query", question, TOKEN)
        assert status == 200, answer
        hits = [h for r in answer["results"] if r["product"] == "logistics/parcel-holds" for h in r["hits"]]
        assert hits, answer

    def test_products_deleted_then_uninstall_leaves_no_children(self, e2e_cluster: E2ECluster, tmp_path: Path) -> None:
        kubectl = e2e_cluster.kubectl
        kubectl.run("delete", "dataproducts", "--all", "-A", "--wait=false")
        # The in-cluster operator runs each finalizer; the garbage collector removes the children.
        wait_for(lambda: not products(e2e_cluster), timeout=120, interval=1, what="every product finalized")

        def children() -> list[str]:
            out = kubectl.run("get", "deployments,services,pods", "-A", "-l", MANAGED_BY, "-o", "name").stdout
            pods = kubectl.run("get", "pods", "-n", "support", "-o", "name").stdout
            return out.split() + pods.split()

        wait_for(lambda: not children(), timeout=120, interval=1, what="the inference children gone")
        manifest = e2e_cluster.helm.run("get", "manifest", RELEASE, "-n", NS).stdout
        (tmp_path / "manifest.yaml").write_text(manifest)
        t0 = time.monotonic()
        e2e_cluster.helm.run("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "3m", timeout=200)
        REPORT["chart"]["helm uninstall --wait s"] = seconds(time.monotonic() - t0)
        left = kubectl.run("get", "-f", str(tmp_path / "manifest.yaml"), "--ignore-not-found", "-o", "name").stdout
        assert not left.split(), f"left behind by helm uninstall: {left}"
        wait_for(
            lambda: not kubectl.json("get", "pods", "-n", NS)["items"], timeout=120, what="the release's pods gone"
        )
        assert not children()
        leftovers = {
            ns: kubectl.run("get", "deployments,services,pods", "-n", ns, "-o", "name").stdout.split()
            for ns in PRODUCT_NAMESPACES
        }
        assert not any(leftovers.values()), leftovers
        # The catalog (data the operator wrote, not the release's) holds no entry any more.
        for cm in kubectl.json("get", "configmaps", "-n", NS, "-l", f"{CATALOG_LABEL}=true")["items"]:
            assert not decode_entries(cm.get("data") or {}), cm["data"]
