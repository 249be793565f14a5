"""Every product gets its collection, data, inference and catalog entry (real control plane)."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from datamesh.controller import metrics
from datamesh.core.ports import SearchRequest
from datamesh.resource.catalog import CATALOG_LABEL
from datamesh.resource.models import DEFAULT_EMBEDDING_MODEL
from datamesh.web.serving import free_port
from tests.conftest import PLATFORM_NAMESPACE
from tests.harness import Kubectl, OperatorThread, wait_for
from tests.httpserver import ServerThread

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if p.name != "00-namespaces.yaml")


def catalog(kubectl: Kubectl) -> dict[str, dict[str, Any]]:
    """Every catalog entry, from the ConfigMaps themselves."""
    items = kubectl.json("get", "configmaps", "-n", PLATFORM_NAMESPACE, "-l", f"{CATALOG_LABEL}=true")["items"]
    return {k: json.loads(v) for cm in items for k, v in (cm.get("data") or {}).items()}


def phase(kubectl: Kubectl, name: str, namespace: str = "default") -> str | None:
    dp = kubectl.get("dp", name, namespace)
    return ((dp or {}).get("status") or {}).get("phase")


def ready(kubectl: Kubectl, name: str, namespace: str = "default", timeout: float = 90) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        dp = kubectl.get("dp", name, namespace)
        st = (dp or {}).get("status") or {}
        return (
            dp if st.get("phase") == "Ready" and st.get("observedGeneration") == dp["metadata"]["generation"] else None
        )

    return wait_for(check, timeout, what=f"{namespace}/{name} Ready")


def product(name: str, rows: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    """A small valid product in the default namespace."""
    body: dict[str, Any] = {
        "apiVersion": "datamesh.io/v1alpha1",
        "kind": "DataProduct",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "domain": "test",
            "description": "Synthetic product used by the reconcile tests.",
            "schema": {
                "fields": [
                    {"name": "id", "type": "string", "primaryKey": True},
                    {"name": "text", "type": "string"},
                    {"name": "amount", "type": "number"},
                ]
            },
            "source": {
                "inline": rows
                if rows is not None
                else [{"id": f"r{i}", "text": f"row number {i} about shipping", "amount": i} for i in range(5)]
            },
            # The tiny lexical model: these tests are about reconciling, not about what vectors mean.
            "semanticSearch": {"enabled": True, "keyFields": ["text"], "embeddingModel": "builtin:ngram-384"},
        },
    }
    body["spec"].update(spec)
    return body


def apply(kubectl: Kubectl, *bodies: dict[str, Any]) -> None:
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump_all(bodies))


def delete(kubectl: Kubectl, name: str, namespace: str = "default") -> None:
    kubectl.run("delete", "dp", name, "-n", namespace, "--ignore-not-found", "--timeout=60s")


def test_every_example_becomes_ready_with_collection_and_catalog_entry(
    kubectl: Kubectl, operator: OperatorThread
) -> None:
    kubectl.run("apply", "-f", str(REPO / "examples"))
    entries: dict[str, dict[str, Any]] = {}
    for path in EXAMPLES:
        doc = yaml.safe_load(path.read_text())
        ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
        dp = ready(kubectl, name, ns)
        st = dp["status"]
        assert st["collection"] == f"{ns}.{name}"
        assert st["vectorSize"] == 384
        assert (
            len(operator.call(operator.store.search(st["collection"], SearchRequest([1.0] + [0.0] * 383, "row", 1))))
            == 1
        )
        points = operator.call(operator.store.count(st["collection"]))
        assert points == st["records"] == len(doc["spec"]["source"]["inline"]) - st.get("rejectedRecords", 0)
        assert st["records"] >= 20
        conds = {c["type"]: c["status"] for c in st["conditions"]}
        assert conds["Ready"] == conds["CollectionReady"] == conds["Ingested"] == conds["Cataloged"] == "True"
        entries = wait_for(
            lambda key=f"{ns}.{name}": (c := catalog(kubectl)) and key in c and c, 10, what="catalog entry"
        )
        entry = entries[f"{ns}.{name}"]
        assert entry["domain"] == doc["spec"]["domain"]
        assert entry["description"] == doc["spec"]["description"]
        assert entry["collection"] == st["collection"]
        assert entry["keyFields"] == doc["spec"]["semanticSearch"]["keyFields"]
        assert entry["embeddingModel"] == DEFAULT_EMBEDDING_MODEL  # the examples use the default model
        assert [f["name"] for f in entry["fields"]] == [f["name"] for f in doc["spec"]["schema"]["fields"]]
        assert entry["phase"] == "Ready" and entry["records"] == st["records"]
        assert entry["consumers"] == doc["spec"].get("access", {}).get("consumers", ["*"])
        assert entry["tags"] == doc["spec"]["tags"]


def scheduler_sees_cordon(kubectl: Kubectl) -> None:
    """Wait until kube-scheduler refuses a pod for the cordoned node.

    The scheduler learns of the cordon through its watch: a pod created before that is still bound
    to the node (kwok makes it Ready at once), so a probe that got bound is replaced by a new one.
    """
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "cordon-probe", "namespace": "default"},
        "spec": {"containers": [{"name": "probe", "image": "registry.k8s.io/pause:3.10"}]},
    }

    def remove_probe() -> None:
        kubectl.run("delete", "pod", "cordon-probe", "-n", "default", "--grace-period=0", "--force", "--wait=true")

    def refused() -> bool:
        pod = kubectl.get("pod", "cordon-probe", "default")
        if pod is None:
            apply(kubectl, probe)
            return False
        if pod["spec"].get("nodeName"):
            remove_probe()
            return False
        conds = (pod.get("status") or {}).get("conditions") or []
        return any(c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conds)

    try:
        wait_for(refused, 30, what="the scheduler to refuse a pod for the cordoned node")
    finally:
        kubectl.run("delete", "pod", "cordon-probe", "-n", "default", "--wait=false", check=False)


def test_inference_model_gets_owned_deployment_restored_and_garbage_collected(
    kubectl: Kubectl, operator: OperatorThread, fake_node: str
) -> None:
    """The Deployment's pods run on the kwok node (no container starts, but the workload
    controllers see them Ready): InferenceReady and the availability SLA follow the replicas."""
    spec = {"inference": {"enabled": True, "model": "builtin:ngram-384"}, "sla": {"availability": "99.9"}}
    apply(kubectl, product("with-model", **spec))
    dep = wait_for(
        lambda: kubectl.get("deployment", "with-model-inference", "default"), 60, what="inference Deployment"
    )
    svc = wait_for(lambda: kubectl.get("service", "with-model-inference", "default"), 30, what="inference Service")
    uid = kubectl.get("dp", "with-model", "default")["metadata"]["uid"]
    for obj in (dep, svc):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref["kind"] == "DataProduct" and ref["uid"] == uid and ref["controller"] is True
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "datamesh-operator"
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"] == ["datamesh", "inference-server"]

    def inference(status: str, message: str) -> dict[str, Any] | None:
        st = kubectl.get("dp", "with-model", "default").get("status") or {}
        conds = {c["type"]: c for c in st.get("conditions", [])}
        cond = conds.get("InferenceReady") or {}
        return st if cond.get("status") == status and message in cond.get("message", "") else None

    st = wait_for(lambda: inference("True", "1/1 replicas available"), 60, what="InferenceReady True")
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["phase"] == "Ready" and conds["InferenceReady"]["reason"] == "DeploymentAvailable"
    assert st["inferenceEndpoint"] == "http://with-model-inference.default.svc:8080"
    assert conds["SLAMet"]["status"] == "True" and st["sla"]["availabilityMet"] is True

    scaled = product("with-model", **{**spec, "inference": {**spec["inference"], "replicas": 3}})
    apply(kubectl, scaled)
    wait_for(lambda: inference("True", "3/3 replicas available"), 60, what="3 replicas available")

    # Drain the node: the pods go, their replacements cannot be scheduled, nothing is available.
    kubectl.run("cordon", fake_node)
    try:
        scheduler_sees_cordon(kubectl)
        kubectl.run("delete", "pods", "-n", "default", "-l", "app.kubernetes.io/instance=with-model-inference")
        st = wait_for(lambda: inference("False", "0/3 replicas available"), 60, what="InferenceReady False")
        assert st["phase"] == "Provisioning" and st["sla"]["availabilityMet"] is False
        assert "inference endpoint not available" in st["sla"]["message"]
    finally:
        kubectl.run("uncordon", fake_node)
    wait_for(lambda: inference("True", "3/3 replicas available"), 60, what="available again after uncordon")
    events = kubectl.json("get", "events", "-n", "default", "--field-selector", "involvedObject.name=with-model")
    reasons = [e["reason"] for e in events["items"]]
    assert "DeploymentProgressing" in reasons and "DeploymentAvailable" in reasons

    scaled_down = product("with-model", **{**spec, "inference": {**spec["inference"], "replicas": 0}})
    apply(kubectl, scaled_down)
    wait_for(lambda: inference("True", "scaled to zero replicas"), 60, what="scaled to zero")
    apply(kubectl, product("with-model", **spec))
    dep = wait_for(
        lambda: (
            inference("True", "1/1 replicas available") and kubectl.get("deployment", "with-model-inference", "default")
        ),
        60,
        what="back to one replica",
    )

    kubectl.run("delete", "deployment", "with-model-inference")
    restored = wait_for(
        lambda: (
            (d := kubectl.get("deployment", "with-model-inference", "default"))
            and d["metadata"]["uid"] != dep["metadata"]["uid"]
            and d
        ),
        30,
        what="Deployment restored",
    )
    assert restored["metadata"]["ownerReferences"][0]["uid"] == uid
    kubectl.run("scale", "deployment", "with-model-inference", "--replicas=3")
    wait_for(
        lambda: kubectl.get("deployment", "with-model-inference", "default")["spec"]["replicas"] == 1,
        30,
        what="replicas drift repaired",
    )

    alias = "default.with-model"
    assert operator.call(operator.store.exists(alias))
    delete(kubectl, "with-model")
    wait_for(
        lambda: kubectl.get("deployment", "with-model-inference", "default") is None,
        90,
        what="Deployment garbage-collected",
    )
    wait_for(
        lambda: kubectl.get("service", "with-model-inference", "default") is None, 90, what="Service garbage-collected"
    )
    assert not operator.call(operator.store.exists(alias))
    wait_for(lambda: "default.with-model" not in catalog(kubectl), 10, what="catalog entry removed")


def test_retain_keeps_the_collection(kubectl: Kubectl, operator: OperatorThread) -> None:
    apply(kubectl, product("retained", deletionPolicy="Retain"))
    ready(kubectl, "retained")
    delete(kubectl, "retained")
    assert operator.call(operator.store.count("default.retained")) == 5
    wait_for(lambda: "default.retained" not in catalog(kubectl), 10, what="catalog entry removed")
    operator.call(operator.store.drop_product("default.retained"))


def test_labels_edited_on_a_ready_product_log_nothing_and_a_spec_change_logs_its_reconcile(
    kubectl: Kubectl, operator: OperatorThread, caplog: pytest.LogCaptureFixture
) -> None:
    # kopf logs each handler call at INFO: a handler called on every watch event filled the log.
    caplog.set_level(logging.INFO, logger="kopf.objects")
    apply(kubectl, product("quiet"))
    generation = ready(kubectl, "quiet")["metadata"]["generation"]
    caplog.clear()
    for i in range(3):
        kubectl.run("label", "dp", "quiet", "-n", "default", f"touched=t{i}", "--overwrite")
    # A spec change after the labels: kopf handles one object's events in order, so once it is
    # reconciled the label events have been handled too.
    changed = product("quiet")
    changed["spec"]["description"] = "Synthetic product, described again."
    apply(kubectl, changed)
    wait_for(
        lambda: (b := ready(kubectl, "quiet")) and b["status"].get("observedGeneration") == generation + 1,
        60,
        what="the spec change reconciled",
    )
    lines = [r.getMessage() for r in caplog.records if getattr(r, "k8s_ref", {}).get("name") == "quiet"]
    assert any("reconcile_product" in line for line in lines), lines
    assert not [line for line in lines if "arrived" in line], "a handler ran (and logged) for each label edit"
    delete(kubectl, "quiet")


def test_model_change_reindexes_and_same_spec_writes_nothing(kubectl: Kubectl, operator: OperatorThread) -> None:
    apply(kubectl, product("reindex"))
    first = ready(kubectl, "reindex")["status"]
    old_index = first["indexCollection"]
    changed = product("reindex")
    changed["spec"]["semanticSearch"]["embeddingModel"] = "builtin:ngram-256"
    apply(kubectl, changed)
    st = wait_for(
        lambda: (s := ready(kubectl, "reindex")["status"]) and s["indexCollection"] != old_index and s,
        60,
        what="new index",
    )
    assert operator.call(operator.store.current_index("default.reindex")) == st["indexCollection"]
    assert st["vectorSize"] == 256
    assert (
        len(operator.call(operator.store.search("default.reindex", SearchRequest([1.0] + [0.0] * 255, "row", 1)))) == 1
    )
    assert not operator.call(operator.store.exists(old_index)), "the old index is dropped after the switch"
    assert operator.call(operator.store.count("default.reindex")) == 5
    events = kubectl.json("get", "events", "-n", "default", "--field-selector", "involvedObject.name=reindex")["items"]
    assert any(e["reason"] == "Reindexed" for e in events)

    # Re-applying the same spec, and a restart that re-runs every handler, write nothing.
    written = metrics.INGESTED_ROWS._value.get()
    apply(kubectl, changed)
    operator.stop()
    operator.start()
    ready(kubectl, "reindex")
    wait_for(lambda: operator.call(operator.store.count("default.reindex")) == 5, 10, what="points intact")
    assert metrics.INGESTED_ROWS._value.get() == written
    delete(kubectl, "reindex")


def test_bad_rows_are_counted_and_reported(kubectl: Kubectl, operator: OperatorThread) -> None:
    rows = [
        {"id": "a", "text": "fine", "amount": 1},
        {"id": "b", "text": "not a number", "amount": "twelve"},
        {"text": "no primary key", "amount": 3},
        {"id": "a", "text": "duplicate key", "amount": 4},
        {"id": "c", "text": "fine too", "amount": 5.5},
    ]
    # Three of five refused is far above the default 10 % a source may lose before it counts as broken.
    apply(kubectl, product("bad-rows", source={"inline": rows, "maxRejectedPercent": 80}))
    st = ready(kubectl, "bad-rows")["status"]
    assert st["records"] == 2 and st["rejectedRecords"] == 3
    ingested = next(c for c in st["conditions"] if c["type"] == "Ingested")
    assert ingested["reason"] == "IngestedWithRejects" and "amount" in ingested["message"]
    events = kubectl.json("get", "events", "-n", "default", "--field-selector", "involvedObject.name=bad-rows")["items"]
    rejected = [e for e in events if e["reason"] == "RowsRejected"]
    assert rejected and rejected[0]["type"] == "Warning" and "3 of 5 rows rejected" in rejected[0]["message"]
    delete(kubectl, "bad-rows")


def test_unreachable_url_and_endpoint_degrade_then_recover(kubectl: Kubectl, operator: OperatorThread) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = product(
        "flaky",
        source={"url": {"url": f"{url}/rows.csv", "format": "csv"}},
        inference={"enabled": True, "endpoint": f"{url}/v1"},
    )
    apply(kubectl, body)

    def degraded() -> dict[str, Any] | None:
        st = (kubectl.get("dp", "flaky", "default") or {}).get("status") or {}
        return st if st.get("phase") == "Degraded" else None

    st = wait_for(degraded, 60, what="Degraded")
    causes = {c["type"]: c for c in st["conditions"]}
    assert causes["Ingested"]["reason"] == "SourceUnavailable" and f"{port}" in causes["Ingested"]["message"]
    assert causes["InferenceReady"]["reason"] == "EndpointUnreachable"
    assert causes["Ready"]["status"] == "False"

    app = FastAPI()

    @app.get("/rows.csv", response_class=PlainTextResponse)
    def rows() -> str:
        return "id,text,amount\nx1,parcel arrived late,1\nx2,customs hold,2\n"

    @app.get("/v1")
    def v1() -> dict[str, str]:
        return {"ok": "yes"}

    with ServerThread(app, port=port):
        st = ready(kubectl, "flaky", timeout=60)["status"]
    assert st["records"] == 2
    assert st["inferenceEndpoint"] == f"{url}/v1"
    delete(kubectl, "flaky")


def test_operator_restart_mid_reconcile_loses_and_duplicates_nothing(
    kubectl: Kubectl, operator: OperatorThread, caplog: pytest.LogCaptureFixture
) -> None:
    names = [f"restart-{i:02d}" for i in range(20)]
    bodies = [
        product(n, [{"id": f"{n}-{j}", "text": f"{n} note {j} about delayed trucks", "amount": j} for j in range(30)])
        for n in names
    ]
    apply(kubectl, *bodies)
    # Stop as soon as the first product is reconciled: the rest are mid-flight or untouched.
    wait_for(lambda: any(phase(kubectl, n) for n in names[:5]), 60, what="first reconciles")
    operator.stop()
    operator.start()
    for n in names:
        st = ready(kubectl, n, timeout=120)["status"]
        assert st["records"] == 30
        assert operator.call(operator.store.count(f"default.{n}")) == 30
    entries = wait_for(
        lambda: (c := catalog(kubectl)) and all(f"default.{n}" in c for n in names) and c, 15, what="catalog complete"
    )
    assert all(entries[f"default.{n}"]["phase"] == "Ready" for n in names)
    # Stopped again with every product Ready: each product's periodic checks end quietly (kopf
    # logged "Daemon 'resync' is cancelled. Will escalate." for every one of them).
    caplog.set_level(logging.INFO, logger="kopf")
    caplog.clear()
    operator.stop()
    operator.start()
    stopped = [r for r in caplog.records if "resync'" in r.getMessage()]  # kopf names it by its qualified name
    assert stopped, "no daemon stopped: the operator had no product to check"
    assert [r.getMessage() for r in stopped if r.levelno >= logging.WARNING] == []
    kubectl.run("delete", "dp", *names, "--timeout=120s")


def test_300_products_coalesce_catalog_writes(kubectl: Kubectl, operator: OperatorThread) -> None:
    names = [f"bulk-{i:03d}" for i in range(300)]
    watcher = subprocess.Popen(
        [
            str(kubectl.binary),
            "--kubeconfig",
            str(kubectl.kubeconfig),
            "get",
            "configmaps",
            "-n",
            PLATFORM_NAMESPACE,
            "-l",
            f"{CATALOG_LABEL}=true",
            "--watch-only",
            "--output-watch-events",
            "-o",
            "json",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    # One watch event per line, one event per write of a catalog ConfigMap.
    event_types: list[str] = []
    reader = threading.Thread(
        target=lambda: event_types.extend(json.loads(line)["type"] for line in watcher.stdout if line.strip()),
        daemon=True,
    )
    reader.start()
    try:
        template = product("x", [{"id": "1", "text": "one row", "amount": 1}])
        bodies = []
        for n in names:
            b = copy.deepcopy(template)
            b["metadata"]["name"] = n
            bodies.append(b)
        apply(kubectl, *bodies)
        wait_for(
            lambda: (
                sum(
                    1
                    for k, e in catalog(kubectl).items()
                    if k.startswith("default.bulk-") and e.get("phase") == "Ready"
                )
                == 300
            ),
            300,
            interval=2,
            what="300 Ready catalog entries",
        )
    finally:
        watcher.terminate()
        watcher.wait(10)
        reader.join(5)
    modified = sum(1 for kind in event_types if kind in ("ADDED", "MODIFIED"))
    print(f"catalog ConfigMap writes for 300 products: {modified}")
    assert 0 < modified < 100, f"{modified} catalog writes for 300 products"
    kubectl.run("delete", "dp", "-n", "default", "-l", "!nonexistent", "--timeout=300s", "--wait=false")


def test_config_map_source_refresh_removes_gone_rows_and_sla_breach(kubectl: Kubectl, operator: OperatorThread) -> None:
    def config_map(rows: str) -> None:
        manifest = kubectl.run(
            "create",
            "configmap",
            "cm-rows",
            "-n",
            "default",
            f"--from-literal=rows.csv={rows}",
            "--dry-run=client",
            "-o",
            "yaml",
        ).stdout
        kubectl.run("apply", "-f", "-", input=manifest)

    config_map(
        "id,text,amount\nc1,refund requested for late delivery,1\nc2,wrong item shipped,2\nc3,box arrived crushed,3\n"
    )
    body = product(
        "from-cm",
        source={"configMapRef": {"name": "cm-rows", "key": "rows.csv", "format": "csv"}, "refreshInterval": "2s"},
        sla={"freshness": "1h"},
    )
    apply(kubectl, body)
    st = ready(kubectl, "from-cm")["status"]
    assert st["records"] == 3
    first_ingest = st["lastIngestedAt"]

    config_map("id,text,amount\nc1,refund requested for late delivery,1\nc3,box arrived crushed,3\n")
    st = wait_for(
        lambda: (s := kubectl.get("dp", "from-cm", "default")["status"]) and s["records"] == 2 and s,
        60,
        what="refresh to drop c2",
    )
    assert operator.call(operator.store.count("default.from-cm")) == 2
    assert st["lastIngestedAt"] >= first_ingest
    sla = next(c for c in st["conditions"] if c["type"] == "SLAMet")
    assert sla["status"] == "True" and st["sla"]["freshnessMet"] is True

    # An objective that cannot be met: freshness shorter than the time since the last ingestion.
    stale = product("stale", sla={"freshness": "1s"})
    stale["spec"]["source"] = {"configMapRef": {"name": "cm-rows", "key": "rows.csv", "format": "csv"}}
    apply(kubectl, stale)
    ready(kubectl, "stale")

    def breached() -> dict[str, Any] | None:
        st = kubectl.get("dp", "stale", "default")["status"]
        cond = next((c for c in st["conditions"] if c["type"] == "SLAMet"), None)
        return st if cond and cond["status"] == "False" else None

    st = wait_for(breached, 30, what="SLAMet False")
    assert st["phase"] == "Ready", "an SLA breach is reported, it does not make the product unready"
    assert "freshness objective" in st["sla"]["message"] and st["sla"]["freshnessMet"] is False
    assert metrics.SLA_BREACHES.labels(namespace="default", name="stale", objective="freshness")._value.get() == 1
    delete(kubectl, "from-cm")
    delete(kubectl, "stale")
    kubectl.run("delete", "configmap", "cm-rows", "-n", "default")


def test_missing_config_map_degrades_then_recovers(kubectl: Kubectl, operator: OperatorThread) -> None:
    apply(
        kubectl,
        product("needs-cm", source={"configMapRef": {"name": "cm-later", "key": "rows.jsonl", "format": "jsonl"}}),
    )
    st = wait_for(
        lambda: (
            (s := (kubectl.get("dp", "needs-cm", "default") or {}).get("status") or {})
            and s.get("phase") == "Degraded"
            and s
        ),
        60,
        what="Degraded",
    )
    assert "cm-later" in next(c for c in st["conditions"] if c["type"] == "Ingested")["message"]
    kubectl.run(
        "create",
        "configmap",
        "cm-later",
        "-n",
        "default",
        '--from-literal=rows.jsonl={"id": "j1", "text": "invoice paid twice", "amount": 9}',
    )
    assert ready(kubectl, "needs-cm")["status"]["records"] == 1
    delete(kubectl, "needs-cm")
    kubectl.run("delete", "configmap", "cm-later", "-n", "default")


def test_catalog_is_rebuilt_on_start(kubectl: Kubectl, operator: OperatorThread) -> None:
    apply(kubectl, product("survivor"))
    ready(kubectl, "survivor")
    wait_for(lambda: "default.survivor" in catalog(kubectl), 10, what="entry")
    cm = kubectl.json("get", "configmaps", "-n", PLATFORM_NAMESPACE, "-l", f"{CATALOG_LABEL}=true")["items"][0]
    ghost = json.dumps(
        {"namespace": "default", "name": "ghost", "domain": "x", "description": "deleted while the operator was down"}
    )
    kubectl.run(
        "patch",
        "configmap",
        cm["metadata"]["name"],
        "-n",
        PLATFORM_NAMESPACE,
        "--type=merge",
        "-p",
        json.dumps({"data": {"default.ghost": ghost}}),
    )
    operator.stop()
    operator.start()
    entries = wait_for(
        lambda: (c := catalog(kubectl)) and "default.ghost" not in c and c, 30, what="ghost entry removed"
    )
    assert "default.survivor" in entries
    delete(kubectl, "survivor")


async def _two_writers(kubeconfig: Path) -> list[dict[str, Any]]:
    import asyncio as aio

    from datamesh.adapters.kube import ConfigMapCatalogBackend, Kube, api_client
    from datamesh.engine.catalog_writer import CatalogWriter

    kube = Kube(await api_client())
    try:
        writers = [
            CatalogWriter(ConfigMapCatalogBackend(kube, "shard-test", "shard"), "shard", 6_000, 0.05) for _ in range(2)
        ]
        from tests.unit.test_catalog import entry

        # Two writers race on the same ConfigMaps: resourceVersion conflicts are retried, nothing lost.
        await aio.gather(*(writers[i % 2].upsert(entry(i, "y" * 500)) for i in range(60)))
        result = await kube.core.list_namespaced_config_map("shard-test", label_selector=f"{CATALOG_LABEL}=true")
        return [kube.api.sanitize_for_serialization(cm) for cm in result.items]
    finally:
        await kube.close()


def test_catalog_shards_across_config_maps_without_losing_writes(kubectl: Kubectl, kubeconfig: Path) -> None:
    import asyncio as aio

    kubectl.run("create", "namespace", "shard-test")
    try:
        cms = aio.run(_two_writers(kubeconfig))
        keys = [k for cm in cms for k in (cm.get("data") or {})]
        assert sorted(keys) == sorted({f"ns.p{i:04d}" for i in range(60)}), "every entry exactly once"
        assert len(cms) >= 5
        assert all(sum(len(k) + len(v) for k, v in (cm.get("data") or {}).items()) <= 6_000 for cm in cms)
    finally:
        kubectl.run("delete", "namespace", "shard-test", "--wait=false")


async def _stale_and_missing(kubeconfig: Path) -> tuple[str, str, str, list[tuple[str, str, bool]]]:
    from datamesh.adapters.kube import ConfigMapCatalogBackend, Kube, api_client
    from datamesh.core.ports import CatalogUnavailable, Conflict, Shard

    kube = Kube(await api_client())
    try:
        backend = ConfigMapCatalogBackend(kube, "shard-stale", "stale")
        await backend.write_shard(Shard("stale-0", {"ns.a": "{}"}, None))
        first = await backend.read_shard("stale-0")
        await backend.write_shard(Shard("stale-0", {"ns.a": "{}", "ns.b": "{}"}, first.version))
        try:  # the version the first write replaced: the API server refuses it
            await backend.write_shard(Shard("stale-0", {"ns.c": "{}"}, first.version))
            conflict = "written"
        except Conflict as exc:
            conflict = f"Conflict: {exc}"
        try:
            await ConfigMapCatalogBackend(kube, "no-such-namespace", "x").write_shard(Shard("x-0", {}, None))
            missing = "written"
        except CatalogUnavailable as exc:
            missing = str(exc)
        kept = await backend.read_shard("stale-0")
        await backend.write_shard(Shard("stale-1", {"ns.d": "{}"}, None))
        listed = [(s.name, ",".join(sorted(s.data)), s.version == kept.version) for s in await backend.list_shards()]
        return conflict, missing, ",".join(sorted(kept.data)), sorted(listed)
    finally:
        await kube.close()


def test_a_stale_catalog_write_is_a_conflict_and_a_failed_one_says_why(kubectl: Kubectl, kubeconfig: Path) -> None:
    """Catalog writes do not parse the API server's answer (the whole shard again): its status still counts.

    Shards are read and listed as JSON (orjson), not through the client's models: the listing must
    give what a read gives, resourceVersion included.
    """
    import asyncio as aio

    kubectl.run("create", "namespace", "shard-stale")
    try:
        conflict, missing, kept, listed = aio.run(_stale_and_missing(kubeconfig))
        assert conflict.startswith("Conflict: writing ConfigMap shard-stale/stale-0")
        assert "HTTP 404" in missing and 'namespaces "no-such-namespace" not found' in missing
        assert kept == "ns.a,ns.b", "the refused write changed nothing"
        # The start-up listing sees what a read sees, versions included (its next write must not conflict).
        assert listed == [("stale-0", "ns.a,ns.b", True), ("stale-1", "ns.d", False)]
    finally:
        kubectl.run("delete", "namespace", "shard-stale", "--wait=false")
