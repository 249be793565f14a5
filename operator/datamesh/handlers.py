"""kopf handlers for DataProduct: thin adapters from kopf's events to the reconcile core.

Handlers are registered on an explicit registry built by :func:`build_registry`, so the
operator command, the tests and a second operator in one process never share global state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import kopf

from datamesh import metrics
from datamesh.catalog import CatalogWriter, catalog_entry
from datamesh.inference import MANAGED_BY, KubeInferenceBackend, desired_objects
from datamesh.kube import ConfigMapCatalogBackend, Kube, api_client
from datamesh.models import GROUP, PLURAL, VERSION, DataProductSpec, DataProductStatus
from datamesh.qdrant import VectorStore
from datamesh.reconcile import Outcome, Reconciler, refresh_due
from datamesh.conditions import utcnow
from datamesh.settings import OperatorSettings

log = logging.getLogger(__name__)

RESOURCE = (GROUP, VERSION, PLURAL)


@dataclass
class Runtime:
    """What the handlers of one operator process share (kept in kopf's memo)."""

    settings: OperatorSettings
    kube: Kube
    store: VectorStore
    catalog: CatalogWriter
    http: httpx.AsyncClient
    reconciler: Reconciler
    owns_store: bool

    async def close(self) -> None:
        await self.catalog.close()
        await self.http.aclose()
        await self.kube.close()
        if self.owns_store:
            await self.store.close()


async def build_runtime(settings: OperatorSettings, store: VectorStore | None = None) -> Runtime:
    """Connect to the API server and Qdrant; ``store`` lets tests share one embedded Qdrant."""
    kube = Kube(await api_client())
    owns_store = store is None
    if store is None:
        store = VectorStore.connect(settings.qdrant_url, settings.qdrant_path, settings.qdrant_api_key, settings.qdrant_timeout)
    backend = ConfigMapCatalogBackend(kube, settings.platform_namespace, settings.catalog_prefix)
    catalog = CatalogWriter(backend, settings.catalog_prefix, settings.catalog_shard_bytes, settings.catalog_flush_seconds)
    http = httpx.AsyncClient(timeout=settings.url_timeout, limits=httpx.Limits(max_connections=32))
    reconciler = Reconciler(settings, store, catalog, http, KubeInferenceBackend(kube, settings), kube.read_config_map_key)
    return Runtime(settings, kube, store, catalog, http, reconciler, owns_store)


def write_outcome(outcome: Outcome, body: kopf.Body, patch: kopf.Patch) -> None:
    """Put the outcome's status into the patch and post its events."""
    # Every managed field is written, None included, so a cleared value is removed by the merge patch.
    patch.status.update(outcome.status.model_dump(by_alias=True, mode="json"))
    for event in outcome.events:
        kopf.event(body, type="Warning" if event.warning else "Normal", reason=event.reason, message=event.message[:1000])


def kopf_settings(settings: OperatorSettings, namespaces: list[str] | None = None) -> kopf.OperatorSettings:
    """kopf's own settings: our finalizer and annotation prefix, and watch timeouts."""
    ks = kopf.OperatorSettings()
    if namespaces:
        # Fixed namespaces need no observing of namespaces and CRDs (and no cluster-wide RBAC).
        ks.scanning.disabled = True
    ks.persistence.finalizer = settings.finalizer
    ks.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=settings.annotation_prefix)
    ks.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=settings.annotation_prefix, key="last-handled-configuration"
    )
    # Without these a watch can hang forever on a silently dropped connection.
    ks.watching.server_timeout = settings.watch_server_timeout
    ks.watching.client_timeout = settings.watch_client_timeout
    ks.watching.connect_timeout = settings.watch_connect_timeout
    ks.posting.level = logging.INFO
    # kopf keeps an object's worker for idle_timeout after its last event (default 5 s); with a
    # bounded pool that capped a burst of new products at ~64 per 6 s. Release workers sooner.
    ks.queueing.worker_limit = 256
    ks.queueing.idle_timeout = 0.5
    return ks


def build_registry(settings: OperatorSettings, namespaces: list[str] | None = None) -> kopf.OperatorRegistry:
    """A registry with every handler of the DataProduct operator (``namespaces``: the watched ones, or all)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(memo: kopf.Memo, retry: int, **_: Any) -> None:
        try:
            if getattr(memo, "runtime", None) is None:
                memo.runtime = await build_runtime(settings, getattr(memo, "store", None))
            # The catalog is derived state: make it hold exactly the products that exist now.
            entries = []
            for body in await memo.runtime.kube.list_products(*RESOURCE, namespaces=namespaces):
                meta = body["metadata"]
                try:
                    spec = DataProductSpec.model_validate(body.get("spec") or {})
                except ValueError:
                    continue
                status = DataProductStatus.model_validate(body.get("status") or {})
                entries.append(catalog_entry(meta["namespace"], meta["name"], int(meta.get("generation") or 1), spec, status))
            await memo.runtime.catalog.replace_all(entries, namespaces=namespaces)
        except Exception as exc:
            if retry >= 5:
                raise kopf.PermanentError(f"cannot start: {exc}") from exc
            raise kopf.TemporaryError(f"start-up failed, retrying: {exc}", delay=min(30, 2 ** retry)) from exc
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

    @kopf.index(*RESOURCE, registry=registry, id="products")
    def products(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Mapping[str, Any]]:
        return {(namespace, name): dict(body)}

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, registry=registry, field="spec")
    async def reconcile_product(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, retry: int, **_: Any) -> None:
        outcome = await memo.runtime.reconciler.reconcile(body, retry=retry)
        if outcome is None:
            return
        write_outcome(outcome, body, patch)
        if outcome.retry_after is not None:
            raise kopf.TemporaryError(outcome.status.message or "transient failure", delay=outcome.retry_after)

    @kopf.timer(*RESOURCE, registry=registry, interval=settings.sla_check_seconds, initial_delay=settings.sla_check_seconds, sharp=False)
    async def resync(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        # Refresh due sources, re-check endpoints, SLA and drift; nothing is written when nothing changed.
        status = DataProductStatus.model_validate(body.get("status") or {})
        try:
            spec = DataProductSpec.model_validate(body.get("spec") or {})
        except ValueError:
            return
        refresh = refresh_due(spec, status.last_ingested_at, utcnow())
        outcome = await memo.runtime.reconciler.reconcile(body, refresh=refresh)
        if outcome is None:
            return
        if outcome.events or _comparable(outcome.status) != _comparable(status):
            write_outcome(outcome, body, patch)
        sla = outcome.status.sla
        for objective, met in (("freshness", sla and sla.freshness_met), ("availability", sla and sla.availability_met)):
            metrics.SLA_BREACHES.labels(namespace=body.metadata.namespace, name=body.metadata.name, objective=objective).set(1 if met is False else 0)

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def delete_product(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await memo.runtime.reconciler.finalize(body)

    for group_version, plural in (("apps/v1", "deployments"), ("v1", "services")):

        @kopf.on.event(group_version, plural, registry=registry, labels={"app.kubernetes.io/managed-by": MANAGED_BY})
        async def child_changed(
            type: str, body: kopf.Body, memo: kopf.Memo, products: kopf.Index[tuple[str, str], Mapping[str, Any]], **_: Any
        ) -> None:
            # Drift repair: a child deleted or edited by hand is put back from its owner's spec.
            owner = body.metadata.labels.get("datamesh.io/product")
            if owner is None or type not in ("DELETED", "MODIFIED"):
                return
            for product in products.get((body.metadata.namespace, owner), []):
                await _repair_children(memo.runtime, product, body, deleted=type == "DELETED")

    return registry


def _comparable(status: DataProductStatus) -> dict[str, Any]:
    """Status without the time of the last SLA check, which changes on every timer tick."""
    data = status.model_dump(by_alias=True, mode="json")
    if data.get("sla"):
        data["sla"].pop("lastCheckedAt", None)
    return data


async def _repair_children(runtime: Runtime, product: Mapping[str, Any], child: kopf.Body, deleted: bool) -> None:
    if (product.get("metadata") or {}).get("deletionTimestamp"):
        return  # the product is going away; let the garbage collector finish
    try:
        spec = DataProductSpec.model_validate(product.get("spec") or {})
    except ValueError:
        return
    if spec.inference is None or not spec.inference.enabled or not spec.inference.model:
        return
    meta = product["metadata"]
    for obj in desired_objects(meta["namespace"], meta["name"], meta["uid"], spec.inference, runtime.settings):
        if obj["kind"] != child.get("kind"):
            continue
        if deleted or _drifted(obj, child):
            log.info("restoring %s %s/%s", obj["kind"], meta["namespace"], obj["metadata"]["name"])
            await runtime.kube.apply(obj)


def _drifted(desired: Mapping[str, Any], actual: Mapping[str, Any]) -> bool:
    """Whether a field the operator sets differs in the live object."""
    for key, value in desired.items():
        if isinstance(value, Mapping):
            if not isinstance(actual.get(key), Mapping) or _drifted(value, actual[key]):
                return True
        elif isinstance(value, list):
            live = actual.get(key)
            if not isinstance(live, list) or len(live) != len(value):
                return True
            if any(_drifted(v, a) if isinstance(v, Mapping) and isinstance(a, Mapping) else v != a for v, a in zip(value, live)):
                return True
        elif actual.get(key) != value:
            return True
    return False


async def run_operator(
    settings: OperatorSettings,
    *,
    namespaces: list[str] | None = None,
    liveness_endpoint: str | None = None,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
    store: VectorStore | None = None,
) -> None:
    """Run the operator until ``stop_flag`` is set (or forever)."""
    memo = kopf.Memo(store=store, runtime=None)
    await kopf.operator(
        registry=build_registry(settings, namespaces),
        settings=kopf_settings(settings, namespaces),
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness_endpoint,
        standalone=True,
        memo=memo,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
