"""Settings of the query service, from ``DATAMESH_QUERY_*`` (the store's from ``DATAMESH_QDRANT_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class QuerySettings(BaseSettings):
    """Settings of the query service, from ``DATAMESH_QUERY_*`` (Qdrant comes from ``DATAMESH_QDRANT_*``)."""

    model_config = SettingsConfigDict(env_prefix="DATAMESH_QUERY_", extra="ignore")

    catalog_namespace: str = Field("datamesh-system", description="Namespace of the catalog ConfigMaps (watched).")
    catalog_file: str | None = Field(
        None, description="Read the catalog from this file instead of the Kubernetes API (local mode)."
    )
    tokens_file: str | None = Field(
        None, description="YAML/JSON {token: {identity, groups}} (mounted from a Secret); re-read when it changes."
    )
    allow_anonymous: bool = Field(
        False, description="Serve callers without a token as 'anonymous' (they see products open to '*')."
    )
    mcp: bool = Field(
        False,
        description="Also serve the mesh as MCP tools for AI agents at /mcp (streamable HTTP), with the same tokens.",
    )
    timeout_cap_seconds: float = Field(
        5.0, gt=0, description="Longest per-product query timeout, whatever the product's SLA says."
    )
    default_timeout_seconds: float = Field(
        2.0, gt=0, description="Per-product timeout of products without sla.queryLatencyP99."
    )
    max_products: int = Field(
        10, ge=1, le=50, description="Products asked per question unless the request's maxProducts says otherwise."
    )
    fanout_concurrency: int = Field(16, ge=1, description="Products queried at the same time for one request.")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body accepted (413 beyond).")
    transform_timeout_seconds: float = Field(
        30.0, gt=0, description="Timeout of a product's inference endpoint on /transform."
    )
    watch_timeout_seconds: int = Field(
        60, ge=5, description="Seconds the API server keeps a catalog watch open before it is renewed."
    )
    log_level: str = Field("info", description="uvicorn log level.")
