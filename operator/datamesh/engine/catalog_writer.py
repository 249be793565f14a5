"""The coalescing catalog writer: many entry changes, few conflict-safe shard writes.

The catalog is derived state. The operator rebuilds it from the DataProducts that exist on
start, and writes are coalesced: every change within a short window becomes one write per
touched shard, so a thousand products applied at once cause a handful of ConfigMap updates.
Several operators (shards of the product set) may share one catalog: each stamps its entries
with its shard's name, and each start-up rebuild replaces only the entries in its own scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from datamesh.core.ports import CatalogBackend, Conflict, NullObserver, Observer
from datamesh.core.selector import NamespacePatterns
from datamesh.resource.catalog import CatalogEntry, decode_entries, encode_entry


@dataclass(frozen=True)
class CatalogScope:
    """Which entries one operator's start-up rebuild may replace: those of the products it can see."""

    namespaces: NamespacePatterns | None = None  # None: every namespace
    by_label: bool = False  # it sees only the products matching a label selector

    def owns(self, key: str, entry: CatalogEntry | None, shard: str | None) -> bool:
        """Whether the entry at ``key`` (``entry`` as read, None if unreadable) is this operator's to replace."""
        # Keys are "<namespace>.<name>" (or a shortening of it) and namespaces hold no dots.
        if self.namespaces is not None and not self.namespaces.matches(key.split(".", 1)[0]):
            return False
        # A label shard shares its namespaces with other shards: only the entries it stamped are its
        # own. (An entry written before sharding carries no shard; its product's shard restamps it.)
        return not self.by_label or (entry is not None and entry.shard == shard)


class CatalogWriter:
    """Coalesces catalog changes into few, conflict-safe shard writes (entries stamped with ``shard``)."""

    def __init__(
        self,
        backend: CatalogBackend,
        prefix: str,
        shard_bytes: int,
        flush_seconds: float,
        observer: Observer | None = None,
        shard: str | None = None,
    ) -> None:
        self.backend = backend
        self.observer: Observer = observer or NullObserver()
        self.shard = shard
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.flush_seconds = flush_seconds
        self.writes = 0
        self._pending: dict[str, str | None] = {}  # key -> encoded entry, or None to remove
        self._waiters: list[asyncio.Future[None]] = []
        self._location: dict[str, str] = {}  # key -> shard name
        self._sizes: dict[str, int] = {}
        self._loaded = False
        self._flusher: asyncio.Task[None] | None = None
        self._last_flush = float("-inf")
        self._lock = asyncio.Lock()

    async def load(self) -> dict[str, CatalogEntry]:
        """Read the shards that exist; learn where each entry lives."""
        entries: dict[str, CatalogEntry] = {}
        self._location.clear()
        self._sizes.clear()
        for shard in await self.backend.list_shards():
            self._sizes[shard.name] = _size(shard.data)
            for key in shard.data:
                self._location[key] = shard.name
            entries.update(decode_entries(shard.data))
        self._loaded = True
        return entries

    async def upsert(self, entry: CatalogEntry) -> None:
        """Put an entry; returns once it is written."""
        await self._submit(entry.key, self._encode(entry))

    async def remove(self, key: str) -> None:
        """Remove an entry; returns once it is gone."""
        await self._submit(key, None)

    async def replace_all(self, entries: Iterable[CatalogEntry], scope: CatalogScope | None = None) -> None:
        """Make the catalog hold exactly ``entries`` within ``scope`` (the rebuild on start; default: all of it).

        Entries outside the scope are left alone, so operators over other namespaces, or other label
        shards, may share the catalog.
        """
        scope = scope or CatalogScope()
        async with self._lock:
            current = await self.load()  # fresh: another operator may have written since
        wanted = {e.key: self._encode(e) for e in entries}
        for key in list(self._location):
            if key not in wanted and scope.owns(key, current.get(key), self.shard):
                self._pending[key] = None
        self._pending.update(wanted)
        await self._submit_pending()

    def _encode(self, entry: CatalogEntry) -> str:
        return encode_entry(entry if self.shard is None else entry.model_copy(update={"shard": self.shard}))

    async def _submit(self, key: str, value: str | None) -> None:
        self._pending[key] = value
        await self._submit_pending()

    async def _submit_pending(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())
        await waiter

    async def _flush_soon(self) -> None:
        # Leading edge: a change to an idle catalog is written at once; changes arriving while
        # writes are recent wait out the window and go together.
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._last_flush + self.flush_seconds - loop.time()))
        while self._waiters:
            self._last_flush = loop.time()
            pending, self._pending = self._pending, {}
            waiters, self._waiters = self._waiters, []
            try:
                async with self._lock:
                    await self._flush(pending)
            except Exception as exc:
                # Put the changes back so the next flush retries them, and tell every waiter.
                self._pending = {**pending, **self._pending}
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
            else:
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
            # After a failure too: a failing API must not be retried in a tight loop.
            if self._waiters:
                await asyncio.sleep(self.flush_seconds)

    def _place(self, key: str, value: str) -> str:
        """The shard for a new key: the first with room, or a new one."""
        needed = len(key) + len(value)
        for name in sorted(self._sizes):
            if self._sizes[name] + needed <= self.shard_bytes:
                return name
        name = f"{self.prefix}-{len(self._sizes)}"
        while name in self._sizes:
            name += "x"
        self._sizes[name] = 0
        return name

    async def _flush(self, pending: dict[str, str | None]) -> None:
        if not self._loaded:
            await self.load()
        by_shard: dict[str, dict[str, str | None]] = {}
        for key, value in pending.items():
            shard = self._location.get(key)
            if shard is None:
                if value is None:
                    continue
                shard = self._place(key, value)
                self._location[key] = shard
            by_shard.setdefault(shard, {})[key] = value
            self._sizes[shard] = self._sizes.get(shard, 0) + len(key) + len(value or "")
        overflow: dict[str, str | None] = {}
        for shard_name, changes in by_shard.items():
            overflow.update(await self._write_with_retry(shard_name, changes))
        if overflow:
            # Another writer filled the shard first: place the rest elsewhere.
            await self._flush(overflow)

    async def _write_with_retry(
        self, shard_name: str, changes: dict[str, str | None], attempts: int = 8
    ) -> dict[str, str | None]:
        """Apply ``changes`` to one shard; returns the new keys that no longer fit in it."""
        delay = 0.05
        for attempt in range(attempts):
            shard = await self.backend.read_shard(shard_name)
            size = _size(shard.data)
            overflow: dict[str, str | None] = {}
            before = dict(shard.data)
            for key, value in changes.items():
                old = shard.data.pop(key, None)
                if old is not None:
                    size -= len(key) + len(old)
                if value is None:
                    continue
                if old is None and size + len(key) + len(value) > self.shard_bytes:
                    overflow[key] = value
                    continue
                shard.data[key] = value
                size += len(key) + len(value)
            # Periodic checks put back entries that are already there: writing the shard anyway
            # rewrote up to 800 kB per flush for nothing and made every query service re-read it.
            if shard.data != before:
                try:
                    await self.backend.write_shard(shard)
                except Conflict:
                    if attempt == attempts - 1:
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                self.writes += 1
                self.observer.catalog_written()
            self._sizes[shard_name] = self.shard_bytes if overflow else _size(shard.data)
            for key, value in changes.items():
                if (value is None or key in overflow) and self._location.get(key) == shard_name:
                    del self._location[key]
            return overflow
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Wait for an in-flight flush."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)


def _size(data: Mapping[str, Any]) -> int:
    return sum(len(k) + len(v) for k, v in data.items())
