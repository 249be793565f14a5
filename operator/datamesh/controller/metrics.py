"""Prometheus metrics of the operator, and the observer that feeds them."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_SECONDS = Histogram("datamesh_reconcile_duration_seconds", "Time to reconcile one DataProduct.", ["result"])
RECONCILE_ERRORS = Counter(
    "datamesh_reconcile_errors_total", "Reconciles that ended Degraded or Failed.", ["phase", "reason"]
)
PRODUCTS_BY_PHASE = Gauge("datamesh_products", "DataProducts known to this operator, by phase.", ["phase"])
CATALOG_WRITES = Counter("datamesh_catalog_writes_total", "Catalog ConfigMap (or file) writes.")
INGESTED_ROWS = Counter("datamesh_ingested_rows_total", "Rows embedded and upserted into Qdrant.")
REJECTED_ROWS = Counter("datamesh_rejected_rows_total", "Source rows refused by schema validation.")
LEADER = Gauge("datamesh_operator_leader", "1 while this operator process holds the leader-election lease.")
SLA_BREACHES = Gauge(
    "datamesh_sla_breached", "1 while a product's SLA is breached.", ["namespace", "name", "objective"]
)


class PrometheusObserver:
    """The engine's observer port, as the metrics above."""

    def reconciled(self, phase: str, seconds: float, reason: str | None) -> None:
        RECONCILE_SECONDS.labels(result=phase).observe(seconds)
        if reason is not None:
            RECONCILE_ERRORS.labels(phase=phase, reason=reason).inc()

    def phase_changed(self, old: str | None, new: str | None) -> None:
        if old is not None:
            PRODUCTS_BY_PHASE.labels(phase=old).dec()
        if new is not None:
            PRODUCTS_BY_PHASE.labels(phase=new).inc()

    def rows_ingested(self, count: int) -> None:
        INGESTED_ROWS.inc(count)

    def rows_rejected(self, count: int) -> None:
        REJECTED_ROWS.inc(count)

    def catalog_written(self) -> None:
        CATALOG_WRITES.inc()
