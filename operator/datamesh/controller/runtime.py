"""The operator's composition root: the adapters wired into the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx
import yaml

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.http import EndpointProbe
from datamesh.adapters.kube import ConfigMapCatalogBackend, Kube, KubeInferenceBackend, KubeIngestJobs, api_client
from datamesh.adapters.sources import SourceLoader
from datamesh.adapters.stores import open_job_store, open_store
from datamesh.controller.metrics import PrometheusObserver
from datamesh.core.jobs import JobPolicy
from datamesh.core.ports import VectorStore
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.engine.ingest_job import IngestReport, run_ingestion
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


def ingest_jobs(kube: Kube, settings: OperatorSettings) -> KubeIngestJobs | None:
    """Ingestion Jobs from the settings' pod template, or None when every source is ingested here."""
    if settings.ingest_job_min_bytes is None or settings.ingest_job_template is None:
        return None
    template = yaml.safe_load(settings.ingest_job_template.read_text())
    if not isinstance(template, dict):
        raise ValueError(f"{settings.ingest_job_template}: expected a pod template (metadata, spec)")
    policy = JobPolicy(
        settings.ingest_job_backoff_limit, settings.ingest_job_deadline_seconds, settings.ingest_job_ttl_seconds
    )
    return KubeIngestJobs(kube, settings.platform_namespace, template, policy)


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
    loader = SourceLoader(http, kube.read_config_map_key, settings.url_timeout)
    ports = Ports(
        store=store,
        catalog=catalog,
        embedders=resolve_provider,
        load_rows=loader,
        probe=EndpointProbe(http, settings.url_timeout),
        inference=KubeInferenceBackend(kube, settings.runtime_defaults()),
        observer=observer,
        progress=StatusProgress(kube),
        jobs=ingest_jobs(kube, settings),
        source_size=loader.size,
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


async def ingest_in_job(namespace: str, name: str, settings: OperatorSettings) -> IngestReport:
    """What ``datamesh ingest`` runs in an ingestion Job's pod: the product read, ingested, and reported."""
    kube = Kube(await api_client())
    try:
        body = await kube.read_product(GROUP, VERSION, PLURAL, namespace, name)
        if body is None:
            return IngestReport(generation=0, error=f"DataProduct {namespace}/{name} does not exist", permanent=True)
        store = open_job_store(StoreSettings(), namespace, name)
        async with httpx.AsyncClient(timeout=settings.url_timeout) as http:
            try:
                return await run_ingestion(
                    body,
                    store,
                    resolve_provider,
                    SourceLoader(http, kube.read_config_map_key, settings.url_timeout),
                    StatusProgress(kube),
                    batch_size=settings.ingest_batch_size,
                    routing_rows=settings.routing_rows_per_product,
                )
            finally:
                await store.close()  # the embedded store flushes its collections for the operator to adopt
    finally:
        await kube.close()
