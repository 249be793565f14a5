"""The catalog writer: coalescing, sharding under the ConfigMap limit, removal, rebuild."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from datamesh.adapters.files import FileCatalogBackend, read_catalog_file
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.resource.catalog import CatalogEntry, card_text, decode_entries, entry_of_object
from datamesh.resource.models import DataProductSpec


def entry(i: int, description: str = "A product used by the catalog tests.") -> CatalogEntry:
    return CatalogEntry(namespace="ns", name=f"p{i:04d}", domain="test", description=description, phase="Ready")


async def test_concurrent_changes_become_one_write(tmp_path: Path) -> None:
    writer = CatalogWriter(
        FileCatalogBackend(tmp_path / "catalog.json"), "cat", shard_bytes=10_000_000, flush_seconds=0.05
    )
    await asyncio.gather(*(writer.upsert(entry(i)) for i in range(200)))
    assert writer.writes == 1
    assert len(read_catalog_file(tmp_path / "catalog.json")) == 200


async def test_an_entry_already_in_the_catalog_is_not_written_again_but_one_removed_by_hand_is(
    tmp_path: Path,
) -> None:
    """Periodic checks put every product's entry back: unchanged ones must not rewrite the shard."""
    path = tmp_path / "catalog.json"
    writer = CatalogWriter(FileCatalogBackend(path), "cat", shard_bytes=10_000_000, flush_seconds=0.0)
    await asyncio.gather(*(writer.upsert(entry(i)) for i in range(3)))
    assert writer.writes == 1
    stamp = path.stat().st_mtime_ns
    await writer.upsert(entry(1))
    await writer.remove("ns.p0099")  # not there either
    assert writer.writes == 1 and path.stat().st_mtime_ns == stamp, "nothing changed, nothing written"
    await writer.upsert(entry(1, "A changed description."))
    assert writer.writes == 2 and read_catalog_file(path)["ns.p0001"].description == "A changed description."
    doc = json.loads(path.read_text())
    for shard in doc.values():
        shard.pop("ns.p0002", None)
    path.write_text(json.dumps(doc))  # an entry deleted by hand
    await writer.upsert(entry(2))
    assert writer.writes == 3 and "ns.p0002" in read_catalog_file(path), "a check writes a lost entry again"


async def test_shards_stay_under_the_limit_and_removal_works(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    writer = CatalogWriter(FileCatalogBackend(path), "cat", shard_bytes=20_000, flush_seconds=0.01)
    big = "x" * 900
    await asyncio.gather(*(writer.upsert(entry(i, big)) for i in range(100)))
    doc = json.loads(path.read_text())
    assert len(doc) >= 5, "100 entries of ~1 KiB must spread over several 20 kB shards"
    for shard in doc.values():
        assert sum(len(k) + len(v) for k, v in shard.items()) <= 20_000
    assert len(read_catalog_file(path)) == 100
    await writer.remove("ns.p0003")
    assert "ns.p0003" not in read_catalog_file(path) and len(read_catalog_file(path)) == 99


async def test_replace_all_drops_entries_of_products_that_are_gone(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    first = CatalogWriter(FileCatalogBackend(path), "cat", 100_000, 0.01)
    await asyncio.gather(*(first.upsert(entry(i)) for i in range(10)))
    restarted = CatalogWriter(FileCatalogBackend(path), "cat", 100_000, 0.01)
    await restarted.replace_all([entry(1), entry(2)])
    assert sorted(read_catalog_file(path)) == ["ns.p0001", "ns.p0002"]


def test_card_carries_what_routing_needs() -> None:
    spec = DataProductSpec.model_validate(
        {
            "domain": "sales",
            "description": "Why B2B customers cancel.",
            "tags": ["churn"],
            "schema": {"fields": [{"name": "churn_reason", "description": "Reason given at cancellation"}]},
        }
    )
    card = card_text("sales", "customer-churn", spec)
    assert "customer churn" in card and "Why B2B customers cancel." in card
    assert "churn reason Reason given at cancellation" in card and "churn" in card


def test_an_entry_from_a_newer_operator_is_read_not_dropped() -> None:
    """The wire format is versioned and tolerant: unknown keys (at any level) are ignored."""
    newer = {
        "format": 2,
        "namespace": "sales",
        "name": "customer-churn",
        "domain": "sales",
        "description": "Why B2B customers cancel.",
        "sla": {"freshness": "24h", "errorBudget": "0.1%"},
        "fields": [{"name": "id", "type": "uuid", "primaryKey": True, "masking": "hash"}],
        "lineage": {"upstream": ["crm.accounts"]},
    }
    (entry,) = decode_entries({"sales.customer-churn": json.dumps(newer)}).values()
    assert entry.product == "sales/customer-churn" and entry.primary_key == ["id"]
    assert entry.sla is not None and entry.sla.freshness == "24h"


def test_an_entry_keeps_every_condition_and_the_messages_of_those_not_true() -> None:
    """Every condition is listed (the catalog page shows them); only one that is not True keeps its message, briefly."""
    spec = {"domain": "sales", "description": "Why B2B customers cancel.", "schema": {"fields": [{"name": "id"}]}}
    at = "2026-01-01T00:00:00Z"
    conditions = [
        {"type": "CollectionReady", "status": "True", "reason": "Created", "message": "ok", "lastTransitionTime": at},
        {
            "type": "InferenceReady",
            "status": "False",
            "reason": "Unreachable",
            "message": "x" * 5000,
            "lastTransitionTime": at,
        },
        {"type": "SLAMet", "status": "Unknown", "reason": "NotChecked", "message": "", "lastTransitionTime": at},
        {
            "type": "Ready",
            "status": "False",
            "reason": "Degraded",
            "message": "restates the others",
            "lastTransitionTime": at,
        },
    ]
    body = {"metadata": {"name": "churn", "namespace": "sales"}, "spec": spec, "status": {"conditions": conditions}}
    entry = entry_of_object(body)
    assert entry is not None
    assert [(c.type, c.status, c.reason) for c in entry.conditions] == [
        ("CollectionReady", "True", "Created"),
        ("InferenceReady", "False", "Unreachable"),
        ("SLAMet", "Unknown", "NotChecked"),
        ("Ready", "False", "Degraded"),
    ]
    messages = [c.message for c in entry.conditions]
    assert messages == [None, "x" * 300, None, "restates the others"], "a True condition's message only ages"
