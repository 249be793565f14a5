"""Deleting a broken product always completes: kubectl delete returns, nothing of the product is left.

Every kind of broken product: Failed (an unknown model; every row refused), Degraded (a url
source nobody answers), stuck mid-ingestion (a url source that accepts and never answers), and
never reconciled (applied while the operator was down). After ``kubectl delete`` returns, the
object is gone (the finalizer removed), and so are its catalog entry and its collection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from datamesh.web.serving import free_port
from tests.cluster.test_reconcile_cluster import product
from tests.faults.helpers import catalog_keys, create_namespace, kubectl_delete
from tests.harness import Kubectl, OperatorThread, wait_for

NS = "faults-delete"
DELETE_BOUND_S = 45.0


@contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers: an ingestion stuck on its source."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def in_ns(body: dict[str, Any]) -> dict[str, Any]:
    body["metadata"]["namespace"] = NS
    return body


def apply(kubectl: Kubectl, body: dict[str, Any]) -> None:
    kubectl.run("apply", "-f", "-", input=yaml.safe_dump(in_ns(body)))


def phase_is(kubectl: Kubectl, name: str, *phases: str) -> dict[str, Any] | None:
    dp = kubectl.get("dp", name, NS) or {}
    return dp if (dp.get("status") or {}).get("phase") in phases else None


def assert_gone(kubectl: Kubectl, operator: OperatorThread, name: str) -> None:
    assert kubectl.get("dp", name, NS) is None, f"{name} still exists"
    assert catalog_keys(kubectl)[f"{NS}.{name}"] == 0, f"{name} is still in the catalog"
    assert not operator.call(operator.store.exists(f"{NS}.{name}")), f"the collection of {name} is still there"


def test_every_kind_of_broken_product_is_deleted_within_a_bound(kubectl: Kubectl, operator: OperatorThread) -> None:
    create_namespace(kubectl, NS)
    bad_model = product("bad-model")
    bad_model["spec"]["semanticSearch"]["embeddingModel"] = "nosuch:model"
    refused = product("all-refused", [{"id": f"r{i}", "text": "fine", "amount": "not a number"} for i in range(5)])
    unreachable = product(
        "unreachable", source={"url": {"url": f"http://127.0.0.1:{free_port()}/r.csv", "format": "csv"}}
    )
    timings: dict[str, float] = {}
    with silent_server() as port:
        stuck = product("stuck", source={"url": {"url": f"http://127.0.0.1:{port}/r.csv", "format": "csv"}})
        for body in (bad_model, refused, unreachable, stuck):
            apply(kubectl, body)
        wait_for(lambda: phase_is(kubectl, "bad-model", "Failed"), 60, what="bad-model Failed")
        wait_for(lambda: phase_is(kubectl, "all-refused", "Failed"), 60, what="all-refused Failed")
        wait_for(lambda: phase_is(kubectl, "unreachable", "Degraded"), 60, what="unreachable Degraded")
        # The stuck one is deleted while its ingestion waits on a source that never answers.
        wait_for(lambda: phase_is(kubectl, "stuck", "Pending"), 30, what="stuck seen by the operator")
        for name in ("stuck", "bad-model", "all-refused", "unreachable"):
            timings[name] = kubectl_delete(kubectl, NS, name, DELETE_BOUND_S)
            assert_gone(kubectl, operator, name)

    # Applied while the operator is down: no finalizer yet, deleted at once; the next run knows nothing of it.
    operator.stop()
    try:
        apply(kubectl, product("never-reconciled"))
        timings["never-reconciled"] = kubectl_delete(kubectl, NS, "never-reconciled", DELETE_BOUND_S)
    finally:
        operator.start()
    assert_gone(kubectl, operator, "never-reconciled")
    print("\nkubectl delete returned after (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
