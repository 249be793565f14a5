"""An http source down, then up: a burst of products goes Degraded naming the URL, then Ready by itself."""

from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from datamesh.web.serving import free_port
from tests.faults.helpers import (
    apply_all,
    assert_no_duplicates,
    create_namespace,
    delete_namespace_products,
    products,
    statuses,
    wait_all_ready,
)
from tests.harness import Kubectl, OperatorThread, wait_for
from tests.httpserver import ServerThread

NS = "faults-url"
COUNT = 40


def test_products_of_a_source_that_is_down_degrade_naming_it_and_recover_when_it_is_back(
    kubectl: Kubectl, operator: OperatorThread
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/rows.csv"
    create_namespace(kubectl, NS)
    try:
        apply_all(kubectl, products(NS, COUNT, source={"url": {"url": url, "format": "csv"}}))

        def all_degraded() -> bool:
            found = statuses(kubectl, NS)
            return len(found) == COUNT and all(
                (dp.get("status") or {}).get("phase") == "Degraded" for dp in found.values()
            )

        wait_for(all_degraded, 120, interval=1.0, what=f"{COUNT} products Degraded")
        for name, dp in statuses(kubectl, NS).items():
            conditions = {c["type"]: c for c in dp["status"]["conditions"]}
            assert conditions["Ingested"]["reason"] == "SourceUnavailable", name
            assert url in conditions["Ingested"]["message"] and url in conditions["Ready"]["message"], name
            collection = conditions["CollectionReady"]["message"]
            index = dp["status"].get("indexCollection") or collection.split()[0]
            assert collection.count(index) == 1, f"{name}: {collection}"
        events = kubectl.json("get", "events", "-n", NS, "--field-selector", "reason=SourceUnavailable")["items"]
        assert events and all(url in e["message"] for e in events)

        app = FastAPI()

        @app.get("/rows.csv", response_class=PlainTextResponse)
        def rows() -> str:
            return "id,text,amount\nx1,parcel arrived late,1\nx2,customs hold at the border,2\n"

        with ServerThread(app, port=port):
            back = time.monotonic()
            found = wait_all_ready(kubectl, NS, COUNT, timeout=120)
            print(f"\n{COUNT} products Ready {time.monotonic() - back:.1f} s after their source came back")
        assert all(dp["status"]["records"] == 2 for dp in found.values())
        assert_no_duplicates(kubectl, operator, NS)
    finally:
        delete_namespace_products(kubectl, NS)
