"""The operator's composition root: the adapters wired into the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.http import EndpointProbe
from datamesh.adapters.kube import ConfigMapCatalogBackend, Kube, KubeInferenceBackend, api_client
from datamesh.adapters.sources import SourceLoader
from datamesh.adapters.stores import open_store
from datamesh.controller.metrics import PrometheusObserver
from datamesh.core.ports import VectorStore
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.engine.reconciler import Ports, Reconciler
from datamesh.resource.models import GROUP, PLURAL, VERSION
from datamesh.settings import OperatorSettings, StoreSettings

log = logging.getLogger(__name__)


class StatusProgress:
    """Writes a long ingestion's progress into the product's status, at most every ``interval`` seconds."""

    def __init__(self, kube: Kube, interval: float = 2.0) -> None:
        self.kube = kube
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}

    async def __call__(self, namespace: str, name: str, done: int, total: int) -> None:
        key = (namespace, name)
        now = time.monotonic()
        if done >= total:
            self._last.pop(key, None)  # the reconcile's own status write clears the progress
            return
        if now - self._last.setdefault(key, now) < self.interval:
            return
        self._last[key] = now
        product = {"metadata": {"namespace": namespace, "name": name}}
        progress = {"ingestion": {"rowsDone": done, "rowsTotal": total}}
        try:
            await self.kube.patch_product_status(GROUP, VERSION, PLURAL, product, progress)
        except Exception as exc:  # progress is a courtesy: never fail an ingestion over it
            log.debug("progress of %s/%s not written: %s", namespace, name, exc)


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
    # Periodic checks in flight at once (settings.check_concurrency): after a restart thousands fall
    # due within half a period, and unbounded they held every store slot, so a new product's
    # reconcile waited minutes behind them.
    checks: asyncio.Semaphore

    async def close(self) -> None:
        """Flush the catalog and release every connection."""
        await self.catalog.close()
        await self.http.aclose()
        await self.kube.close()
        if self.owns_store:
            await self.store.close()


async def build_runtime(settings: OperatorSettings, store: VectorStore | None = None) -> Runtime:
    """Connect to the API server and the store; ``store`` lets tests share one embedded store."""
    kube = Kube(await api_client())
    owns_store = store is None
    if store is None:
        store = open_store(StoreSettings())
    observer = PrometheusObserver()
    backend = ConfigMapCatalogBackend(kube, settings.platform_namespace, settings.catalog_prefix)
    catalog = CatalogWriter(
        backend,
        settings.catalog_prefix,
        settings.catalog_shard_bytes,
        settings.catalog_flush_seconds,
        observer,
        shard=settings.shard,
    )
    http = httpx.AsyncClient(timeout=settings.url_timeout, limits=httpx.Limits(max_connections=32))
    ports = Ports(
        store=store,
        catalog=catalog,
        embedders=resolve_provider,
        load_rows=SourceLoader(http, kube.read_config_map_key, settings.url_timeout),
        probe=EndpointProbe(http, settings.url_timeout),
        inference=KubeInferenceBackend(kube, settings.runtime_defaults()),
        observer=observer,
        progress=StatusProgress(kube),
    )
    return Runtime(
        settings,
        kube,
        store,
        catalog,
        http,
        Reconciler(settings, ports),
        owns_store,
        asyncio.Semaphore(settings.check_concurrency),
    )
