"""Permanent errors end in Failed with a reason a user can act on, and an Event; never a crash loop."""

from __future__ import annotations

from tests.cluster.test_reconcile_cluster import apply, delete, product
from tests.harness import Kubectl, OperatorThread, wait_for


def test_unknown_embedding_model_fails_with_an_actionable_reason(kubectl: Kubectl, operator: OperatorThread) -> None:
    body = product("unknown-model")
    body["spec"]["semanticSearch"]["embeddingModel"] = "mystery:model-9000"
    apply(kubectl, body)

    def failed() -> dict | None:
        st = (kubectl.get("dp", "unknown-model", "default") or {}).get("status") or {}
        return st if st.get("phase") == "Failed" else None

    st = wait_for(failed, 60, what="Failed")
    cond = next(c for c in st["conditions"] if c["type"] == "CollectionReady")
    assert cond["reason"] == "UnknownEmbeddingModel" and "mystery:model-9000" in cond["message"]
    assert "builtin:ngram" in cond["message"], "the message lists the accepted model forms"
    events = kubectl.json("get", "events", "-n", "default", "--field-selector", "involvedObject.name=unknown-model")[
        "items"
    ]
    assert any(e["type"] == "Warning" and e["reason"] == "UnknownEmbeddingModel" for e in events)

    # Fixing the spec recovers the product without any restart.
    body["spec"]["semanticSearch"]["embeddingModel"] = "builtin:ngram-384"
    apply(kubectl, body)
    wait_for(
        lambda: (kubectl.get("dp", "unknown-model", "default").get("status") or {}).get("phase") == "Ready",
        60,
        what="Ready after the fix",
    )
    delete(kubectl, "unknown-model")


def test_resync_timer_writes_nothing_when_nothing_changed(kubectl: Kubectl, operator: OperatorThread) -> None:
    """The SLA/refresh timer (every 5 s in tests) must not patch an unchanged product."""
    import time

    from tests.cluster.test_reconcile_cluster import ready

    apply(kubectl, product("quiet"))
    ready(kubectl, "quiet")
    time.sleep(6)  # let the first timer tick settle anything pending
    before = kubectl.get("dp", "quiet", "default")["metadata"]["resourceVersion"]
    time.sleep(11)  # two more ticks
    assert kubectl.get("dp", "quiet", "default")["metadata"]["resourceVersion"] == before
    delete(kubectl, "quiet")
