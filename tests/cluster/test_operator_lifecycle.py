"""The operator on the real control plane: status, generations, finalizer."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from datamesh.resource.models import DataProductStatus
from tests.harness import Kubectl, OperatorThread, wait_for

REPO = Path(__file__).resolve().parents[2]


def _manifest(name: str, namespace: str = "default") -> str:
    doc = yaml.safe_load((REPO / "examples" / "sales-customer-churn.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    return yaml.safe_dump(doc)


def test_apply_edit_delete(kubectl: Kubectl, operator: OperatorThread) -> None:
    kubectl.run("apply", "-f", "-", input=_manifest("lifecycle"))

    def reconciled() -> dict | None:
        dp = kubectl.get("dp", "lifecycle", "default")
        st = dp.get("status") or {}
        return dp if st.get("phase") and st.get("observedGeneration") == dp["metadata"]["generation"] else None

    dp = wait_for(reconciled, 60, what="a phase and observedGeneration")
    assert dp["metadata"]["generation"] == 1
    types = {c["type"]: c for c in dp["status"]["conditions"]}
    assert {"CollectionReady", "Ingested", "InferenceReady", "Cataloged", "Ready"} <= set(types)
    for c in types.values():
        assert c["status"] in ("True", "False", "Unknown") and c["reason"] and c["lastTransitionTime"]
    assert "datamesh.io/finalizer" in dp["metadata"]["finalizers"]
    # Handler return values and kopf's bookkeeping stay out of status.
    assert set(dp["status"]) <= {f.alias or name for name, f in DataProductStatus.model_fields.items()}
    assert not [k for k in dp["metadata"].get("annotations", {}) if k.startswith("kopf.zalando.org")]
    ready_since = types["Ready"]["lastTransitionTime"]

    time.sleep(1.1)  # lastTransitionTime has second resolution
    kubectl.run("patch", "dp", "lifecycle", "--type=merge", "-p", '{"spec": {"tags": ["churn", "edited"]}}')
    dp = wait_for(
        lambda: (d := reconciled()) and d["metadata"]["generation"] == 2 and d, 60, what="generation 2 observed"
    )
    assert dp["status"]["observedGeneration"] == 2
    ready = next(c for c in dp["status"]["conditions"] if c["type"] == "Ready")
    assert ready["observedGeneration"] == 2
    assert ready["lastTransitionTime"] == ready_since, "Ready did not change, so its transition time must not"

    events = kubectl.json("get", "events", "-n", "default", "--field-selector", "involvedObject.name=lifecycle")[
        "items"
    ]
    assert events, "transitions must be posted as Events"

    started = time.monotonic()
    kubectl.run("delete", "dp", "lifecycle", "--timeout=30s")
    assert kubectl.get("dp", "lifecycle", "default") is None
    assert time.monotonic() - started < 15
