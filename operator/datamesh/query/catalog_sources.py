"""Where the query service reads the discovery catalog from.

In a cluster: a watch on the labelled catalog ConfigMaps (list once, then stream changes; a
change reaches queries as soon as the API server sends it). In local mode: the catalog file,
re-read when it changes, or entries held in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from datamesh.adapters.files import WatchedFile, read_catalog_file
from datamesh.core.backoff import backoff_delay
from datamesh.query.settings import QuerySettings
from datamesh.resource.catalog import CATALOG_LABEL, CatalogEntry, decode_entries

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 16 * 1024 * 1024  # a ConfigMap is at most 1 MiB; its JSON event a few times that at worst


@runtime_checkable
class CatalogSource(Protocol):
    """The current catalog, kept up to date in the background once started."""

    @property
    def loaded(self) -> bool:
        """True once a complete catalog has been read (readiness)."""
        ...

    def entries(self) -> dict[str, CatalogEntry]:
        """Every entry by catalog key (``<ns>.<name>``); callers must not mutate it."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StaticCatalogSource:
    """Entries held in memory, replaced with :meth:`set` (local mode, tests)."""

    def __init__(self, entries: Mapping[str, CatalogEntry] | None = None) -> None:
        self._entries: dict[str, CatalogEntry] = dict(entries or {})
        self._loaded = entries is not None

    @property
    def loaded(self) -> bool:
        return self._loaded

    def set(self, entries: Mapping[str, CatalogEntry]) -> None:
        """Replace the whole catalog."""
        self._entries = dict(entries)
        self._loaded = True

    def entries(self) -> dict[str, CatalogEntry]:
        return self._entries

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


class FileCatalogSource:
    """The catalog file written by the file catalog backend, re-read when it changes.

    The file is checked on access (one ``stat``): no background task, and a writer's atomic
    rename is seen by the very next request.
    """

    def __init__(self, path: str | Path) -> None:
        self._file = WatchedFile(path, read_catalog_file, "catalog file")

    @property
    def loaded(self) -> bool:
        self._file.refresh()
        return self._file.loaded

    def entries(self) -> dict[str, CatalogEntry]:
        return self._file.refresh() or {}

    async def start(self) -> None:
        self._file.refresh()

    async def stop(self) -> None:
        return None


class KubeCatalogSource:
    """The catalog ConfigMaps of one namespace, through a list and a resumable watch.

    The watch resumes from the last resourceVersion when it ends or fails, re-lists when the
    API server answers 410 Gone, and backs off with jitter while the API server is away; the
    last known catalog keeps serving queries meanwhile.
    """

    def __init__(
        self,
        namespace: str,
        *,
        api_factory: Callable[[], Awaitable[client.ApiClient]] | None = None,
        timeout_seconds: int = 60,
        request_timeout: float = 15.0,
        backoff_base: float = 0.2,
        backoff_max: float = 5.0,
    ) -> None:
        self.namespace = namespace
        self.label_selector = f"{CATALOG_LABEL}=true"
        self._api_factory = api_factory
        # The API server ends each watch after timeout_seconds; the client gives up a little
        # later, so a connection that silently died is noticed within that bound.
        self.timeout_seconds = timeout_seconds
        self.request_timeout = request_timeout
        self.backoff = (backoff_base, backoff_max)
        self._shards: dict[str, dict[str, CatalogEntry]] = {}
        self._merged: dict[str, CatalogEntry] = {}
        self._loaded = False
        self._api: client.ApiClient | None = None
        self._task: asyncio.Task[None] | None = None
        self.resource_version: str | None = None
        self.relists = 0  # full lists done (the first, then one per 410 Gone)
        self.watches = 0  # watch connections opened

    @property
    def loaded(self) -> bool:
        return self._loaded

    def entries(self) -> dict[str, CatalogEntry]:
        return self._merged

    async def start(self) -> None:
        """Begin listing and watching in the background (readiness follows :attr:`loaded`)."""
        if self._task is not None:
            return
        if self._api is None:
            if self._api_factory is None:
                from datamesh.adapters.kube import api_client

                self._api_factory = api_client
            self._api = await self._api_factory()
        self._task = asyncio.create_task(self._run(), name=f"catalog-watch-{self.namespace}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._api is not None:
            await self._api.close()
            self._api = None

    def _publish(self) -> None:
        merged: dict[str, CatalogEntry] = {}
        for name in sorted(self._shards):  # deterministic if a key were ever in two shards
            merged.update(self._shards[name])
        self._merged = merged  # swapped whole: readers never see a half-applied change

    async def _run(self) -> None:
        assert self._api is not None
        core = client.CoreV1Api(self._api)
        failures = 0
        gone = 0  # 410s in a row: a second one right after a fresh list means back off, not spin
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self.resource_version is None:
                    await self._list(core)
                began = loop.time()
                await self._watch(core)
                gone = 0
                if loop.time() - began < 1.0:
                    # A watch that ends at once is a server in trouble, not a timeout: do not spin.
                    failures += 1
                    await self._back_off(failures, "the watch ended immediately")
                else:
                    failures = 0  # the server ended the watch after timeout_seconds: resume at once
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:
                    log.info("catalog watch expired (410 Gone): re-listing")
                    self.resource_version = None
                    gone += 1
                    if gone > 1:
                        await self._back_off(gone - 1, "410 Gone again right after a list")
                    continue
                failures += 1
                await self._back_off(failures, f"HTTP {exc.status}: {exc.reason}")
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                failures += 1
                await self._back_off(failures, f"{type(exc).__name__}: {exc}")

    async def _back_off(self, failures: int, cause: str) -> None:
        delay = backoff_delay(failures, *self.backoff)
        log.warning("catalog watch failed (%s); retrying in %.2fs", cause, delay)
        await asyncio.sleep(delay)

    async def _list(self, core: client.CoreV1Api) -> None:
        result = await core.list_namespaced_config_map(
            self.namespace, label_selector=self.label_selector, _request_timeout=self.request_timeout
        )
        self._shards = {cm.metadata.name: decode_entries(cm.data or {}) for cm in result.items}
        self.resource_version = result.metadata.resource_version
        self.relists += 1
        self._loaded = True
        self._publish()

    async def _watch(self, core: client.CoreV1Api) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_seconds + 30, sock_connect=self.request_timeout)
        # Without preloading, the client returns aiohttp's raw response, not the list its stubs name.
        response: aiohttp.ClientResponse = await core.list_namespaced_config_map(  # type: ignore[assignment]
            self.namespace,
            label_selector=self.label_selector,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self.resource_version or "",
            timeout_seconds=self.timeout_seconds,
            _preload_content=False,
            _request_timeout=timeout,
        )
        self.watches += 1
        try:
            if not 200 <= response.status <= 299:
                # Unpreloaded responses are not status-checked by the client library.
                body = (await response.read())[:500].decode(errors="replace")
                raise ApiException(status=response.status, reason=body or response.reason)
            # One event per line, and a shard's event can approach the 1 MiB ConfigMap limit: lines are
            # split here, with an explicit bound, since aiohttp's readline() caps a line at a
            # version-dependent multiple of its read buffer.
            pending = bytearray()
            async for chunk in response.content.iter_any():
                pending += chunk
                while (end := pending.find(b"\n")) >= 0:
                    line = bytes(pending[:end])
                    del pending[: end + 1]
                    if line.strip():
                        self._apply(json.loads(line))
                if len(pending) > MAX_EVENT_BYTES:
                    raise ValueError(f"a catalog watch event is larger than {MAX_EVENT_BYTES} bytes")
            # The server closed the watch (timeout_seconds): the caller resumes from resource_version.
        finally:
            response.release()

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            raise ApiException(status=obj.get("code", 500), reason=f"{obj.get('reason')}: {obj.get('message')}")
        meta = obj.get("metadata") or {}
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        if kind == "BOOKMARK":
            return
        name = str(meta.get("name") or "")
        if kind == "DELETED":
            self._shards.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._shards[name] = decode_entries(obj.get("data") or {})
        else:
            return
        self._publish()


def source_of(settings: QuerySettings) -> CatalogSource:
    """The catalog source the settings name: the catalog file, else the ConfigMaps of the catalog namespace."""
    if settings.catalog_file:
        return FileCatalogSource(settings.catalog_file)
    return KubeCatalogSource(settings.catalog_namespace, timeout_seconds=settings.watch_timeout_seconds)
