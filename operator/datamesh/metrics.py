"""Prometheus metrics of the operator."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram("datamesh_reconcile_duration_seconds", "Time to reconcile one DataProduct.", ["result"])
RECONCILE_ERRORS = Counter("datamesh_reconcile_errors_total", "Reconciles that ended Degraded or Failed.", ["phase", "reason"])
PRODUCTS_BY_PHASE = Gauge("datamesh_products", "DataProducts known to this operator, by phase.", ["phase"])
CATALOG_WRITES = Counter("datamesh_catalog_writes_total", "Catalog ConfigMap (or file) writes.")
INGESTED_ROWS = Counter("datamesh_ingested_rows_total", "Rows embedded and upserted into Qdrant.")
REJECTED_ROWS = Counter("datamesh_rejected_rows_total", "Source rows refused by schema validation.")
SLA_BREACHES = Gauge("datamesh_sla_breached", "1 while a product's SLA is breached.", ["namespace", "name", "objective"])
