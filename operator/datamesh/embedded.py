"""The operator and the query service in one process, over one embedded store.

Qdrant's embedded engine (qdrant-edge, used when ``DATAMESH_QDRANT_URL`` is unset) is locked
to the process that opens its folder, so an operator pod and separate query-service pods cannot
share it. ``datamesh operator --query-port PORT`` (the chart's ``store.mode: embedded``) runs
both here instead: the query app of :func:`datamesh.query.app.create_app` over the operator's
own store, reading the catalog the operator writes through the same ConfigMap watch a separate
query service would use (``KubeCatalogSource`` of the operator's platform namespace).

With leader election (the default of ``datamesh operator``) this whole function is what the
elected leader runs: a standby opens neither the store nor the query port (so it is never Ready
behind the query Service) until it leads. The chart runs this mode with one replica: see its
"High availability".
"""

from __future__ import annotations

import asyncio
import logging

from datamesh.adapters.stores import open_store
from datamesh.controller.main import run_operator
from datamesh.query.app import authenticator_of, create_app
from datamesh.query.catalog_sources import KubeCatalogSource
from datamesh.query.settings import QuerySettings
from datamesh.settings import OperatorSettings, StoreSettings
from datamesh.web.serving import serve_app

log = logging.getLogger(__name__)


async def run_operator_with_query(
    settings: OperatorSettings,
    *,
    host: str,
    port: int,
    namespaces: list[str] | None = None,
    liveness_endpoint: str | None = None,
    query_settings: QuerySettings | None = None,
    stop_flag: asyncio.Event | None = None,
) -> None:
    """Serve the query API on ``host:port`` while the operator runs; both stop together."""
    store_settings = StoreSettings()
    # The catalog is the one this operator writes, whatever DATAMESH_QUERY_CATALOG_NAMESPACE says.
    qs = query_settings or QuerySettings(catalog_namespace=settings.platform_namespace, catalog_file=None)
    store = open_store(store_settings, concurrency=max(store_settings.concurrency, qs.fanout_concurrency))
    source = KubeCatalogSource(qs.catalog_namespace, timeout_seconds=qs.watch_timeout_seconds)
    app = create_app(source, store, qs, authenticator_of(qs), host=host)
    try:
        async with serve_app(app, host=host, port=port, log_level=qs.log_level) as url:
            log.info("query API on %s (catalog of namespace %s)", url, qs.catalog_namespace)
            if qs.mcp:
                log.info("MCP tools for AI agents on %s/mcp", url)
            await run_operator(
                settings,
                namespaces=namespaces,
                liveness_endpoint=liveness_endpoint,
                store=store,
                stop_flag=stop_flag,
            )
    finally:
        await store.close()
