"""kopf handlers for DataProduct: thin adapters from kopf's events to the reconcile core.

Handlers are registered on an explicit registry built by :func:`build_registry`, so the
operator command, the tests and a second operator in one process never share global state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kopf

from datamesh.controller import metrics
from datamesh.controller.diffbase import DigestDiffBaseStorage
from datamesh.controller.runtime import Runtime, build_runtime
from datamesh.core.children import MANAGED_BY, deployment_available, desired_objects, drifted
from datamesh.core.conditions import ConditionType, arrival_status, utcnow
from datamesh.core.jobs import ROLE as JOB_ROLE
from datamesh.core.jobs import job_phase, product_of_job
from datamesh.core.selector import NamespacePatterns
from datamesh.core.sla import first_check_in, next_check_in, refresh_due
from datamesh.engine.catalog_writer import CatalogScope
from datamesh.engine.reconciler import Event, Outcome
from datamesh.resource.catalog import entry_of_object
from datamesh.resource.models import (
    GROUP,
    PLURAL,
    VERSION,
    DataProductSpec,
    DataProductStatus,
    parse_spec,
    parse_status,
)
from datamesh.settings import OperatorSettings

log = logging.getLogger(__name__)

RESOURCE = (GROUP, VERSION, PLURAL)


async def write_outcome(runtime: Runtime, outcome: Outcome, body: Mapping[str, Any]) -> None:
    """Write the outcome's status, then post its events.

    Written by the handler itself rather than through kopf's patch: kopf patches the object (its
    record of the handled spec) before the status subresource, so an operator killed between the
    two left products marked handled with no status, which no successor ever reconciled. Written
    first, a kill at worst repeats the reconcile.
    """
    try:
        await runtime.kube.patch_product_status(*RESOURCE, body, outcome.status.wire_status())
    except Exception as exc:  # not handled until its status says so: kopf retries the handler
        raise kopf.TemporaryError(f"status not written, retrying: {exc}", delay=2) from exc
    for event in outcome.events:
        post_event(body, event)


def post_event(body: Mapping[str, Any], event: Event) -> None:
    """A Kubernetes Event on the product."""
    kind = "Warning" if event.warning else "Normal"
    kopf.event(body, type=kind, reason=event.reason, message=event.message[:1000])  # type: ignore[arg-type]


def kopf_settings(settings: OperatorSettings, namespaces: list[str] | None = None) -> kopf.OperatorSettings:
    """kopf's own settings: our finalizer and annotation prefix, watch timeouts, and a shard's label selector."""
    ks = kopf.OperatorSettings()
    if namespaces and NamespacePatterns(tuple(namespaces)).names_only:
        # Fixed namespaces need no observing of namespaces and CRDs (and no cluster-wide RBAC); globs
        # do: kopf resolves them against the namespaces it observes.
        ks.scanning.disabled = True
    if settings.label_selector:
        # On the list and the watch themselves: a shard is never sent another shard's products.
        ks.watching.label_selectors[GROUP, PLURAL] = settings.label_selector
    # Events say which operator (and shard) wrote them (kubectl describe's "From" column).
    ks.posting.reporting_component = "datamesh-operator"
    ks.posting.reporting_instance = settings.shard or "datamesh-operator"
    ks.persistence.finalizer = settings.finalizer
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=settings.annotation_prefix)
    # Digests of the spec, not the spec: the annotation stays small whatever the spec holds.
    ks.persistence.diffbase_storage = DigestDiffBaseStorage(
        prefix=settings.annotation_prefix, key="last-handled-configuration"
    )
    # Without these a watch can hang forever on a silently dropped connection.
    ks.watching.server_timeout = settings.watch_server_timeout
    ks.watching.client_timeout = settings.watch_client_timeout
    ks.watching.connect_timeout = settings.watch_connect_timeout
    ks.posting.level = logging.INFO
    # kopf keeps an object's worker for idle_timeout after its last event (default 5 s); with a
    # bounded pool that capped a burst of new products at ~64 per 6 s. Release workers sooner.
    # A worker is held while its product waits for an ingestion slot: with 256 and an apply of 1,000
    # faster than the slots, products went 13-31 s without a status and an edit waited 17-26 s.
    ks.queueing.worker_limit = settings.kopf_workers
    ks.queueing.idle_timeout = 0.5
    return ks


def build_registry(settings: OperatorSettings, namespaces: list[str] | None = None) -> kopf.OperatorRegistry:
    """A registry with every handler of the DataProduct operator (``namespaces``: the watched ones, or all)."""
    registry = kopf.OperatorRegistry()
    selector = settings.selector
    patterns = NamespacePatterns(tuple(namespaces)) if namespaces else None
    scope = CatalogScope(patterns, by_label=selector is not None)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(memo: kopf.Memo, retry: int, **_: Any) -> None:
        try:
            if getattr(memo, "runtime", None) is None:
                memo.runtime = await build_runtime(settings, getattr(memo, "store", None))
            # The catalog is derived state: make it hold exactly the products that exist now, within
            # this operator's scope (its namespaces, and with a label selector its own entries only).
            # Globs are resolved here as kopf resolves them: list everywhere, keep what matches.
            listed = namespaces if patterns is not None and patterns.names_only else None
            bodies = await memo.runtime.kube.list_products(
                *RESOURCE, namespaces=listed, label_selector=settings.label_selector
            )
            if patterns is not None and listed is None:
                bodies = [b for b in bodies if patterns.matches(str(b["metadata"].get("namespace", "")))]
            entries = [e for e in map(entry_of_object, bodies) if e is not None]
            await memo.runtime.catalog.replace_all(entries, scope)
        except Exception as exc:
            if retry >= 5:
                raise kopf.PermanentError(f"cannot start: {exc}") from exc
            raise kopf.TemporaryError(f"start-up failed, retrying: {exc}", delay=min(30, 2**retry)) from exc
        log.info("catalog rebuilt with %d entries", len(entries))

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        runtime: Runtime | None = getattr(memo, "runtime", None)
        if runtime is not None:
            await runtime.close()
            memo.runtime = None

    @kopf.on.probe(registry=registry, id="products")
    def probe_products(memo: kopf.Memo, **_: Any) -> int:
        return memo.runtime.reconciler.known_products if getattr(memo, "runtime", None) else 0

    @kopf.on.probe(registry=registry, id="progress")
    def probe_progress(memo: kopf.Memo, **_: Any) -> dict[str, float]:
        # A raising probe makes kopf's liveness endpoint answer 500, so the kubelet restarts a stuck operator.
        runtime: Runtime | None = getattr(memo, "runtime", None)
        if runtime is None:
            return {}
        heartbeat = runtime.reconciler.heartbeat
        stuck = heartbeat.stall(settings.liveness_stall_seconds)
        if stuck is not None:
            raise kopf.PermanentError(stuck)
        return {"inFlight": heartbeat.in_flight, "stalledSeconds": round(heartbeat.stalled_for() or 0.0, 1)}

    # The running resync daemon of each product (uid -> its token). A DELETED event ends an object's
    # life in this operator's watch: a deletion, or a relabel out of a label shard's selector (the API
    # server then sends the object as it was, old labels and all). kopf stops daemons only for
    # deletions it saw begin, so without this an orphaned daemon would go on reconciling the product
    # (restamping its catalog entry) after another shard took it over.
    watched: dict[str, object] = {}

    def pending_unwritten(body: kopf.Body) -> bool:
        # Pending from the moment the operator takes a product on (its finalizer is on), written at
        # once rather than with the first reconcile's result, so products waiting for an ingestion
        # slot never show a blank phase. Not in the cycle that adds the finalizer: kopf adds it with a
        # resourceVersion check, which a status write in the same cycle would defeat.
        return (
            settings.finalizer in (body.metadata.get("finalizers") or [])
            and not body.metadata.deletion_timestamp
            and not (body.get("status") or {}).get("phase")
        )

    def arrival_matters(type: str, body: kopf.Body, **_: Any) -> bool:
        # kopf logs every handler call it makes at INFO: called on every watch event, this handler
        # was most of the operator's log (25,000 of 41,000 lines at 10,000 products) for nothing.
        return type == "DELETED" or pending_unwritten(body)

    @kopf.on.event(*RESOURCE, registry=registry, when=arrival_matters)
    async def arrived(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        if type == "DELETED":
            watched.pop(body.metadata.uid or "", None)
            return
        try:  # the filter let through only this other case: Pending not written yet
            await memo.runtime.kube.patch_product_status(*RESOURCE, body, arrival_status().wire())
        except Exception as exc:  # a courtesy: the reconcile writes the real status anyway
            log.debug("Pending not written for %s/%s: %s", body.metadata.namespace, body.metadata.name, exc)

    # No resume handler: after a restart, products already handled are checked by resync below,
    # spread over one period, so products applied meanwhile never queue behind thousands of them.
    # Products a previous run left unfinished (Degraded, retrying) are continued by kopf itself.
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry, field="spec")
    async def reconcile_product(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
        runtime: Runtime = memo.runtime
        outcome = await runtime.reconciler.reconcile(
            body, retry=retry, write=lambda outcome: write_outcome(runtime, outcome, body)
        )
        if outcome is None:
            return
        if outcome.retry_after is not None:
            raise kopf.TemporaryError(outcome.status.message or "transient failure", delay=outcome.retry_after)

    @kopf.daemon(*RESOURCE, registry=registry, cancellation_timeout=5.0)
    async def resync(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
        # Periodic checks: due refreshes, endpoints, SLA and drift. A daemon rather than a timer,
        # so each product's period follows its own refresh interval.
        period = settings.sla_check_seconds
        uid, token = body.metadata.uid or "", object()
        watched[uid] = token
        delay = first_check(body, period)
        # Slept with asyncio, and stopped by kopf's cancellation: awaiting stopped.wait() left a
        # task behind that failed the operator's shutdown with a TimeoutError. The cancellation is
        # how kopf ends every product's checks (at shutdown, on deletion), no error: kopf logged a
        # WARNING for each product when it propagated.
        with contextlib.suppress(asyncio.CancelledError):
            while not stopped:
                await asyncio.sleep(delay)
                if watched.get(uid) is not token:
                    # It left this operator's watch (see arrived): another shard's now, or gone.
                    log.info(
                        "%s/%s left this operator's watch (relabelled into another shard, or deleted): its periodic "
                        "checks stop here",
                        body.metadata.namespace,
                        body.metadata.name,
                    )
                    return
                checked_at = utcnow()
                spec, status = parse_spec(body), parse_status(body)  # kopf keeps body current
                # Only products whose status answers their spec: the others are the change handlers' own.
                if spec is not None and status.observed_generation == body.metadata.get("generation"):
                    try:
                        async with memo.runtime.checks:
                            await _resync(memo.runtime, body, spec, status)
                    except Exception as exc:  # the next check retries; a failing one must not end the daemon
                        log.warning("check of %s/%s failed: %s", body.metadata.namespace, body.metadata.name, exc)
                # Counted from when the check began: a check that ends just after a refresh fell due
                # would otherwise read the refresh as missed and wait a whole interval for it.
                spent = (utcnow() - checked_at).total_seconds()
                delay = max(0.0, _next_check(parse_spec(body), parse_status(body), period, checked_at) - spent)

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def delete_product(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await memo.runtime.reconciler.finalize(body)

    for group_version, plural in (("apps/v1", "deployments"), ("v1", "services")):

        @kopf.on.event(group_version, plural, registry=registry, labels={"app.kubernetes.io/managed-by": MANAGED_BY})
        async def child_changed(
            *,
            type: str,
            body: kopf.Body,
            memo: kopf.Memo,
            **_: Any,
        ) -> None:
            # A child deleted or edited by hand is put back from its owner's spec; a Deployment that
            # gains or loses its available replicas updates InferenceReady at once. The owner is
            # read when needed, not indexed: an index costs a worker per product at start.
            owner = body.metadata.labels.get("datamesh.io/product")
            if owner is None or type not in ("DELETED", "MODIFIED"):
                return
            runtime: Runtime = memo.runtime
            product = await runtime.kube.read_product(*RESOURCE, body.metadata.namespace or "default", owner)
            if product is None or (product.get("metadata") or {}).get("deletionTimestamp"):
                return  # the product is going away; let the garbage collector finish
            if selector is not None and not selector.matches((product.get("metadata") or {}).get("labels")):
                return  # children do not carry their product's labels: another shard's product
            if await _repair_children(runtime, product, body, deleted=type == "DELETED"):
                return
            if body.get("kind") == "Deployment" and _availability_changed(product, body):
                await runtime.reconciler.reconcile(
                    product, write=lambda outcome: write_outcome(runtime, outcome, product)
                )

    if settings.ingest_job_min_bytes is not None:

        @kopf.on.event(
            "batch/v1",
            "jobs",
            registry=registry,
            labels={"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/component": JOB_ROLE},
        )
        async def ingest_job_changed(*, type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
            # An ingestion Job that ended: its product adopts what it wrote (or says why it failed) now, not at
            # its next periodic check. A Job being deleted was handled already: the operator deletes them.
            if type != "MODIFIED" or body.metadata.deletion_timestamp or job_phase(body)[0] == "running":
                return
            owner = product_of_job(body)
            if owner is None:
                return
            runtime: Runtime = memo.runtime
            product = await runtime.kube.read_product(*RESOURCE, *owner)
            if product is None or (product.get("metadata") or {}).get("deletionTimestamp"):
                return
            if selector is not None and not selector.matches((product.get("metadata") or {}).get("labels")):
                return  # another shard's product
            await runtime.reconciler.reconcile(product, write=lambda outcome: write_outcome(runtime, outcome, product))

    return registry


def first_check(body: kopf.Body, period: float) -> float:
    """Seconds until a product's first periodic check in this run (see ``core.sla.first_check_in``)."""
    status = parse_status(body)
    spread = first_check_in(body.metadata.uid or "", period, status.observed_generation is not None)
    return min(spread, _next_check(parse_spec(body), status, period, utcnow()))


def _next_check(spec: DataProductSpec | None, status: DataProductStatus, period: float, at: datetime) -> float:
    # Parsed by the caller, once: after a restart every product's daemon starts at once, while kopf
    # is still listing them, and each parse of a status then delays the listing.
    return period if spec is None else next_check_in(spec, status.last_ingested_at, at, period)


async def _resync(runtime: Runtime, body: kopf.Body, spec: DataProductSpec, status: DataProductStatus) -> None:
    """One periodic check of a product whose status reflects its spec; writes status only when it changed."""
    refresh = refresh_due(spec, status.last_ingested_at, utcnow())

    async def write_if_changed(outcome: Outcome) -> None:
        # Compared with the status as kopf sees it now: another reconcile may have written since
        # this check read it.
        if outcome.events or _comparable(outcome.status) != _comparable(parse_status(body)):
            await write_outcome(runtime, outcome, body)

    outcome = await runtime.reconciler.reconcile(body, refresh=refresh, write=write_if_changed)
    if outcome is None:
        return
    sla = outcome.status.sla
    for objective, met in (
        ("freshness", sla and sla.freshness_met),
        ("availability", sla and sla.availability_met),
    ):
        metrics.SLA_BREACHES.labels(
            namespace=body.metadata.namespace, name=body.metadata.name, objective=objective
        ).set(1 if met is False else 0)


def _comparable(status: DataProductStatus) -> dict[str, Any]:
    """Status without the time of the last SLA check, which changes on every timer tick."""
    data = status.model_dump(by_alias=True, mode="json")
    if data.get("sla"):
        data["sla"].pop("lastCheckedAt", None)
    return data


async def _repair_children(runtime: Runtime, product: Mapping[str, Any], child: kopf.Body, deleted: bool) -> bool:
    """Put a deleted or hand-edited child back; True when it had to."""
    spec = parse_spec(product)
    if spec is None or spec.inference is None or not spec.inference.enabled or not spec.inference.model:
        return False
    meta = product["metadata"]
    defaults = runtime.settings.runtime_defaults()
    for obj in desired_objects(meta["namespace"], meta["name"], meta["uid"], spec.inference, defaults):
        if obj["kind"] == child.get("kind") and (deleted or drifted(obj, child)):
            log.info("restoring %s %s/%s", obj["kind"], meta["namespace"], obj["metadata"]["name"])
            await runtime.kube.apply(obj)
            return True
    return False


def _availability_changed(product: Mapping[str, Any], deployment: Mapping[str, Any]) -> bool:
    """Whether the Deployment's availability differs from what the product's InferenceReady says."""
    available, _ = deployment_available(deployment)
    conditions = parse_status(product).conditions
    inference = next((c for c in conditions if c.type == ConditionType.inference_ready.value), None)
    return inference is None or (inference.status == "True") != available
