"""Files as adapters: the local catalog file, and files re-read when they change."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from datamesh.adapters.atomic import atomic_write
from datamesh.core.ports import Shard
from datamesh.resource.catalog import CatalogEntry, decode_entries

log = logging.getLogger(__name__)
T = TypeVar("T")


class WatchedFile(Generic[T]):
    """A file parsed by ``parse`` and parsed again whenever it changes (checked with one stat per access).

    A missing or unreadable file keeps the last good value: a Secret volume or a writer's
    atomic rename may make it briefly absent.
    """

    def __init__(self, path: str | Path, parse: Callable[[Path], T], what: str = "file") -> None:
        self.path = Path(path)
        self.parse = parse
        self.what = what
        self.value: T | None = None
        self._stamp: tuple[int, int, int] | None = None

    @property
    def loaded(self) -> bool:
        """Whether the file has been read successfully at least once."""
        return self._stamp is not None

    def refresh(self, *, strict: bool = False) -> T | None:
        """The current value, re-read if the file changed; ``strict`` raises instead of keeping the old one."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if strict:
                raise
            return self.value
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return self.value
        try:
            self.value = self.parse(self.path)
        except (OSError, ValueError) as exc:
            if strict:
                raise ValueError(f"{self.what} {self.path}: {exc}") from exc
            log.error("%s %s is unreadable, keeping the previous contents: %s", self.what, self.path, exc)
            return self.value
        self._stamp = stamp
        return self.value


class FileCatalogBackend:
    """The catalog as one JSON file (local mode): ``{shard: {key: entry-json}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> dict[str, dict[str, str]]:
        if not self.path.exists():
            return {}
        doc: dict[str, dict[str, str]] = json.loads(self.path.read_text() or "{}")
        return doc

    async def list_shards(self) -> list[Shard]:
        return [Shard(name, data, "1") for name, data in sorted(self._load().items())]

    async def read_shard(self, name: str) -> Shard:
        data = self._load().get(name)
        return Shard(name, data or {}, "1" if data is not None else None)

    async def write_shard(self, shard: Shard) -> None:
        doc = self._load()
        doc[shard.name] = shard.data
        atomic_write(self.path, json.dumps(doc, indent=1, sort_keys=True))


def read_catalog_file(path: Path) -> dict[str, CatalogEntry]:
    """Every entry of a file catalog."""
    doc = json.loads(path.read_text() or "{}") if path.exists() else {}
    entries: dict[str, CatalogEntry] = {}
    for data in doc.values():
        entries.update(decode_entries(data))
    return entries
