"""The reconciler: what should exist for a product, made so, and reported as status.

Plain async Python with no kopf in it: the kopf handlers, the local mode and the tests all
call :class:`Reconciler`. Every side effect goes through a port (``datamesh.core.ports``), so
the same decisions run against a cluster, the embedded engine, or in-memory fakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from datamesh.core.backoff import backoff_delay
from datamesh.core.conditions import (
    Check,
    ConditionType,
    Transition,
    apply_checks,
    utcnow,
    worth_an_event,
)
from datamesh.core.plan import (
    CollectionPlan,
    collection_alias,
    collection_plan,
    product_ref,
    routing_plan,
    routing_share,
)
from datamesh.core.ports import (
    EmbedderResolver,
    EmbeddingError,
    EmbeddingServiceError,
    EndpointProbe,
    InferenceBackend,
    IngestJobs,
    LayoutReport,
    NullObserver,
    Observer,
    Progress,
    RowLoader,
    RowSource,
    SourceError,
    SourceSize,
    VectorStore,
    VectorStoreError,
)
from datamesh.core.rows import Refusals
from datamesh.core.sla import sla_check
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.engine.heartbeat import Heartbeat
from datamesh.engine.ingest import (
    Scan,
    Target,
    card_held,
    ingest,
    routing_holds,
    write_card,
)
from datamesh.engine.ingest_job import IngestReport, job_name
from datamesh.resource.catalog import card_text, catalog_entry, entry_key
from datamesh.resource.models import (
    DataProductSpec,
    DataProductStatus,
    Distance,
    IngestionProgress,
    Phase,
    ScoreCalibration,
    parse_status,
    spec_error_message,
)
from datamesh.settings import OperatorSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the product."""

    reason: str
    message: str
    warning: bool = False


@dataclass
class Outcome:
    """What one reconcile decided: the status to write, events to post, when to retry."""

    status: DataProductStatus
    events: list[Event] = field(default_factory=list)
    retry_after: float | None = None
    points_written: int = 0

    @property
    def phase(self) -> Phase:
        return Phase(self.status.phase)


@dataclass(frozen=True)
class ProductRef:
    """Identity of the product being reconciled."""

    namespace: str
    name: str
    uid: str
    generation: int

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> ProductRef:
        meta = body.get("metadata") or {}
        return cls(
            str(meta.get("namespace") or "default"),
            str(meta["name"]),
            str(meta.get("uid") or ""),
            int(meta.get("generation") or 1),
        )


async def no_progress(namespace: str, name: str, done: int, total: int) -> None:
    """Reports nothing."""


@dataclass(frozen=True)
class Ports:
    """Everything the reconciler reaches outside itself."""

    store: VectorStore
    catalog: CatalogWriter
    embedders: EmbedderResolver
    load_rows: RowLoader
    probe: EndpointProbe
    inference: InferenceBackend | None = None
    observer: Observer = field(default_factory=NullObserver)
    progress: Progress = field(default_factory=lambda: no_progress)
    # Large url sources are ingested by Jobs when both are given (settings.ingest_job_min_bytes).
    jobs: IngestJobs | None = None
    source_size: SourceSize | None = None


@dataclass(frozen=True)
class IngestResult:
    """The Ingested check and the status fields an ingestion changed (None: unchanged)."""

    check: Check
    written: int = 0
    records: int | None = None
    rejected: int | None = None
    digest: str | None = None
    ingested_at: datetime | None = None
    calibration: ScoreCalibration | None = None
    events: tuple[Event, ...] = ()
    progress: IngestionProgress | None = None  # an ingestion Job's, while it runs


@dataclass(frozen=True)
class CollectionResult:
    """The CollectionReady and Ingested checks and the collection fields of the status."""

    collection: Check
    ingest: IngestResult
    alias: str | None = None
    index: str | None = None
    vector_size: int | None = None
    routing: str | None = None
    layout: LayoutReport | None = None
    events: tuple[Event, ...] = ()
    # Whether alias/index/vector_size replace the status's values (False: keep what it says).
    sets_collection: bool = False
    sets_index: bool = False


def _waiting(collection: Check) -> CollectionResult:
    waiting = Check(
        ConditionType.ingested, None, "WaitingForCollection", "rows are ingested once the collection is ready"
    )
    return CollectionResult(collection, IngestResult(waiting))


class Reconciler:
    """Reconciles DataProducts through its ports."""

    def __init__(self, settings: OperatorSettings, ports: Ports) -> None:
        self.settings = settings
        self.ports = ports
        self._ingest_slots = asyncio.Semaphore(settings.ingest_concurrency)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._phases: dict[tuple[str, str], str] = {}
        self._generations: dict[tuple[str, str], int] = {}
        self.heartbeat = Heartbeat()

    def _lock(self, ref: ProductRef) -> asyncio.Lock:
        # One reconcile per product at a time: handlers, timers and child events may overlap.
        return self._locks.setdefault((ref.namespace, ref.name), asyncio.Lock())

    def retry_delay(self, retry: int) -> float:
        """Backoff after a transient failure (``retry`` counts earlier attempts, from 0)."""
        return backoff_delay(retry + 1, self.settings.retry_base_seconds, self.settings.retry_max_seconds, jitter=False)

    async def reconcile(
        self,
        body: Mapping[str, Any],
        *,
        refresh: bool = False,
        retry: int = 0,
        write: Callable[[Outcome], Awaitable[None]] | None = None,
    ) -> Outcome | None:
        """Bring one product to its desired state and return the status that says how it went.

        ``write`` publishes the outcome (its status, its events) before another reconcile of the
        product may start. None when ``body`` is older than a generation already reconciled (a
        timer that queued behind a spec change must not roll the product back).
        """
        ref = ProductRef.of(body)
        started = time.perf_counter()
        key = (ref.namespace, ref.name)
        with self.heartbeat.working():
            async with self._lock(ref):
                if ref.generation < self._generations.get(key, 0):
                    return None
                self._generations[key] = ref.generation
                outcome = await self._reconcile(ref, body, refresh=refresh, retry=retry)
                self._observe(ref, outcome, started)
                if write is not None:
                    # Under the product's lock: two reconciles of one product (a periodic check and
                    # a Deployment's event, say) would otherwise write in either order, and a status
                    # read before the other's could be written last and stay.
                    await write(outcome)
        return outcome

    def _observe(self, ref: ProductRef, outcome: Outcome, started: float) -> None:
        phase = outcome.phase.value
        reason = None
        if outcome.phase in (Phase.degraded, Phase.failed):
            ready = next((c for c in outcome.status.conditions if c.type == ConditionType.ready.value), None)
            reason = ready.reason if ready else "Unknown"
        self.ports.observer.reconciled(phase, time.perf_counter() - started, reason)
        self._track_phase(ref, phase)

    @property
    def known_products(self) -> int:
        """Products this reconciler has reconciled and not finalized."""
        return len(self._phases)

    def _track_phase(self, ref: ProductRef, phase: str | None) -> None:
        key = (ref.namespace, ref.name)
        old = self._phases.pop(key, None)
        if phase is not None:
            self._phases[key] = phase
        self.ports.observer.phase_changed(old, phase)

    async def _reconcile(self, ref: ProductRef, body: Mapping[str, Any], *, refresh: bool, retry: int) -> Outcome:
        status = parse_status(body)
        now = utcnow()
        try:
            spec = DataProductSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            check = Check(ConditionType.collection_ready, False, "InvalidSpec", spec_error_message(exc), permanent=True)
            new, transitions = apply_checks(status, [check], ref.generation, now)
            return Outcome(new, _events(transitions))

        rows = await self._collection_and_rows(ref, spec, status, now, refresh)
        inference_check, endpoint = await self._inference(ref, spec)
        sla, sla_status = sla_check(spec, rows.ingest.ingested_at or status.last_ingested_at, inference_check, now)
        status = _apply_rows(status, rows).model_copy(
            update={"inference_endpoint": endpoint, "sla": sla_status, "ingestion": rows.ingest.progress}
        )
        checks = [rows.collection, rows.ingest.check, inference_check, sla]

        key = entry_key(ref.namespace, ref.name)
        cataloged = Check(ConditionType.cataloged, True, "Cataloged", f"entry {key} is in the discovery catalog")
        # The catalog entry carries the phase and conditions the product will have if the write succeeds.
        provisional, _ = apply_checks(status, [*checks, cataloged], ref.generation, now)
        try:
            await self.ports.catalog.upsert(catalog_entry(ref.namespace, ref.name, ref.generation, spec, provisional))
            checks.append(cataloged)
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}".rstrip(": ")
            checks.append(
                Check(
                    ConditionType.cataloged,
                    False,
                    "CatalogWriteFailed",
                    f"catalog write failed: {cause}",
                    transient=True,
                )
            )

        new, transitions = apply_checks(status, checks, ref.generation, now)
        events = [*_events(transitions), *rows.events, *rows.ingest.events]
        retry_after = self.retry_delay(retry) if any(c.transient for c in checks) else None
        return Outcome(new, events, retry_after, rows.ingest.written)

    async def _collection_and_rows(
        self, ref: ProductRef, spec: DataProductSpec, status: DataProductStatus, now: datetime, refresh: bool
    ) -> CollectionResult:
        search = spec.semantic_search
        if search is None or not search.enabled:
            return CollectionResult(
                Check(ConditionType.collection_ready, True, "SemanticSearchDisabled", "semantic search is not enabled"),
                IngestResult(
                    Check(ConditionType.ingested, True, "NothingToIngest", "rows are only ingested for semantic search")
                ),
                sets_collection=True,
                sets_index=True,
            )
        try:
            provider = self.ports.embedders(search.embedding_model, search.embedding_endpoint)
            dimension = await provider.dimension()
        except EmbeddingServiceError as exc:
            return _waiting(
                Check(ConditionType.collection_ready, False, "EmbeddingServiceUnavailable", str(exc), transient=True)
            )
        except EmbeddingError as exc:
            return _waiting(
                Check(ConditionType.collection_ready, False, "UnknownEmbeddingModel", str(exc), permanent=True)
            )

        plan = collection_plan(ref.namespace, ref.name, spec, dimension)
        routing = routing_plan(plan, search.embedding_model, search.embedding_endpoint)
        target = Target(ref.namespace, ref.name, plan, routing, provider, spec.primary_key)
        planned = CollectionResult(
            Check(ConditionType.collection_ready, None, "CollectionBuilding", ""),
            IngestResult(Check(ConditionType.ingested, None, "WaitingForCollection", "")),
            alias=plan.alias,
            vector_size=plan.vector_size,
            sets_collection=True,
        )
        store = self.ports.store
        events: list[Event] = []
        try:
            current = await store.current_index(plan.alias)
            # An index still to fill is built in the product's ingestion slot, not ahead of it: built
            # while hundreds of products queued for a slot, it was closed by the store's cache of open
            # collections before its rows came, and reopening it froze the embedded store's process.
            building = current != plan.index
            async with self._ingest_slots if building else contextlib.nullcontext():
                if await store.ensure_index(plan) and current is not None:
                    events.append(
                        Event("Reindexing", f"embedding settings changed: building {plan.index} beside {current}")
                    )
                layout = await store.apply_layout(plan)
                if layout.changed:
                    events.append(
                        Event("LayoutChanged", f"{plan.index}: changed in place: {', '.join(layout.changed)}")
                    )
                await store.ensure_index(routing)
                ingest = await self._ingest(ref, spec, status, target, current, now, refresh, slot_held=building)
            switched = False
            if ingest.check.ok:
                previous = await store.point_alias(plan.alias, plan.index)
                if previous is not None and previous != plan.index:
                    await store.drop(previous)
                    events.append(
                        Event("Reindexed", f"alias {plan.alias} now points at {plan.index}; dropped {previous}")
                    )
                if status.routing_collection not in (None, routing.index):
                    await store.remove_product(status.routing_collection, target.product)
                switched = True
        except (VectorStoreError, EmbeddingServiceError) as exc:
            reason = "QdrantUnavailable" if isinstance(exc, VectorStoreError) else "EmbeddingServiceUnavailable"
            failed = _waiting(Check(ConditionType.collection_ready, False, reason, str(exc), transient=True))
            return replace(planned, collection=failed.collection, ingest=failed.ingest, events=tuple(events))

        collection = _collection_check(plan, current, switched, layout.ignored)
        return replace(
            planned,
            collection=collection,
            ingest=ingest,
            index=plan.index,
            sets_index=switched,
            routing=routing.index if switched else status.routing_collection,
            layout=layout,
            events=tuple(events),
        )

    async def _ingest(
        self,
        ref: ProductRef,
        spec: DataProductSpec,
        status: DataProductStatus,
        target: Target,
        current: str | None,
        now: datetime,
        refresh: bool,
        slot_held: bool,
    ) -> IngestResult:
        """The product's rows in its index (``slot_held``: the caller already holds an ingestion slot)."""
        store = self.ports.store
        plan = target.plan
        if spec.source is None:
            records = await store.count(plan.index)
            await write_card(store, target, card_text(ref.namespace, ref.name, spec), "no-source")
            check = Check(ConditionType.ingested, True, "NoSource", "no source declared; the collection is empty")
            return IngestResult(check, records=records, rejected=0)
        # Nothing read when the last ingestion already matches this spec and the store still holds it:
        # the product's collection, its rows in the routing collection and its card (a periodic
        # check that finds any of them gone writes them again, whatever removed them).
        unchanged_spec = status.observed_generation == ref.generation and status.ingested_digest is not None
        records = status.records or 0
        routed = replace(target, routing_share=routing_share(records, self.settings.routing_rows_per_product))
        if (
            unchanged_spec
            and not refresh
            and current == plan.index
            and await store.count(plan.index) == records
            and await routing_holds(store, routed, status.ingested_digest or "", records)
            and await card_held(store, routed, status.ingested_digest or "")
        ):
            previous = next((c for c in status.conditions if c.type == ConditionType.ingested.value), None)
            if previous is not None and previous.status == "True":
                return IngestResult(Check(ConditionType.ingested, True, previous.reason, previous.message))
            message = _ingest_message(status.records or 0, None)
            return IngestResult(Check(ConditionType.ingested, True, _ingest_reason(status.rejected_records), message))

        if await self._in_job(spec):
            return await self._ingest_in_job(ref, spec, status, target, now)
        if self.ports.jobs is not None and status.ingestion is not None and status.ingestion.job:
            # A Job ingested the spec before this one (a url source since made inline or small): it must not
            # go on writing beside this ingestion.
            await self.ports.jobs.delete(ref.namespace, ref.name)
        # Rows in the spec itself cost nothing to read: only writing them waits for a slot. An edit that
        # leaves them as they were (a description, an SLA) then is not queued behind a burst's ingestions.
        in_spec = spec.source.inline is not None and not slot_held
        reading = contextlib.nullcontext() if slot_held or in_spec else self._ingest_slots
        writing = self._ingest_slots if in_spec else contextlib.nullcontext()
        async with reading:
            try:
                rows = await self.ports.load_rows(spec.source, ref.namespace)
            except SourceError as exc:
                return IngestResult(_source_failed(exc))
            try:
                return await self._write(ref, spec, status, target, rows, now, writing)
            except SourceError as exc:
                return IngestResult(_source_failed(exc))
            finally:
                rows.close()

    async def _in_job(self, spec: DataProductSpec) -> bool:
        """Whether a Job ingests this source: a url source of at least ingest_job_min_bytes (or of unknown size)."""
        least = self.settings.ingest_job_min_bytes
        if self.ports.jobs is None or least is None or spec.source is None or spec.source.url is None:
            return False
        size = await self.ports.source_size(spec.source) if self.ports.source_size is not None else None
        return size is None or size >= least

    async def _ingest_in_job(
        self, ref: ProductRef, spec: DataProductSpec, status: DataProductStatus, target: Target, now: datetime
    ) -> IngestResult:
        """Start the product's ingestion Job, report how far it got, and adopt what it wrote when it ends."""
        jobs = self.ports.jobs
        assert jobs is not None
        # One Job per ingestion: of this spec, for this index, after the last ingestion (a due refresh starts anew).
        key = f"{ref.uid}/{ref.generation}/{target.plan.index}/{status.last_ingested_at}"
        job = job_name(ref.namespace, ref.name, key)
        state = await jobs.get(ref.namespace, ref.name, job)
        if state is None:
            await jobs.delete(ref.namespace, ref.name, keep=job)  # an earlier spec's, or a failed attempt's
            state = await jobs.start(ref.namespace, ref.name, job)
        if state.phase == "running":
            seen = status.ingestion if status.ingestion is not None and status.ingestion.job == state.name else None
            progress = IngestionProgress(
                rows_done=seen.rows_done if seen else 0, rows_total=seen.rows_total if seen else 0, job=state.name
            )
            message = f"Job {state.name} is ingesting the source"
            if progress.rows_total:
                message += f": {progress.rows_done} of {progress.rows_total} rows written"
            return IngestResult(Check(ConditionType.ingested, None, "IngestingInJob", message), progress=progress)
        report = IngestReport.parse(state.report) if state.report else None
        if state.phase == "failed" or report is None or report.error is not None:
            cause = (report.error if report else None) or state.message or "it ended without a report"
            permanent = report is not None and report.permanent
            if not permanent:
                # The next attempt is a new Job, after the reconcile's backoff; a permanent failure's Job stays as
                # its record (until the spec changes, or Kubernetes removes it after ingest_job_ttl_seconds).
                await jobs.delete(ref.namespace, ref.name)
            message = f"Job {state.name} failed: {cause}"
            check = Check(
                ConditionType.ingested,
                False,
                "IngestionJobFailed",
                message,
                transient=not permanent,
                permanent=permanent,
            )
            return IngestResult(check, events=(Event("IngestionJobFailed", message, warning=True),))
        if report.generation != ref.generation or report.index != target.plan.index or report.digest is None:
            await jobs.delete(ref.namespace, ref.name)
            message = f"Job {state.name} ingested another version of the spec; a new Job ingests this one"
            return IngestResult(Check(ConditionType.ingested, None, "IngestingInJob", message, transient=True))
        await self.ports.store.adopt_ingestion(ref.namespace, ref.name, target.plan.index, target.routing.index)
        routed = replace(target, routing_share=routing_share(report.accepted, self.settings.routing_rows_per_product))
        self.ports.observer.rows_rejected(report.rejected)
        self.ports.observer.rows_ingested(report.written)
        result = await self._finish(
            ref,
            spec,
            status,
            routed,
            report.digest,
            report.seen,
            report.refusals(),
            report.written,
            report.calibration or status.score_calibration,
            now,
        )
        await jobs.delete(ref.namespace, ref.name)
        return replace(
            result, events=(Event("IngestedInJob", f"Job {state.name}: {result.check.message}"), *result.events)
        )

    async def _write(
        self,
        ref: ProductRef,
        spec: DataProductSpec,
        status: DataProductStatus,
        target: Target,
        rows: RowSource,
        now: datetime,
        slot: contextlib.AbstractAsyncContextManager[Any],
    ) -> IngestResult:
        """Scan the rows, and write them (holding ``slot``) when the store does not hold them already."""
        store = self.ports.store

        async def held(found: Scan, routed: Target) -> bool:
            # Both collections an ingestion writes are checked: rows missing from the routing collection
            # (once seen after a leader's kill -9, cause not found) are written again, not left missing.
            return (
                found.digest == status.ingested_digest
                and await store.count(routed.plan.index) == found.accepted
                and await routing_holds(store, routed, found.digest, found.accepted, found.kept_ids())
            )

        async def on_batch(done: int, total: int) -> None:
            self.heartbeat.beat()  # a long ingestion is progress, not a stall
            await self.ports.progress(ref.namespace, ref.name, done, total)

        result = await ingest(
            store,
            target,
            spec,
            rows,
            self.settings.ingest_batch_size,
            self.settings.routing_rows_per_product,
            held=held,
            slot=slot,
            on_batch=on_batch,
        )
        found = result.found
        self.ports.observer.rows_rejected(found.refusals.rows)
        if found.too_many_refused:
            message = result.refused_message(spec)
            check = Check(ConditionType.ingested, False, "TooManyRejectedRows", message, permanent=True)
            return IngestResult(check, events=(Event("TooManyRejectedRows", message, warning=True),))
        written = result.written.rows if result.written else 0
        calibrated = result.written.calibration if result.written else status.score_calibration
        if result.written:
            self.ports.observer.rows_ingested(written)
        return await self._finish(
            ref, spec, status, result.target, found.digest, found.seen, found.refusals, written, calibrated, now
        )

    async def _finish(
        self,
        ref: ProductRef,
        spec: DataProductSpec,
        status: DataProductStatus,
        target: Target,
        digest: str,
        seen: int,
        refused: Refusals,
        written: int,
        calibrated: ScoreCalibration | None,
        now: datetime,
    ) -> IngestResult:
        """The card of ingestion ``digest`` written, and the Ingested check that says what the collection holds."""
        store = self.ports.store
        await write_card(store, target, card_text(ref.namespace, ref.name, spec), digest)
        events: list[Event] = []
        if refused.rows and (written or status.rejected_records != refused.rows):
            detail = f"{refused.rows} of {seen} rows rejected: {refused.summary()}"
            events.append(Event("RowsRejected", detail, warning=True))
        records = await store.count(target.plan.index)
        message = _ingest_message(records, refused)
        if target.routing_share < 1.0:
            message += f"; routing reads a sample of about {self.settings.routing_rows_per_product} of them"
        check = Check(ConditionType.ingested, True, _ingest_reason(refused.rows), message)
        return IngestResult(check, written, records, refused.rows, digest, now, calibrated, tuple(events))

    async def _inference(self, ref: ProductRef, spec: DataProductSpec) -> tuple[Check, str | None]:
        inference = spec.inference
        if inference is None or not inference.enabled:
            return Check(ConditionType.inference_ready, True, "NotRequested", "no inference requested"), None
        if inference.endpoint:
            problem = await self.ports.probe(inference.endpoint)
            if problem:
                return Check(
                    ConditionType.inference_ready, False, "EndpointUnreachable", problem, transient=True
                ), inference.endpoint
            return Check(
                ConditionType.inference_ready, True, "EndpointReachable", f"{inference.endpoint} answers"
            ), inference.endpoint
        backend = self.ports.inference
        if backend is None:
            message = "this operator cannot deploy models"
            return Check(ConditionType.inference_ready, False, "NoInferenceBackend", message, permanent=True), None
        try:
            return await backend.ensure(ref.namespace, ref.name, ref.uid, inference)
        except Exception as exc:
            message = f"cannot deploy the inference runtime: {exc}"
            return Check(ConditionType.inference_ready, False, "DeployFailed", message, transient=True), None

    async def finalize(self, body: Mapping[str, Any]) -> None:
        """Clean up what owner references cannot: the collection (unless Retain) and the catalog entry."""
        ref = ProductRef.of(body)
        with self.heartbeat.working():
            await self._finalize(ref, body)
        self._locks.pop((ref.namespace, ref.name), None)
        self._generations.pop((ref.namespace, ref.name), None)
        self._track_phase(ref, None)

    async def _finalize(self, ref: ProductRef, body: Mapping[str, Any]) -> None:
        async with self._lock(ref):
            routing = parse_status(body).routing_collection
            if routing is not None:
                # Even a retained collection leaves the routing: the product is gone from the mesh.
                await self.ports.store.remove_product(routing, product_ref(ref.namespace, ref.name))
            if (body.get("spec") or {}).get("deletionPolicy", "Delete") != "Retain":
                await self.ports.store.drop_product(collection_alias(ref.namespace, ref.name))
            await self.ports.catalog.remove(entry_key(ref.namespace, ref.name))
            if self.ports.jobs is not None:
                await self.ports.jobs.delete(ref.namespace, ref.name)


def _collection_check(plan: CollectionPlan, current: str | None, switched: bool, ignored: Sequence[str] = ()) -> Check:
    """CollectionReady: which collection queries use, what is still being built, what the store ignored."""
    if switched:
        detail = f"{plan.alias} -> {plan.index} ({plan.vector_size} dims, {Distance(plan.distance).value})"
        if ignored:
            detail += f"; the embedded store keeps its own layout, ignored: {', '.join(ignored)}"
        return Check(ConditionType.collection_ready, True, "CollectionReady", detail)
    if current == plan.index:
        detail = f"{plan.index} keeps the last complete ingestion; the new one has not completed"
        return Check(ConditionType.collection_ready, False, "CollectionStale", detail)
    if current is None:
        detail = f"{plan.index} is being built; until its first ingestion completes, queries find no rows"
    else:
        detail = f"{plan.index} is being built; queries use {current} until it is complete"
    return Check(ConditionType.collection_ready, False, "CollectionBuilding", detail)


def _apply_rows(status: DataProductStatus, rows: CollectionResult) -> DataProductStatus:
    """The status with the fields the collection and ingestion steps changed."""
    update: dict[str, Any] = {}
    if rows.sets_collection:
        update.update(collection=rows.alias, vector_size=rows.vector_size)
        if rows.alias is None:
            update["index_collection"] = None
    if rows.sets_index:
        update["index_collection"] = rows.index
        update["routing_collection"] = rows.routing
    if rows.layout is not None:
        update["layout"] = rows.layout.applied
    ingest = rows.ingest
    for name, value in (
        ("records", ingest.records),
        ("rejected_records", ingest.rejected),
        ("ingested_digest", ingest.digest),
        ("last_ingested_at", ingest.ingested_at),
        ("score_calibration", ingest.calibration),
    ):
        if value is not None:
            update[name] = value
    return status.model_copy(update=update)


def _ingest_reason(rejected: int | None) -> str:
    return "IngestedWithRejects" if rejected else "Ingested"


def _ingest_message(records: int, refused: Refusals | None) -> str:
    message = f"{records} records in the collection"
    if refused is not None and refused.rows:
        message += f"; {refused.summary()}"
    if refused is not None and refused.ignored_columns:
        message += f"; columns not in the schema were not stored: {', '.join(sorted(refused.ignored_columns))}"
    return message


def _source_failed(exc: SourceError) -> Check:
    reason = "SourceUnavailable" if exc.transient else "SourceInvalid"
    return Check(ConditionType.ingested, False, reason, str(exc), transient=exc.transient, permanent=not exc.transient)


def _events(transitions: list[Transition]) -> list[Event]:
    return [
        Event(t.reason, f"{t.type} is {t.status}: {t.message}".rstrip(": "), warning=t.warning)
        for t in transitions
        if worth_an_event(t)
    ]
