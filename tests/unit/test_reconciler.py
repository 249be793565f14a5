"""The Reconciler over in-memory ports: what a user sees in status, events and the catalog.

Fast and without a cluster. The store is the real embedded store and the catalog a real file;
only the row loader, the endpoint probe and the inference backend are small fakes, because
they stand for a ConfigMap, a remote server and a Deployment that do not exist here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.files import FileCatalogBackend, read_catalog_file
from datamesh.adapters.sources import RowsInMemory
from datamesh.adapters.stores import open_store
from datamesh.core.conditions import Check, ConditionType
from datamesh.core.plan import (
    DIGEST_KEY,
    ROUTING_PREFIX,
    CollectionPlan,
    card_point_id,
    collection_plan,
    routing_fields,
    routing_plan,
)
from datamesh.core.ports import SearchRequest, SourceError, VectorStore
from datamesh.core.rows import Row
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.engine.ingest import KEEP_ROWS
from datamesh.engine.reconciler import Outcome, Ports, Reconciler
from datamesh.resource.models import CollectionLayout, Inference, Source, parse_spec
from datamesh.settings import OperatorSettings, StoreSettings

SMALL = "builtin:ngram-128"
ROWS = [
    {"id": "a", "reason": "price went up at renewal"},
    {"id": "b", "reason": "moved to a competitor after the merger"},
    {"id": "c", "reason": "missing single sign-on"},
]


@dataclass
class FakeRows:
    """Rows of every product's source, or the error reading them raises."""

    rows: list[Row] = field(default_factory=lambda: [dict(r) for r in ROWS])
    error: SourceError | None = None
    reads: int = 0

    passes: int = 0  # times an ingestion started reading the rows from their beginning

    async def __call__(self, source: Source, namespace: str) -> RowsInMemory:
        self.reads += 1
        if self.error is not None:
            raise self.error
        return _CountedRows(self, [dict(r) for r in self.rows])


class _CountedRows(RowsInMemory):
    def __init__(self, owner: FakeRows, rows: list[Row]) -> None:
        super().__init__(rows)
        self.owner = owner

    def batches(self, size: int) -> Iterator[list[Row]]:
        self.owner.passes += 1
        return super().batches(size)


@dataclass
class FakeProbe:
    """An endpoint that answers unless ``down`` says why not."""

    down: str | None = None

    async def __call__(self, url: str) -> str | None:
        return self.down


@dataclass
class FakeInference:
    """A deploying backend whose runtime is available when ``available`` is set."""

    available: bool = True
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def ensure(self, namespace: str, name: str, uid: str, spec: Inference) -> tuple[Check, str | None]:
        self.calls.append((namespace, name))
        url = f"http://{name}-inference.{namespace}.svc:{spec.port}"
        return Check(ConditionType.inference_ready, self.available, "Deployed" if self.available else "Waiting"), url


@dataclass
class World:
    reconciler: Reconciler
    store: VectorStore
    catalog_path: Path
    rows: FakeRows
    probe: FakeProbe
    inference: FakeInference
    progress: list[tuple[int, int]]

    async def reconcile(self, body: Mapping[str, Any], **kwargs: Any) -> Outcome:
        outcome = await self.reconciler.reconcile(body, **kwargs)
        assert outcome is not None
        return outcome


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    settings = OperatorSettings(
        catalog_flush_seconds=0.0, retry_base_seconds=2.0, retry_max_seconds=60.0, metrics_port=0
    )
    store = open_store(StoreSettings(url=None, path=":memory:"))
    catalog = CatalogWriter(FileCatalogBackend(tmp_path / "catalog.json"), "catalog", 100_000, 0.0)
    rows, probe, inference = FakeRows(), FakeProbe(), FakeInference()
    reports: list[tuple[int, int]] = []

    async def progress(namespace: str, name: str, done: int, total: int) -> None:
        reports.append((done, total))

    ports = Ports(store, catalog, resolve_provider, rows, probe, inference, progress=progress)
    yield World(Reconciler(settings, ports), store, tmp_path / "catalog.json", rows, probe, inference, reports)
    await catalog.close()
    await store.close()


def product(
    name: str = "churn", generation: int = 1, status: Mapping[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"namespace": "sales", "name": name, "uid": f"uid-{name}", "generation": generation},
        "spec": {
            "domain": "sales",
            "description": "Why customers cancel, in their own words.",
            "schema": {"fields": [{"name": "id", "primaryKey": True}, {"name": "reason"}]},
            "source": {"inline": ROWS},
            # The tiny lexical model: these tests are about reconciling, not about what vectors mean.
            "semanticSearch": {"keyFields": ["reason"], "embeddingModel": "builtin:ngram-384"},
            **spec,
        },
    }
    if status is not None:
        body["status"] = dict(status)
    return body


def routing_of(body: Mapping[str, Any]) -> CollectionPlan:
    """The routing collection a product's rows and card go to."""
    spec = parse_spec(body)
    assert spec is not None and spec.semantic_search is not None
    plan = collection_plan(body["metadata"]["namespace"], body["metadata"]["name"], spec, 384)
    return routing_plan(plan, spec.semantic_search.embedding_model, None)


def conditions(outcome: Outcome) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in outcome.status.conditions}


def wire(outcome: Outcome) -> dict[str, Any]:
    return outcome.status.model_dump(by_alias=True, mode="json")


async def test_a_new_product_becomes_ready_with_its_rows_searchable_and_cataloged(world: World) -> None:
    outcome = await world.reconcile(product())
    assert outcome.status.phase == "Ready" and outcome.retry_after is None
    assert {t: s for t, (s, _, _) in conditions(outcome).items()} == {
        "CollectionReady": "True",
        "Ingested": "True",
        "InferenceReady": "True",
        "Cataloged": "True",
        "SLAMet": "True",
        "Ready": "True",
    }
    assert outcome.status.records == 3 and outcome.points_written == 3
    assert outcome.status.collection == "sales.churn" and outcome.status.index_collection.startswith("sales.churn--")
    (vector,) = await resolve_provider("builtin:ngram-384").embed(["competitor merger"])
    hits = await world.store.search("sales.churn", SearchRequest(vector, "competitor merger", 1))
    assert hits[0].payload["id"] == "b"
    entry = read_catalog_file(world.catalog_path)["sales.churn"]
    assert entry.phase == "Ready" and entry.collection == "sales.churn" and entry.records == 3
    # The entry shows the status the product got, Cataloged and Ready included; True needs no message.
    assert [(c.type, c.status, c.message) for c in entry.conditions] == [
        (t, s, None) for t, (s, _, _) in conditions(outcome).items()
    ]
    assert entry.sla_met is None, "no freshness or availability objective: nothing to meet"


async def test_an_unchanged_product_is_not_read_or_written_again(world: World) -> None:
    first = await world.reconcile(product())
    again = await world.reconcile(product(status=wire(first)))
    assert again.points_written == 0 and world.rows.reads == 1
    assert again.status.phase == "Ready" and again.events == []
    assert again.status.conditions == first.status.conditions, "lastTransitionTime holds while nothing changes"


async def test_a_refresh_rereads_the_source_and_removes_rows_that_left_it(world: World) -> None:
    first = await world.reconcile(product())
    world.rows.rows = world.rows.rows[:2]
    refreshed = await world.reconcile(product(status=wire(first)), refresh=True)
    assert world.rows.reads == 2 and refreshed.status.records == 2
    assert await world.store.count("sales.churn") == 2


@pytest.mark.parametrize("refresh", [True, False], ids=["refresh", "periodic-check"])
async def test_rows_missing_from_the_routing_collection_are_written_again_by_the_next_reconcile(
    world: World, refresh: bool
) -> None:
    first = await world.reconcile(product())
    routing = routing_of(product())
    held = await world.store.count(routing.alias)
    digest = first.status.ingested_digest
    assert digest is not None
    # An unchanged product whose routing rows are all there: nothing written, and on a periodic
    # check with no refresh due, nothing read.
    unchanged = await world.reconcile(product(status=wire(first)), refresh=refresh)
    assert unchanged.points_written == 0 and world.rows.reads == (2 if refresh else 1)
    # Its points gone from routing (its own collection and status intact), as a CI run once found
    # after a leader's kill -9: the next reconcile, a refresh or a periodic check, writes them again.
    await world.store.remove_product(routing.alias, "sales/churn")
    assert await world.store.routing_points(routing.alias, "sales/churn", digest) == 0
    healed = await world.reconcile(product(status=wire(first)), refresh=refresh)
    assert healed.points_written == len(ROWS) and healed.status.phase == "Ready"
    assert await world.store.routing_points(routing.alias, "sales/churn", digest) == len(ROWS)
    assert await world.store.count(routing.alias) == held


async def test_a_card_missing_from_the_routing_collection_is_written_again_by_the_next_periodic_check(
    world: World,
) -> None:
    first = await world.reconcile(product())
    routing = routing_of(product())
    digest = first.status.ingested_digest
    assert digest is not None and await world.store.routing_points(routing.alias, "sales/churn", digest, "card") == 1
    # The card alone gone (an older ingestion's card point, removed with that ingestion), rows intact.
    (vector,) = await resolve_provider("builtin:ngram-384").embed(["stale card"])
    stale = routing_fields("sales/churn", "older", "card")
    await world.store.upsert(routing.alias, [card_point_id("sales", "churn")], [vector], ["stale card"], [stale])
    await world.store.remove_product(routing.alias, "sales/churn", keep_digest=digest)
    assert await world.store.routing_points(routing.alias, "sales/churn", digest, "card") == 0
    assert await world.store.routing_points(routing.alias, "sales/churn", digest) == len(ROWS)
    healed = await world.reconcile(product(status=wire(first)))
    assert await world.store.routing_points(routing.alias, "sales/churn", digest, "card") == 1
    assert healed.points_written == 0 and healed.status.phase == "Ready"  # the rows were not written again
    asked = SearchRequest(vector=vector, text="why customers cancel", limit=5, products=["sales/churn"], kind="card")
    (card,) = await world.store.search(routing.alias, asked)
    assert card.payload[DIGEST_KEY] == digest  # routing finds the product's card again


async def test_an_invalid_spec_fails_with_the_field_and_touches_nothing(world: World) -> None:
    body = product()
    body["spec"]["semanticSearch"]["keyFields"] = ["nowhere"]
    outcome = await world.reconcile(body)
    assert outcome.status.phase == "Failed" and outcome.retry_after is None
    status, reason, message = conditions(outcome)["CollectionReady"]
    assert (status, reason) == ("False", "InvalidSpec") and "keyFields" in message and "nowhere" in message
    assert world.rows.reads == 0 and not await world.store.exists("sales.churn")
    assert any(e.warning and e.reason == "InvalidSpec" for e in outcome.events)


async def test_an_unknown_model_fails_naming_the_accepted_forms(world: World) -> None:
    outcome = await world.reconcile(product(semanticSearch={"keyFields": ["reason"], "embeddingModel": "nope:x"}))
    _, reason, message = conditions(outcome)["CollectionReady"]
    assert outcome.status.phase == "Failed" and reason == "UnknownEmbeddingModel" and "accepted forms" in message


async def test_a_source_that_is_down_degrades_with_backoff_then_recovers(world: World) -> None:
    world.rows.error = SourceError("GET http://rows.example answered HTTP 503", transient=True)
    down = await world.reconcile(product())
    assert down.status.phase == "Degraded" and down.retry_after == 2.0
    assert conditions(down)["Ingested"][:2] == ("False", "SourceUnavailable")
    assert "HTTP 503" in conditions(down)["Ready"][2]
    later = await world.reconcile(product(status=wire(down)), retry=3)
    assert later.retry_after == 16.0, "the delay doubles per retry"
    world.rows.error = None
    up = await world.reconcile(product(status=wire(later)))
    assert up.status.phase == "Ready" and up.status.records == 3 and up.retry_after is None


async def test_collection_ready_says_what_queries_use_and_never_names_one_collection_twice(world: World) -> None:
    world.rows.error = SourceError("GET http://rows.example answered HTTP 503", transient=True)
    first = await world.reconcile(product())
    _, reason, message = conditions(first)["CollectionReady"]
    index = first.status.index_collection or message.split()[0]
    assert reason == "CollectionBuilding" and message.count(index) == 1 and "queries find no rows" in message
    world.rows.error = None
    ready = await world.reconcile(product(status=wire(first)))
    assert conditions(ready)["CollectionReady"][2].endswith("(384 dims, Cosine)")
    world.rows.error = SourceError("GET http://rows.example answered HTTP 503", transient=True)
    stale = await world.reconcile(product(status=wire(ready)), refresh=True)
    _, reason, message = conditions(stale)["CollectionReady"]
    assert stale.status.phase == "Degraded" and reason == "CollectionStale"
    assert message.count(ready.status.index_collection or "?") == 1
    moved = product(generation=2, status=wire(stale))
    moved["spec"]["semanticSearch"]["embeddingModel"] = "builtin:ngram-64"
    building = await world.reconcile(moved)
    _, reason, message = conditions(building)["CollectionReady"]
    assert reason == "CollectionBuilding" and f"queries use {ready.status.index_collection} until" in message


async def test_a_permanently_bad_source_fails_without_retry(world: World) -> None:
    world.rows.error = SourceError("cannot parse the source as json: Expecting value", transient=False)
    outcome = await world.reconcile(product())
    assert outcome.status.phase == "Failed" and outcome.retry_after is None
    assert conditions(outcome)["Ingested"][:2] == ("False", "SourceInvalid")


async def test_rejected_rows_are_counted_and_announced(world: World) -> None:
    world.rows.rows = [*ROWS, {"id": "a", "reason": "a duplicate of the first row"}, {"reason": "no id at all"}]
    outcome = await world.reconcile(product(source={"inline": [], "maxRejectedPercent": 50}))
    assert outcome.status.records == 3 and outcome.status.rejected_records == 2
    assert conditions(outcome)["Ingested"][1] == "IngestedWithRejects"
    (event,) = [e for e in outcome.events if e.reason == "RowsRejected"]
    assert event.warning and "duplicate primary key" in event.message and "id is missing" in event.message


async def test_a_model_change_builds_a_new_index_and_switches_the_alias(world: World) -> None:
    first = await world.reconcile(product())
    old = first.status.index_collection
    changed = await world.reconcile(
        product(
            generation=2,
            status=wire(first),
            semanticSearch={"keyFields": ["reason"], "embeddingModel": "builtin:ngram-128"},
        )
    )
    assert changed.status.phase == "Ready" and changed.status.vector_size == 128
    assert changed.status.index_collection != old and not await world.store.exists(old or "")
    assert await world.store.current_index("sales.churn") == changed.status.index_collection
    assert [e.reason for e in changed.events if e.reason.startswith("Reindex")] == ["Reindexing", "Reindexed"]


async def test_an_unreachable_inference_endpoint_degrades_and_breaches_availability(world: World) -> None:
    world.probe.down = "http://model.example is unreachable: ConnectError"
    outcome = await world.reconcile(
        product(inference={"enabled": True, "endpoint": "http://model.example"}, sla={"availability": "99.9"})
    )
    assert outcome.status.phase == "Degraded" and outcome.retry_after is not None
    assert conditions(outcome)["InferenceReady"][:2] == ("False", "EndpointUnreachable")
    assert conditions(outcome)["SLAMet"][:2] == ("False", "SLABreached")
    assert outcome.status.sla is not None and outcome.status.sla.availability_met is False
    entry = read_catalog_file(world.catalog_path)["sales.churn"]
    assert entry.phase == "Degraded" and entry.sla_met is False
    summaries = {c.type: c for c in entry.conditions}
    assert summaries["SLAMet"].message is not None and "inference endpoint not available" in summaries["SLAMet"].message
    assert (summaries["Ready"].status, summaries["Ready"].reason) == ("False", "EndpointUnreachable")


async def test_a_deployed_model_reports_its_service_url(world: World) -> None:
    outcome = await world.reconcile(product(inference={"enabled": True, "model": "builtin:ngram-384"}))
    assert world.inference.calls == [("sales", "churn")]
    assert outcome.status.inference_endpoint == "http://churn-inference.sales.svc:8080"
    world.inference.available = False
    waiting = await world.reconcile(
        product(inference={"enabled": True, "model": "builtin:ngram-384"}, status=wire(outcome))
    )
    assert waiting.status.phase == "Provisioning" and conditions(waiting)["Ready"][0] == "False"


async def test_of_two_overlapping_reconciles_the_later_ones_status_is_written_last(world: World) -> None:
    """A periodic check and a Deployment's event reconcile one product at once: the status that
    stays is the one read last (the Deployment lost its replicas), not the one whose write was slower."""
    spec = {"inference": {"enabled": True, "model": "builtin:ngram-384"}}
    body = product(status=wire(await world.reconcile(product(**spec))), **spec)
    written: list[str] = []
    writing = asyncio.Event()

    async def slow_write(outcome: Outcome) -> None:
        writing.set()
        await asyncio.sleep(0.2)  # an API server slow to take the status
        written.append(conditions(outcome)["InferenceReady"][0])

    async def write(outcome: Outcome) -> None:
        written.append(conditions(outcome)["InferenceReady"][0])

    async def replicas_lost() -> None:
        await writing.wait()  # the first reconcile read the Deployment available and is writing that
        world.inference.available = False
        await world.reconciler.reconcile(body, write=write)

    await asyncio.gather(world.reconciler.reconcile(body, write=slow_write), replicas_lost())
    assert written == ["True", "False"]


async def test_an_older_generation_never_rolls_a_product_back(world: World) -> None:
    await world.reconcile(product(generation=3))
    assert await world.reconciler.reconcile(product(generation=2)) is None


async def test_a_failed_catalog_write_degrades_with_its_cause(world: World, tmp_path: Path) -> None:
    class Broken(FileCatalogBackend):
        async def write_shard(self, shard: Any) -> None:
            raise OSError("disk full")

    world.reconciler.ports.catalog.backend = Broken(tmp_path / "broken.json")
    outcome = await world.reconcile(product())
    status, reason, message = conditions(outcome)["Cataloged"]
    assert (status, reason) == ("False", "CatalogWriteFailed") and message.endswith("OSError: disk full")
    assert outcome.status.phase == "Degraded"


async def test_finalize_drops_the_collection_and_the_entry_unless_retained(world: World) -> None:
    await world.reconcile(product("gone"))
    await world.reconcile(product("kept", deletionPolicy="Retain"))
    await world.reconciler.finalize(product("gone"))
    await world.reconciler.finalize(product("kept", deletionPolicy="Retain"))
    assert not await world.store.exists("sales.gone")
    assert await world.store.count("sales.kept") == 3, "Retain keeps the rows"
    assert "sales.gone" not in read_catalog_file(world.catalog_path)
    assert "sales.kept" not in read_catalog_file(world.catalog_path)
    assert world.reconciler.known_products == 0


async def test_a_source_whose_rows_are_all_refused_is_never_ready(world: World) -> None:
    world.rows.rows = [{"ID": r["id"], "reason": r["reason"]} for r in ROWS]  # the key column's case is wrong
    outcome = await world.reconcile(product())
    assert outcome.status.phase == "Failed" and outcome.retry_after is None
    status, reason, message = conditions(outcome)["Ingested"]
    assert (status, reason) == ("False", "TooManyRejectedRows")
    assert "3 of 3 rows rejected" in message and "'ID' is 'id' except for case" in message
    assert not await world.store.exists("sales.churn"), "nothing was written or switched"


async def test_the_rejection_policy_is_the_products_to_choose(world: World) -> None:
    world.rows.rows = [*ROWS, {"id": "d"}]  # one row of four has no text to embed
    strict = await world.reconcile(product(source={"inline": [], "maxRejectedPercent": 10}))
    assert conditions(strict)["Ingested"][1] == "TooManyRejectedRows"
    lenient = await world.reconcile(product(generation=2, source={"inline": [], "maxRejectedPercent": 50}))
    assert lenient.status.phase == "Ready" and lenient.status.records == 3 and lenient.status.rejected_records == 1


async def test_a_long_ingestion_reports_its_progress(world: World) -> None:
    world.rows.rows = [{"id": f"r{i}", "reason": f"reason number {i}"} for i in range(600)]
    world.reconciler.settings.ingest_batch_size = 256
    outcome = await world.reconcile(product())
    assert outcome.status.records == 600
    assert world.progress == [(256, 600), (512, 600), (600, 600)]


async def test_a_small_source_is_read_once_and_a_large_one_twice_with_the_same_rows_written(world: World) -> None:
    # A duplicate key among the rows: the kept batches must leave it out just as a second read would.
    rows = [{"id": f"r{i}", "reason": f"invoice {i} disputed by the customer"} for i in range(40)]
    world.rows.rows = [*rows, {"id": "r3", "reason": "a second r3"}]
    small = await world.reconcile(product())
    assert (small.status.records, small.status.rejected_records, world.rows.passes) == (40, 1, 1)
    question = "invoice 17 disputed by the customer"
    (vector,) = await resolve_provider("builtin:ngram-384").embed([question])
    hits = await world.store.search("sales.churn", SearchRequest(vector, question, 1))
    assert hits[0].payload["id"] == "r17"

    world.rows.passes = 0
    world.rows.rows = [{"id": f"r{i}", "reason": f"invoice {i} disputed"} for i in range(KEEP_ROWS + 10)]
    large = await world.reconcile(product(generation=2, status=wire(small)))
    assert (large.status.records, world.rows.passes) == (KEEP_ROWS + 10, 2)


async def test_a_cluster_layout_is_reported_and_only_a_shard_change_reindexes(world: World) -> None:
    search = {"keyFields": ["reason"], "embeddingModel": "builtin:ngram-384"}
    layout = {"shards": 3, "replicas": 2, "writeConsistency": 2, "quantization": "scalar"}
    first = await world.reconcile(product(semanticSearch={**search, "layout": layout}))
    assert first.status.phase == "Ready"
    # The embedded store keeps its own layout, reports it, and says what it could not honour.
    assert first.status.layout is not None and first.status.layout.shards == 1
    message = conditions(first)["CollectionReady"][2]
    assert "ignored: shards 3, replicas 2, writeConsistency 2, quantization scalar" in message
    # Replicas can change in place on a Qdrant cluster: same collection.
    more_replicas = await world.reconcile(
        product(generation=2, status=wire(first), semanticSearch={**search, "layout": {**layout, "replicas": 3}})
    )
    assert more_replicas.status.index_collection == first.status.index_collection
    # A new shard count is a new collection behind the alias.
    resharded = await world.reconcile(
        product(generation=3, status=wire(more_replicas), semanticSearch={**search, "layout": {**layout, "shards": 6}})
    )
    assert resharded.status.phase == "Ready"
    assert resharded.status.index_collection != first.status.index_collection
    assert [e.reason for e in resharded.events if e.reason.startswith("Reindex")] == ["Reindexing", "Reindexed"]


def test_write_consistency_above_replicas_is_refused_with_the_field() -> None:
    with pytest.raises(ValueError, match="writeConsistency cannot exceed replicas"):
        CollectionLayout(replicas=1, write_consistency=2)


async def test_a_large_product_gives_routing_a_stable_sample_and_answers_from_every_row(world: World) -> None:
    world.rows.rows = [{"id": f"r{i}", "reason": f"reason number {i}"} for i in range(2000)]
    world.reconciler.settings.routing_rows_per_product = 200
    body = product()
    outcome = await world.reconcile(body)
    assert outcome.status.records == 2000 and outcome.status.phase == "Ready"
    _, _, message = conditions(outcome)["Ingested"]
    assert "routing reads a sample of about 200 of them" in message
    spec = parse_spec(body)
    assert spec is not None and spec.semantic_search is not None
    plan = collection_plan("sales", "churn", spec, 384)
    routing = routing_plan(plan, spec.semantic_search.embedding_model, None).alias
    sampled = await world.store.count(routing) - 1  # and the product's card
    assert 150 <= sampled <= 250, sampled
    # A refresh that rewrites every row (one row's text changed) picks the same rows, not a second sample.
    world.rows.rows[0]["reason"] = "price went up"
    refreshed = await world.reconcile(product(status=wire(outcome)), refresh=True)
    assert refreshed.points_written == 2000
    assert await world.store.count(routing) - 1 == sampled
    # A small product still puts every row in routing.
    world.rows.rows = [dict(r) for r in ROWS]
    await world.reconcile(product(name="small"))
    assert await world.store.count(routing) - 1 - sampled == 3 + 1


@dataclass
class BuildOrder:
    """A store that records, in order, each product collection built and each one written to."""

    store: VectorStore
    order: list[tuple[str, str]] = field(default_factory=list)

    async def ensure_index(self, plan: CollectionPlan) -> bool:
        created = await self.store.ensure_index(plan)
        if created and not plan.index.startswith(ROUTING_PREFIX):
            self.order.append(("built", plan.index))
        return created

    async def upsert(self, collection: str, *args: Any, **kwargs: Any) -> None:
        await self.store.upsert(collection, *args, **kwargs)
        if not collection.startswith(ROUTING_PREFIX):
            self.order.append(("filled", collection))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_a_burst_builds_each_collection_when_its_rows_go_in_not_ahead_of_them(tmp_path: Path) -> None:
    """Built ahead, while hundreds of products wait for an ingestion slot, a collection was closed by the
    embedded store's cache of open ones before its rows came, and reopening one stalls the operator."""
    settings = OperatorSettings(catalog_flush_seconds=0.0, ingest_concurrency=1, metrics_port=0)
    store = open_store(StoreSettings(url=None, path=":memory:"))
    recorder = BuildOrder(store)
    catalog = CatalogWriter(FileCatalogBackend(tmp_path / "catalog.json"), "catalog", 100_000, 0.0)
    ports = Ports(recorder, catalog, resolve_provider, FakeRows(), FakeProbe(), FakeInference())  # type: ignore[arg-type]
    reconciler = Reconciler(settings, ports)
    try:
        outcomes = await asyncio.gather(*(reconciler.reconcile(product(f"p{i}")) for i in range(4)))
    finally:
        await catalog.close()
        await store.close()
    assert all(o is not None and o.status.phase == "Ready" for o in outcomes)
    # One slot: each collection is built and then filled before the next one is built.
    built = [index for what, index in recorder.order if what == "built"]
    assert len(built) == 4
    assert recorder.order == [step for index in built for step in (("built", index), ("filled", index))]


@dataclass
class HeldSource(FakeRows):
    """Rows of a url source that do not come until ``release`` is set (an ingestion holding its slot)."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    reading: asyncio.Event = field(default_factory=asyncio.Event)  # a url source's read has begun

    async def __call__(self, source: Source, namespace: str) -> RowsInMemory:
        if source.url is not None:
            self.reading.set()
            await self.release.wait()
        return await super().__call__(source, namespace)


async def test_an_edit_that_leaves_inline_rows_as_they_are_does_not_wait_for_a_busy_ingestion_slot(
    tmp_path: Path,
) -> None:
    """During a burst every slot is taken by other products' ingestions: a description change of a
    Ready product waited behind all of them (23.5 s in a 1,000-product burst). Writing rows still waits."""
    settings = OperatorSettings(catalog_flush_seconds=0.0, ingest_concurrency=1, metrics_port=0)
    store = open_store(StoreSettings(url=None, path=":memory:"))
    catalog = CatalogWriter(FileCatalogBackend(tmp_path / "catalog.json"), "catalog", 100_000, 0.0)
    rows = HeldSource()
    reconciler = Reconciler(settings, Ports(store, catalog, resolve_provider, rows, FakeProbe(), FakeInference()))
    try:
        ready = await reconciler.reconcile(product())
        assert ready is not None and ready.status.phase == "Ready"
        # Another product's ingestion takes the only slot and keeps it.
        busy = asyncio.create_task(
            reconciler.reconcile(
                product("orders", source={"url": {"url": "http://rows.test/o.jsonl", "format": "jsonl"}})
            )
        )
        await asyncio.wait_for(rows.reading.wait(), timeout=10)
        edited = product(generation=2, status=wire(ready), description="Why customers leave, as they told us.")
        outcome = await asyncio.wait_for(reconciler.reconcile(edited), timeout=10)
        assert outcome is not None and outcome.status.phase == "Ready"
        assert outcome.status.observed_generation == 2 and outcome.points_written == 0
        # New rows are a write: that edit waits for the slot.
        rows.rows.append({"id": "z", "reason": "moved abroad"})
        writing = asyncio.create_task(reconciler.reconcile(product(generation=3, status=wire(outcome))))
        done, _ = await asyncio.wait({writing}, timeout=0.5)
        assert not done, "rows were written while another ingestion held the only slot"
        rows.release.set()
        written = await asyncio.wait_for(writing, timeout=10)
        assert written is not None and written.points_written == 4 and written.status.phase == "Ready"
        other = await busy
        assert other is not None and other.status.phase == "Ready"
    finally:
        rows.release.set()
        await catalog.close()
        await store.close()
