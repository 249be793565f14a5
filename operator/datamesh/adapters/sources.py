"""Reading a product's rows from its source: inline, a ConfigMap key, or a URL.

A URL is downloaded into a temporary file (bounded by ``maxBytes``) and its rows are read from
there in batches, as often as the ingestion needs to pass over them: csv, jsonl and parquet
stream; a json document is parsed whole. Memory stays bounded by a batch, not by the source.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

import httpx

from datamesh.adapters.http import RETRY_STATUSES, RetriesExhausted, RetryableResponse, with_retries
from datamesh.core.ports import SourceError
from datamesh.core.rows import Row
from datamesh.resource.models import Source, SourceFormat

# Reads a ConfigMap key: (namespace, name, key) -> text, or None when the ConfigMap or key is missing.
ConfigMapReader = Callable[[str, str, str], Awaitable[str | None]]
_CHUNK = 1 << 16


def _objects(rows: Any) -> list[Row]:
    if isinstance(rows, dict):
        rows = rows.get("rows", rows.get("data"))
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("expected a list of JSON objects (or an object with a 'rows' list)")
    return [dict(r) for r in rows]


def _parse_errors(fmt: SourceFormat) -> Callable[[Exception], SourceError]:
    def wrap(exc: Exception) -> SourceError:
        return SourceError(f"cannot parse the source as {fmt.value}: {exc}", transient=False)

    return wrap


def _text_rows(stream: IO[str], fmt: SourceFormat) -> Iterator[Row]:
    if fmt is SourceFormat.csv:
        for row in csv.DictReader(stream):
            yield dict(row)
    elif fmt is SourceFormat.jsonl:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                value = json.loads(line)
                if not isinstance(value, dict):
                    raise ValueError(f"line {number} is not a JSON object")
                yield value
    else:
        yield from _objects(json.load(stream))


def _parquet_rows(path: Path, batch: int) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SourceError(
            "parquet sources need pyarrow: pip install 'datamesh-operator[parquet]'", transient=False
        ) from exc
    try:
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch):
            rows: list[Row] = record_batch.to_pylist()
            yield from rows
    except SourceError:
        raise
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise SourceError(f"cannot parse the source as parquet: {exc}", transient=False) from exc


def _batched(rows: Iterator[Row], size: int, fmt: SourceFormat) -> Iterator[list[Row]]:
    errors = _parse_errors(fmt)
    while True:
        try:
            batch = list(islice(rows, size))
        except (ValueError, UnicodeDecodeError, csv.Error) as exc:
            raise errors(exc) from exc
        if not batch:
            return
        yield batch


class RowsInMemory:
    """Rows already held (inline rows, a ConfigMap key)."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def batches(self, size: int) -> Iterator[list[Row]]:
        """The rows, ``size`` at a time."""
        for start in range(0, len(self.rows), size):
            yield self.rows[start : start + size]

    def close(self) -> None:
        return None


class SpooledRows:
    """Rows of a downloaded file, read from disk in batches, as many times as asked."""

    def __init__(self, path: Path, fmt: SourceFormat) -> None:
        self.path = path
        self.format = fmt

    def batches(self, size: int) -> Iterator[list[Row]]:
        """The file's rows, ``size`` at a time (parsed as they are read)."""
        if self.format is SourceFormat.parquet:
            yield from _batched(_parquet_rows(self.path, size), size, self.format)
            return
        with open(self.path, encoding="utf-8-sig", newline="") as stream:
            yield from _batched(_text_rows(stream, self.format), size, self.format)

    def close(self) -> None:
        """Remove the downloaded file."""
        self.path.unlink(missing_ok=True)


def parse_rows(data: bytes | str, fmt: SourceFormat | str) -> list[Row]:
    """Rows of a whole csv, jsonl, json (array of objects) or parquet document."""
    fmt = SourceFormat(fmt)
    if fmt is SourceFormat.parquet:
        raw = data if isinstance(data, bytes) else data.encode()
        with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
            tmp.write(raw)
            tmp.flush()
            return [row for batch in SpooledRows(Path(tmp.name), fmt).batches(4096) for row in batch]
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        return list(_text_rows(io.StringIO(text, newline=""), fmt))
    except (ValueError, UnicodeDecodeError, csv.Error) as exc:
        raise _parse_errors(fmt)(exc) from exc


async def fetch_url(
    client: httpx.AsyncClient,
    url: str,
    max_bytes: int,
    attempts: int = 3,
    timeout: float = 30.0,
    into: IO[bytes] | None = None,
) -> bytes:
    """GET ``url`` with a size cap, retrying connection errors, 429 and 5xx with backoff.

    With ``into`` the body is written there (and b"" returned), so it is never held in memory.
    """

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
            if into is not None:
                into.seek(0)
                into.truncate()
            body = bytearray()
            size = 0
            async for chunk in response.aiter_bytes(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise SourceError(f"{url} is over the source's maxBytes of {max_bytes}", transient=False)
                if into is not None:
                    into.write(chunk)
                else:
                    body += chunk
            return bytes(body)

    try:
        return await with_retries(attempt, method="GET", url=url, attempts=attempts, backoff_base=1.0, backoff_max=8.0)
    except RetriesExhausted as exc:
        raise SourceError(f"cannot fetch {url}: {exc.cause}", transient=True) from exc


class SourceLoader:
    """Opens a product's source for reading (the reconciler's row loader)."""

    def __init__(self, http: httpx.AsyncClient, read_config_map: ConfigMapReader | None, timeout: float = 30.0) -> None:
        self.http = http
        self.read_config_map = read_config_map
        self.timeout = timeout

    async def size(self, source: Source) -> int | None:
        """A url source's size as its server declares it to a HEAD request (None: not declared, or not a url)."""
        if source.url is None:
            return None
        url = source.url.url

        async def attempt() -> int | None:
            response = await self.http.head(url, timeout=self.timeout, follow_redirects=True)
            if response.status_code in RETRY_STATUSES:
                raise RetryableResponse(response)
            declared = response.headers.get("content-length")
            return int(declared) if response.status_code < 400 and declared and declared.isdigit() else None

        try:
            return await with_retries(attempt, method="HEAD", url=url, attempts=3, backoff_base=1.0, backoff_max=8.0)
        except RetriesExhausted:
            return None  # the ingestion's own GET says what is wrong

    async def __call__(self, source: Source, namespace: str) -> RowsInMemory | SpooledRows:
        """The source's rows, ready to be read in batches (a URL is downloaded to a temporary file)."""
        if source.inline is not None:
            return RowsInMemory([dict(r) for r in source.inline])
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
            return RowsInMemory(parse_rows(text, ref.format))
        if source.url is None:
            raise SourceError("source must set exactly one of inline, configMapRef or url", transient=False)
        fd, name = tempfile.mkstemp(prefix="datamesh-source-")
        rows = SpooledRows(Path(name), SourceFormat(source.url.format))
        try:
            with os.fdopen(fd, "wb") as spool:
                await fetch_url(self.http, source.url.url, source.url.max_bytes, timeout=self.timeout, into=spool)
        except BaseException:
            rows.close()
            raise
        return rows
