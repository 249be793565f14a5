"""The reconcile core: what should exist for a product, made so, and reported as status.

Plain async Python with no kopf in it: the kopf handlers, the local mode and the tests all
call :class:`Reconciler`. Side effects go through small ports (vector store, catalog writer,
inference backend, config-map reader), so the same decisions run against a cluster or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import httpx
from pydantic import ValidationError

from datamesh import metrics
from datamesh.catalog import CatalogWriter, catalog_entry, entry_key
from datamesh.conditions import Check, ConditionType, Transition, apply_checks, phase_of, utcnow
from datamesh.embeddings import EmbeddingError, EmbeddingServiceError, resolve_provider
from datamesh.inference import check_endpoint
from datamesh.ingestion import ingest_digest, validate_rows, write_points
from datamesh.models import DataProductSpec, DataProductStatus, Inference, Phase, SLAStatus, parse_duration
from datamesh.qdrant import CollectionPlan, VectorStore, VectorStoreError, collection_alias, collection_plan
from datamesh.settings import OperatorSettings
from datamesh.sources import ConfigMapReader, SourceError, load_rows

log = logging.getLogger(__name__)


class InferenceBackend(Protocol):
    """Runs the model of products with ``inference.model``."""

    async def ensure(self, namespace: str, name: str, uid: str, spec: Inference) -> tuple[Check, str | None]:
        """Make the runtime exist; its InferenceReady check and endpoint URL."""
        ...


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
        return cls(str(meta.get("namespace") or "default"), str(meta["name"]), str(meta.get("uid") or ""), int(meta.get("generation") or 1))


def spec_error_message(exc: ValidationError) -> str:
    """A validation error as one line per offending field, with kubectl-style paths (spec.a.b[1].c)."""
    parts = []
    for err in exc.errors():
        path = "spec"
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif not str(part).startswith(("function-", "model-")):
                path += f".{part}"
        message = err["msg"].removeprefix("Value error, ")
        # Cross-field rules of the spec name their field at the start of the message.
        parts.append(f"spec.{message}" if path == "spec" and ":" in message else f"{path}: {message}")
    return "; ".join(parts)


def retry_delay(retry: int, settings: OperatorSettings) -> float:
    """Exponential backoff for transient failures."""
    return min(settings.retry_max_seconds, settings.retry_base_seconds * (2 ** max(retry, 0)))


def freshness_check(spec: DataProductSpec, last_ingested_at: datetime | None, now: datetime) -> tuple[bool | None, str]:
    """Whether the newest ingestion is within ``sla.freshness``."""
    if spec.sla is None or spec.sla.freshness is None or spec.source is None:
        return None, "no freshness objective"
    if last_ingested_at is None:
        return False, "never ingested"
    age = (now - last_ingested_at).total_seconds()
    limit = parse_duration(spec.sla.freshness)
    if age > limit:
        return False, f"last ingestion is {age:.0f}s old, over the {spec.sla.freshness} freshness objective"
    return True, f"last ingestion is {age:.0f}s old (objective {spec.sla.freshness})"


def refresh_due(spec: DataProductSpec, last_ingested_at: datetime | None, now: datetime) -> bool:
    """Whether ``source.refreshInterval`` has passed since the last ingestion."""
    if spec.source is None or spec.source.refresh_interval is None or last_ingested_at is None:
        return False
    return (now - last_ingested_at).total_seconds() >= parse_duration(spec.source.refresh_interval)


class Reconciler:
    """Reconciles DataProducts against one vector store, catalog and inference backend."""

    def __init__(
        self,
        settings: OperatorSettings,
        store: VectorStore,
        catalog: CatalogWriter,
        http: httpx.AsyncClient,
        inference: InferenceBackend | None = None,
        read_config_map: ConfigMapReader | None = None,
        on_rows: Callable[[ProductRef, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.http = http
        self.inference = inference
        self.read_config_map = read_config_map
        self.on_rows = on_rows  # progress hook: rows embedded and written so far, per batch
        self._ingest_slots = asyncio.Semaphore(settings.ingest_concurrency)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._phases: dict[tuple[str, str], str] = {}
        self._generations: dict[tuple[str, str], int] = {}

    def _lock(self, ref: ProductRef) -> asyncio.Lock:
        # One reconcile per product at a time: handlers, timers and child events may overlap.
        return self._locks.setdefault((ref.namespace, ref.name), asyncio.Lock())

    async def reconcile(self, body: Mapping[str, Any], *, refresh: bool = False, retry: int = 0) -> Outcome | None:
        """Bring one product to its desired state and return the status that says how it went.

        None when ``body`` is older than a generation already reconciled (a timer that
        queued behind a spec change must not roll the product back).
        """
        ref = ProductRef.of(body)
        started = time.perf_counter()
        key = (ref.namespace, ref.name)
        async with self._lock(ref):
            if ref.generation < self._generations.get(key, 0):
                return None
            self._generations[key] = ref.generation
            outcome = await self._reconcile(ref, body, refresh=refresh, retry=retry)
        phase = outcome.phase.value
        metrics.RECONCILE_SECONDS.labels(result=phase).observe(time.perf_counter() - started)
        if outcome.phase in (Phase.degraded, Phase.failed):
            ready = next((c for c in outcome.status.conditions if c.type == ConditionType.ready.value), None)
            metrics.RECONCILE_ERRORS.labels(phase=phase, reason=ready.reason if ready else "Unknown").inc()
        self._track_phase(ref, phase)
        return outcome

    @property
    def known_products(self) -> int:
        """Products this reconciler has reconciled and not finalized."""
        return len(self._phases)

    def _track_phase(self, ref: ProductRef, phase: str | None) -> None:
        key = (ref.namespace, ref.name)
        old = self._phases.pop(key, None)
        if old is not None:
            metrics.PRODUCTS_BY_PHASE.labels(phase=old).dec()
        if phase is not None:
            self._phases[key] = phase
            metrics.PRODUCTS_BY_PHASE.labels(phase=phase).inc()

    async def _reconcile(self, ref: ProductRef, body: Mapping[str, Any], *, refresh: bool, retry: int) -> Outcome:
        status = DataProductStatus.model_validate(body.get("status") or {})
        now = utcnow()
        try:
            spec = DataProductSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            check = Check(ConditionType.collection_ready, False, "InvalidSpec", spec_error_message(exc), permanent=True)
            new, transitions = apply_checks(status, [check], ref.generation, now)
            return Outcome(new, _events(transitions))

        events: list[Event] = []
        checks: list[Check] = []
        update: dict[str, Any] = {}
        points_written = 0

        collection_check, ingest_check, written = await self._collection_and_rows(ref, spec, status, now, refresh, update, events)
        points_written += written
        checks += [collection_check, ingest_check]

        inference_check, endpoint = await self._inference(ref, spec)
        checks.append(inference_check)
        update["inference_endpoint"] = endpoint

        status = status.model_copy(update=update)
        checks.append(self._sla_check(spec, status, inference_check, now, update))
        status = status.model_copy(update=update)

        # The catalog entry carries the phase the product will have if the write succeeds.
        provisional = status.model_copy(update={"phase": phase_of([*checks, Check(ConditionType.cataloged, True, "")])})
        try:
            await self.catalog.upsert(catalog_entry(ref.namespace, ref.name, ref.generation, spec, provisional))
            checks.append(Check(ConditionType.cataloged, True, "Cataloged", f"entry {entry_key(ref.namespace, ref.name)} is in the discovery catalog"))
        except Exception as exc:  # any API failure: the entry is retried on the next attempt
            checks.append(Check(ConditionType.cataloged, False, "CatalogWriteFailed", f"catalog write failed: {exc}", transient=True))

        new, transitions = apply_checks(status, checks, ref.generation, now)
        events[:0] = _events(transitions)
        retry_after = retry_delay(retry, self.settings) if any(c.transient for c in checks) else None
        return Outcome(new, events, retry_after, points_written)

    async def _collection_and_rows(
        self,
        ref: ProductRef,
        spec: DataProductSpec,
        status: DataProductStatus,
        now: datetime,
        refresh: bool,
        update: dict[str, Any],
        events: list[Event],
    ) -> tuple[Check, Check, int]:
        search = spec.semantic_search
        if search is None or not search.enabled:
            update.update(collection=None, index_collection=None, vector_size=None)
            return (
                Check(ConditionType.collection_ready, True, "SemanticSearchDisabled", "semantic search is not enabled"),
                Check(ConditionType.ingested, True, "NothingToIngest", "rows are only ingested for semantic search"),
                0,
            )
        try:
            provider = resolve_provider(search.embedding_model, search.embedding_endpoint)
            dimension = await provider.dimension()
        except EmbeddingServiceError as exc:
            return self._pending_rows(Check(ConditionType.collection_ready, False, "EmbeddingServiceUnavailable", str(exc), transient=True))
        except EmbeddingError as exc:
            return self._pending_rows(Check(ConditionType.collection_ready, False, "UnknownEmbeddingModel", str(exc), permanent=True))

        plan = collection_plan(ref.namespace, ref.name, spec, dimension)
        update.update(collection=plan.alias, vector_size=plan.vector_size)
        try:
            current = await self.store.current_index(plan.alias)
            created = await self.store.ensure_index(plan)
            if created and current is not None:
                events.append(Event("Reindexing", f"embedding settings changed: building {plan.index} beside {current}"))
            ingest_check, written = await self._ingest(ref, spec, status, plan, provider, current, now, refresh, update, events)
            if ingest_check.ok:
                previous = await self.store.point_alias(plan.alias, plan.index)
                if previous is not None and previous != plan.index:
                    await self.store.drop(previous)
                    events.append(Event("Reindexed", f"alias {plan.alias} now points at {plan.index}; dropped {previous}"))
                update["index_collection"] = plan.index
        except VectorStoreError as exc:
            return self._pending_rows(Check(ConditionType.collection_ready, False, "QdrantUnavailable", str(exc), transient=True))
        except EmbeddingServiceError as exc:
            return self._pending_rows(Check(ConditionType.collection_ready, False, "EmbeddingServiceUnavailable", str(exc), transient=True))

        if update.get("index_collection") == plan.index:
            collection = Check(ConditionType.collection_ready, True, "CollectionReady", f"{plan.alias} -> {plan.index} ({plan.vector_size} dims, {plan.distance})")
        else:
            collection = Check(ConditionType.collection_ready, False, "CollectionBuilding", f"{plan.index} is being built; queries still use {current or 'nothing'}")
        return collection, ingest_check, written

    @staticmethod
    def _pending_rows(collection: Check) -> tuple[Check, Check, int]:
        return collection, Check(ConditionType.ingested, None, "WaitingForCollection", "rows are ingested once the collection is ready"), 0

    async def _ingest(
        self,
        ref: ProductRef,
        spec: DataProductSpec,
        status: DataProductStatus,
        plan: CollectionPlan,
        provider: Any,
        current: str | None,
        now: datetime,
        refresh: bool,
        update: dict[str, Any],
        events: list[Event],
    ) -> tuple[Check, int]:
        if spec.source is None:
            update.update(records=await self.store.count(plan.index), rejected_records=0)
            return Check(ConditionType.ingested, True, "NoSource", "no source declared; the collection is empty"), 0
        # Nothing read when the last ingestion already matches this spec and Qdrant still holds it.
        unchanged_spec = status.observed_generation == ref.generation and status.ingested_digest is not None
        if unchanged_spec and not refresh and current == plan.index and await self.store.count(plan.index) == status.records:
            return Check(ConditionType.ingested, True, _ingest_reason(status.rejected_records), _ingest_message(status.records or 0, status.rejected_records or 0, [])), 0

        async with self._ingest_slots:
            try:
                rows = await load_rows(spec.source, ref.namespace, http=self.http, read_config_map=self.read_config_map, timeout=self.settings.url_timeout)
            except SourceError as exc:
                reason = "SourceUnavailable" if exc.transient else "SourceInvalid"
                return Check(ConditionType.ingested, False, reason, str(exc), transient=exc.transient, permanent=not exc.transient), 0
            validated = validate_rows(ref.namespace, ref.name, spec, rows)
            digest = ingest_digest(plan, spec.key_fields, validated)
            written = 0
            if digest != status.ingested_digest or await self.store.count(plan.index) != len(validated.ids):
                on_batch = (lambda n: self.on_rows(ref, n)) if self.on_rows else None
                await write_points(self.store, plan.index, provider, spec.key_fields, validated, digest, self.settings.ingest_batch_size, on_batch)
                written = len(validated.ids)
                metrics.INGESTED_ROWS.inc(written)
        metrics.REJECTED_ROWS.inc(validated.rejected)
        if validated.rejected and (written or status.rejected_records != validated.rejected):
            events.append(Event("RowsRejected", f"{validated.rejected} of {len(rows)} rows rejected: " + "; ".join(validated.reasons), warning=True))
        records = await self.store.count(plan.index)
        update.update(records=records, rejected_records=validated.rejected, ingested_digest=digest, last_ingested_at=now)
        message = _ingest_message(records, validated.rejected, validated.reasons)
        if validated.ignored_columns:
            message += f"; columns not in the schema were not stored: {', '.join(sorted(validated.ignored_columns))}"
        return Check(ConditionType.ingested, True, _ingest_reason(validated.rejected), message), written

    async def _inference(self, ref: ProductRef, spec: DataProductSpec) -> tuple[Check, str | None]:
        inference = spec.inference
        if inference is None or not inference.enabled:
            return Check(ConditionType.inference_ready, True, "NotRequested", "no inference requested"), None
        if inference.endpoint:
            problem = await check_endpoint(self.http, inference.endpoint, self.settings.url_timeout)
            if problem:
                return Check(ConditionType.inference_ready, False, "EndpointUnreachable", problem, transient=True), inference.endpoint
            return Check(ConditionType.inference_ready, True, "EndpointReachable", f"{inference.endpoint} answers"), inference.endpoint
        if self.inference is None:
            return Check(ConditionType.inference_ready, False, "NoInferenceBackend", "this operator cannot deploy models", permanent=True), None
        try:
            return await self.inference.ensure(ref.namespace, ref.name, ref.uid, inference)
        except Exception as exc:  # API errors of the backend: retried with backoff
            return Check(ConditionType.inference_ready, False, "DeployFailed", f"cannot deploy the inference runtime: {exc}", transient=True), None

    def _sla_check(self, spec: DataProductSpec, status: DataProductStatus, inference: Check, now: datetime, update: dict[str, Any]) -> Check:
        fresh, fresh_msg = freshness_check(spec, status.last_ingested_at, now)
        wants_availability = spec.sla is not None and spec.sla.availability is not None and spec.inference is not None and spec.inference.enabled
        available = bool(inference.ok) if wants_availability else None
        breaches = [m for ok, m in ((fresh, fresh_msg), (available, f"inference endpoint not available: {inference.message}")) if ok is False]
        met = None if fresh is None and available is None else not breaches
        update["sla"] = SLAStatus(met=met, freshness_met=fresh, availability_met=available, last_checked_at=now, message="; ".join(breaches) or None)
        if met is None:
            return Check(ConditionType.sla_met, True, "NoObjectives", "no checkable SLA objectives")
        if met:
            return Check(ConditionType.sla_met, True, "SLAMet", fresh_msg if fresh else "objectives met")
        return Check(ConditionType.sla_met, False, "SLABreached", "; ".join(breaches))

    async def finalize(self, body: Mapping[str, Any]) -> None:
        """Clean up what owner references cannot: the collection (unless Retain) and the catalog entry."""
        ref = ProductRef.of(body)
        async with self._lock(ref):
            if (body.get("spec") or {}).get("deletionPolicy", "Delete") != "Retain":
                await self.store.drop_product(collection_alias(ref.namespace, ref.name))
            await self.catalog.remove(entry_key(ref.namespace, ref.name))
        self._locks.pop((ref.namespace, ref.name), None)
        self._generations.pop((ref.namespace, ref.name), None)
        self._track_phase(ref, None)


def _ingest_reason(rejected: int | None) -> str:
    return "IngestedWithRejects" if rejected else "Ingested"


def _ingest_message(records: int, rejected: int, reasons: list[str]) -> str:
    message = f"{records} records in the collection"
    if rejected:
        message += f"; {rejected} rows rejected" + (f" ({'; '.join(reasons)})" if reasons else "")
    return message


def _events(transitions: list[Transition]) -> list[Event]:
    return [Event(t.reason, f"{t.type} is {t.status}: {t.message}".rstrip(": "), warning=t.warning) for t in transitions]
