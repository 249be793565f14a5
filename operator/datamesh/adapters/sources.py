"""Reading a product's rows from its source: inline, a ConfigMap key, or a URL."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Awaitable, Callable

import httpx

from datamesh.adapters.http import RETRY_STATUSES, RetriesExhausted, RetryableResponse, with_retries
from datamesh.core.ports import SourceError
from datamesh.core.rows import Row
from datamesh.resource.models import Source, SourceFormat

# Reads a ConfigMap key: (namespace, name, key) -> text, or None when the ConfigMap or key is missing.
ConfigMapReader = Callable[[str, str, str], Awaitable[str | None]]


def parse_rows(data: bytes | str, fmt: SourceFormat | str) -> list[Row]:
    """Rows of a csv, jsonl, json (array of objects) or parquet document."""
    fmt = SourceFormat(fmt)
    try:
        if fmt is SourceFormat.parquet:
            return _parse_parquet(data if isinstance(data, bytes) else data.encode())
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        if fmt is SourceFormat.csv:
            return [dict(r) for r in csv.DictReader(io.StringIO(text))]
        if fmt is SourceFormat.jsonl:
            rows: object = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            doc = json.loads(text)
            rows = doc.get("rows", doc.get("data")) if isinstance(doc, dict) else doc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("expected a list of JSON objects (or an object with a 'rows' list)")
        return [dict(r) for r in rows]
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"cannot parse the source as {fmt.value}: {exc}", transient=False) from exc


def _parse_parquet(data: bytes) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SourceError(
            "parquet sources need pyarrow: pip install 'datamesh-operator[parquet]'", transient=False
        ) from exc
    try:
        table: list[Row] = pq.read_table(io.BytesIO(data)).to_pylist()
        return table
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise SourceError(f"cannot parse the source as parquet: {exc}", transient=False) from exc


async def fetch_url(
    client: httpx.AsyncClient, url: str, max_bytes: int, attempts: int = 3, timeout: float = 30.0
) -> bytes:
    """GET ``url`` with a size cap, retrying connection errors, 429 and 5xx with backoff."""

    async def attempt() -> bytes:
        async with client.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code in RETRY_STATUSES:
                raise RetryableResponse(response)
            if response.status_code >= 400:
                raise SourceError(
                    f"GET {url} answered HTTP {response.status_code}", transient=response.status_code in (404, 408)
                )
            declared = int(response.headers.get("content-length") or 0)
            if declared > max_bytes:
                raise SourceError(
                    f"{url} is {declared} bytes, over the source's maxBytes of {max_bytes}", transient=False
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise SourceError(f"{url} is over the source's maxBytes of {max_bytes}", transient=False)
            return bytes(body)

    try:
        return await with_retries(attempt, method="GET", url=url, attempts=attempts, backoff_base=1.0, backoff_max=8.0)
    except RetriesExhausted as exc:
        raise SourceError(f"cannot fetch {url}: {exc.cause}", transient=True) from exc


class SourceLoader:
    """Reads a product's rows from its source (the reconciler's row loader)."""

    def __init__(self, http: httpx.AsyncClient, read_config_map: ConfigMapReader | None, timeout: float = 30.0) -> None:
        self.http = http
        self.read_config_map = read_config_map
        self.timeout = timeout

    async def __call__(self, source: Source, namespace: str) -> list[Row]:
        """All rows of a product's source."""
        if source.inline is not None:
            return [dict(r) for r in source.inline]
        if source.config_map_ref is not None:
            ref = source.config_map_ref
            if self.read_config_map is None:
                raise SourceError(
                    "configMapRef sources need a Kubernetes API (not available in local mode)", transient=False
                )
            text = await self.read_config_map(namespace, ref.name, ref.key)
            if text is None:
                raise SourceError(
                    f"ConfigMap {namespace}/{ref.name} or its key {ref.key!r} does not exist", transient=True
                )
            return parse_rows(text, ref.format)
        if source.url is None:
            raise SourceError("source must set exactly one of inline, configMapRef or url", transient=False)
        data = await fetch_url(self.http, source.url.url, source.url.max_bytes, timeout=self.timeout)
        return parse_rows(data, source.url.format)
