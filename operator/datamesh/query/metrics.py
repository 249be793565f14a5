"""The query service's Prometheus metrics, in a registry of each app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Scope

from datamesh.query.catalog_sources import CatalogSource
from datamesh.web.observe import RequestObserver


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, source: CatalogSource) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "datamesh_query_requests_total", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.duration = Histogram(
            "datamesh_query_request_duration_seconds", "HTTP request latency by route.", ["route"], registry=r
        )
        self.product_seconds = Histogram(
            "datamesh_query_product_duration_seconds",
            "Latency of one product's part of a query, by outcome.",
            ["outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.product_errors = Counter(
            "datamesh_query_product_errors_total", "Per-product query errors by kind.", ["kind"], registry=r
        )
        self.routed = Histogram(
            "datamesh_query_routed_products",
            "Products a question was routed to.",
            buckets=(0, 1, 2, 3, 5, 10, 20, 50),
            registry=r,
        )
        self.routing_seconds = Histogram(
            "datamesh_query_routing_seconds",
            "Time to route a question.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        # No product count: /metrics is unauthenticated, and the count would reveal hidden products.
        Gauge("datamesh_query_catalog_loaded", "1 once the catalog has been read.", registry=r).set_function(
            lambda: float(source.loaded)
        )


class RequestMetrics(RequestObserver):
    """Counts and times every HTTP request by route template (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.duration.labels(route).observe(seconds)
