"""Local mode: the operator's lifecycle on a folder of manifests, without any cluster.

``datamesh local DIR`` checks the manifests in DIR as ``kubectl apply`` and the API server
would (``datamesh.resource.manifest``: apiVersion, kind, name, namespace, and the spec with the
models the CRD is generated from), reconciles the DataProducts with the same core into an
embedded Qdrant under ``.datamesh/``, writes the catalog to a file, and serves the query API on
127.0.0.1. Operator and query service share one process and one store, since the embedded
store locks its folder. Before any work starts it makes sure the port is free and no other
``datamesh local`` uses the state folder; it exits 1 when a manifest was refused or a product
is Failed. With ``--mcp`` the same server also serves the MCP tools for AI agents at /mcp; a
separate ``datamesh mcp --state-dir`` opens the folder only when no ``datamesh local`` holds it
(:func:`local_state`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from datamesh.adapters.embeddings.registry import resolve_provider
from datamesh.adapters.files import FileCatalogBackend
from datamesh.adapters.http import EndpointProbe
from datamesh.adapters.sources import SourceLoader
from datamesh.adapters.stores import open_store
from datamesh.core import ports
from datamesh.core.conditions import Check, ConditionType
from datamesh.core.ports import VectorStoreError
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.engine.reconciler import Outcome, Ports, ProductRef, Reconciler, no_progress
from datamesh.resource.catalog import entry_of_object
from datamesh.resource.manifest import Verdict, check_file
from datamesh.resource.models import Inference
from datamesh.settings import OperatorSettings, StoreSettings
from datamesh.web.serving import ServerStartError, bind_socket, serve_app, serve_forever

if TYPE_CHECKING:
    from fastapi import FastAPI

    from datamesh.query.access import Authenticator

STATE_DIR = Path(".datamesh")
LOCK_FILE = "datamesh-local.lock"
CATALOG_FILE = "catalog.json"
STATUS_FILE = "status.json"
STORE_DIR = "store"
EVERYONE = "*"


@dataclass
class ManifestError:
    """A manifest local mode could not use, with where and why."""

    path: Path
    name: str
    message: str

    def line(self) -> str:
        """How local mode reports it: the file first, then the object and the reason."""
        return f"refused {self.path} ({self.name}): {self.message}"


@dataclass
class LoadedManifests:
    """The DataProducts found in a folder, the documents that were refused, and the other objects."""

    products: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)
    others: Counter[str] = field(default_factory=Counter)


def manifest_files(directory: Path) -> list[Path]:
    """The manifest files of a folder, as ``kubectl apply -f DIR`` picks them (not recursive)."""
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml"), *directory.glob("*.json")])


def load_manifests(directory: Path) -> LoadedManifests:
    """Every DataProduct in ``directory`` (not recursive, like ``kubectl apply -f DIR``), checked."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder of manifests")
    return load_files(manifest_files(directory))


def load_files(paths: list[Path]) -> LoadedManifests:
    """The DataProducts of these manifest files, and every document refused, by file."""
    loaded = LoadedManifests()
    seen: set[tuple[str, str]] = set()
    for path in paths:
        checked = check_file(path)
        if checked.error is not None:
            loaded.errors.append(ManifestError(path, "-", checked.error))
            continue
        for doc in checked.documents:
            if doc.verdict is Verdict.other:
                loaded.others[str(doc.body.get("kind"))] += 1  # Namespaces and such mean nothing without a cluster
                continue
            if doc.verdict is Verdict.refused:
                loaded.errors.append(ManifestError(path, doc.key, doc.message))
                continue
            if (doc.namespace, doc.name) in seen:
                loaded.errors.append(ManifestError(path, doc.key, "declared twice in this folder"))
                continue
            seen.add((doc.namespace, doc.name))
            uid = hashlib.sha256(doc.key.encode()).hexdigest()[:32]
            meta = doc.body.get("metadata") or {}
            body = {**doc.body, "metadata": {**meta, "namespace": doc.namespace, "generation": 1, "uid": uid}}
            loaded.products.append((path, body))
    return loaded


class PreflightError(Exception):
    """Local mode cannot start: the port or the state folder is taken. The message names the option that helps."""


def check_port_free(host: str, port: int) -> None:
    """PreflightError unless the query API could listen on ``host:port`` now."""
    try:
        bind_socket(host, port).close()
    except OSError as exc:
        reason = "is already in use" if exc.errno in (98, 48, 10048) else f"cannot be used ({exc.strerror or exc})"
        raise PreflightError(
            f"port {port} on {host} {reason} (another `datamesh local`?): choose a free one with --port, "
            "or pass --no-serve to reconcile without serving"
        ) from None


class StateInUse(PreflightError):
    """The state folder is held by another process: a `datamesh local` or `datamesh mcp`, or one unknown."""

    def __init__(self, state_dir: Path, holder: str | None) -> None:
        super().__init__(in_use_message(state_dir, holder))
        self.state_dir, self.holder = state_dir, holder


class StateLock:
    """An exclusive lock on a state folder for one process at a time, holding its pid and command."""

    def __init__(self, state_dir: Path, command: str = "datamesh local") -> None:
        self.path = state_dir / LOCK_FILE
        self.command = command
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or StateInUse naming the process that holds it (PreflightError if the folder is unusable)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.path.open("a+")
        except OSError as exc:
            raise PreflightError(
                f"cannot use the state folder {self.path.parent}: {exc.strerror or exc}: "
                "choose another with --state-dir"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            pid, _, command = handle.read().strip().partition(" ")
            handle.close()
            # A lock file of an older version holds the pid alone: it was a `datamesh local`.
            raise StateInUse(
                self.path.parent, f"`{command or 'datamesh local'}` (pid {pid})" if pid else None
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {self.command}")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


def in_use_message(state_dir: Path, holder: str | None) -> str:
    who = f"another {holder}" if holder else "another process (another `datamesh local`?)"
    return f"the state folder {state_dir} is in use by {who}: stop it, or choose another folder with --state-dir"


async def probe_store(store: ports.VectorStore, state_dir: Path) -> None:
    """StateInUse if another process holds the embedded store's files (its WAL lock).

    The state lock finds another ``datamesh local`` or ``datamesh mcp`` of this version; this finds
    any other process that opened the store, by opening one collection of the last run.
    """
    try:
        saved = json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return
    for kept in saved.values():
        collection = ((kept or {}).get("status") or {}).get("collection")
        if not collection:
            continue
        try:
            # A sample, not a count: a count may come from what the last run saved, opening nothing.
            await store.sample(collection, 1)
        except VectorStoreError as exc:
            if "WAL" in str(exc) or "lock" in str(exc).lower():
                raise StateInUse(state_dir, None) from exc
        return


@contextlib.asynccontextmanager
async def local_state(state_dir: Path, command: str) -> AsyncIterator[tuple[ports.VectorStore, Path]]:
    """A local mode state folder for another command (``datamesh mcp``): locked, its store open, its catalog file.

    PreflightError (StateInUse when a running ``datamesh local`` holds it) or when no run has written a catalog.
    """
    lock = StateLock(state_dir, command)
    lock.acquire()
    try:
        catalog = state_dir / CATALOG_FILE
        if not catalog.is_file():
            raise PreflightError(
                f"the state folder {state_dir} holds no catalog ({catalog}): reconcile manifests into it first "
                f"with `datamesh local DIR --state-dir {state_dir} --no-serve`"
            )
        store = open_store(StoreSettings(url=None, path=str(state_dir / STORE_DIR)))
        try:
            await probe_store(store, state_dir)
            yield store, catalog
        finally:
            await store.close()
    finally:
        lock.release()


@dataclass
class LocalOutcome:
    """What a ``datamesh local`` run found: its exit code is 1 when anything was refused or Failed."""

    refused: int = 0
    failed: int = 0
    products: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.refused or self.failed or not self.products else 0


def readers_of(body: dict[str, Any]) -> list[str] | None:
    """Who may read a product, or None when everyone may (``access.consumers`` holds "*")."""
    consumers = ((body.get("spec") or {}).get("access") or {}).get("consumers", [EVERYONE])
    return None if EVERYONE in consumers else [str(c) for c in consumers]


def standalone_reconciler(
    settings: OperatorSettings,
    store: ports.VectorStore,
    catalog: CatalogWriter,
    http: httpx.AsyncClient,
    inference: ports.InferenceBackend | None = None,
    progress: ports.Progress = no_progress,
) -> Reconciler:
    """A reconciler without a cluster: the built-in embedders, inline and url sources, HTTP probes."""
    wiring = Ports(
        store=store,
        catalog=catalog,
        embedders=resolve_provider,
        load_rows=SourceLoader(http, None, settings.url_timeout),
        probe=EndpointProbe(http, settings.url_timeout),
        inference=inference,
        progress=progress,
    )
    return Reconciler(settings, wiring)


class LocalInferenceBackend:
    """Serves each ``inference.model`` with the built-in runtime, in this process, on a local port."""

    def __init__(self) -> None:
        self._urls: dict[str, str] = {}
        self._servers = contextlib.AsyncExitStack()

    async def ensure(self, namespace: str, name: str, uid: str, spec: Inference) -> tuple[Check, str | None]:
        """Start (once per model) a runtime serving the product's model; its URL is the endpoint."""
        from datamesh.inference.runtime import RuntimeSettings, create_app

        model = spec.model or ""
        if model not in self._urls:
            runtime = create_app(RuntimeSettings(model=model))
            try:
                self._urls[model] = await self._servers.enter_async_context(serve_app(runtime, startup_timeout=10.0))
            except (ServerStartError, OSError) as exc:
                message = f"the built-in runtime for {model} did not start: {exc}"
                return Check(ConditionType.inference_ready, False, "RuntimeFailed", message, transient=True), None
        url = self._urls[model]
        return Check(
            ConditionType.inference_ready, True, "RuntimeServing", f"built-in runtime serving {model} at {url}"
        ), url

    async def close(self) -> None:
        await self._servers.aclose()


class LocalRun:
    """One ``datamesh local`` session: state under ``state_dir``, products from one folder."""

    def __init__(self, state_dir: Path = STATE_DIR, console: Console | None = None) -> None:
        self.state_dir = state_dir
        self.console = console or Console()
        self.settings = OperatorSettings(catalog_flush_seconds=0.05, metrics_port=0)
        self.store = open_store(StoreSettings(url=None, path=str(state_dir / STORE_DIR)))
        self.catalog_path = state_dir / CATALOG_FILE
        self.catalog = CatalogWriter(
            FileCatalogBackend(self.catalog_path),
            "catalog",
            self.settings.catalog_shard_bytes,
            self.settings.catalog_flush_seconds,
        )
        self.http = httpx.AsyncClient(timeout=self.settings.url_timeout)
        self.inference = LocalInferenceBackend()
        self._status_path = state_dir / STATUS_FILE

    def _saved_status(self) -> dict[str, Any]:
        # Status survives between runs, so a second run over unchanged manifests writes nothing.
        return json.loads(self._status_path.read_text()) if self._status_path.exists() else {}

    async def probe_store(self) -> None:
        """StateInUse if another process holds the embedded store's files (see :func:`probe_store`)."""
        await probe_store(self.store, self.state_dir)

    async def reconcile_all(self, products: list[tuple[Path, dict[str, Any]]]) -> list[tuple[dict[str, Any], Outcome]]:
        """Reconcile every product with progress bars; returns each body with its outcome."""
        saved = self._saved_status()
        results: list[tuple[dict[str, Any], Outcome]] = []
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            console=self.console,
            transient=False,
        ) as progress:
            tasks = {}
            for _, body in products:
                ref = ProductRef.of(body)
                rows = len(((body.get("spec") or {}).get("source") or {}).get("inline") or []) or None
                tasks[(ref.namespace, ref.name)] = progress.add_task(f"{ref.namespace}/{ref.name}", total=rows)

            async def on_rows(namespace: str, name: str, done: int, total: int) -> None:
                progress.update(tasks[(namespace, name)], total=total, completed=done)

            reconciler = standalone_reconciler(
                self.settings, self.store, self.catalog, self.http, self.inference, on_rows
            )
            await self.catalog.load()
            state: dict[str, Any] = {}
            entries = []
            for _, body in products:
                ref = ProductRef.of(body)
                key = f"{ref.namespace}/{ref.name}"
                kept = saved.get(key, {})
                body = {**body, "status": kept.get("status") if kept.get("spec") == body.get("spec") else None}
                outcome = await reconciler.reconcile(body)
                assert outcome is not None
                task = tasks[(ref.namespace, ref.name)]
                done = progress.tasks[task].total or outcome.status.records or 0
                progress.update(task, total=done, completed=done)
                results.append((body, outcome))
                status = outcome.status.model_dump(by_alias=True, mode="json")
                state[key] = {"spec": body.get("spec"), "status": status}
                entry = entry_of_object({**body, "status": status})
                if entry is not None:
                    entries.append(entry)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._status_path.write_text(json.dumps(state, indent=1))
        # The catalog holds exactly this folder's products, as the operator's rebuild does.
        await self.catalog.replace_all(entries)
        return results

    def print_table(self, results: list[tuple[dict[str, Any], Outcome]], errors: list[ManifestError]) -> None:
        """The products, their phases and readers, and the manifests that were refused."""
        table = Table(
            "product",
            "domain",
            "phase",
            "records",
            "readers",
            "collection",
            "message",
            title="Data products",
            expand=True,
        )
        restricted = []
        for body, outcome in results:
            st = outcome.status
            colour = {"Ready": "green", "Failed": "red", "Degraded": "yellow"}.get(str(st.phase), "white")
            key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
            readers = readers_of(body)
            if readers is not None:
                restricted.append((key, readers))
            table.add_row(
                key,
                body["spec"]["domain"],
                f"[{colour}]{st.phase}[/]",
                str(st.records if st.records is not None else "-"),
                "everyone" if readers is None else f"[yellow]restricted:[/] {', '.join(readers) or 'nobody'}",
                st.collection or "-",
                "" if st.phase == "Ready" else (st.message or "")[:120],
            )
        self.console.print(table)
        for key, readers in restricted:
            self.console.print(
                f"[yellow]{key}[/] is restricted to {', '.join(readers) or 'nobody'} (access.consumers): local mode "
                'answers anonymous callers only, so `datamesh ask` cannot reach it (add "*" to ask it locally)',
                soft_wrap=True,
                highlight=False,
            )
        for err in errors:
            self.console.print(
                f"[red]refused[/] {err.line().removeprefix('refused ')}", soft_wrap=True, highlight=False
            )

    async def close(self) -> None:
        await self.catalog.close()
        await self.inference.close()
        await self.http.aclose()
        await self.store.close()


async def run_local(
    directory: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    serve: bool = True,
    state_dir: Path = STATE_DIR,
    console: Console | None = None,
    outcome: LocalOutcome | None = None,
    mcp: bool = False,
) -> LocalOutcome:
    """Check, reconcile and (unless ``serve`` is off) serve a folder of manifests (``mcp``: MCP tools at /mcp too).

    The port and the state folder are checked before anything else (PreflightError); the
    outcome is filled in before serving starts, so it is known even if serving is interrupted.
    """
    console = console or Console()
    outcome = outcome if outcome is not None else LocalOutcome()
    lock = preflight(directory, state_dir, (host, port) if serve else None)
    try:
        loaded = load_manifests(directory)
        run = LocalRun(state_dir, console)
        try:
            await run.probe_store()
            results = await run.reconcile_all(loaded.products)
            run.print_table(results, loaded.errors)
            outcome.refused = len(loaded.errors)
            outcome.failed = sum(1 for _, o in results if o.status.phase == "Failed")
            outcome.products = len(results)
            print_summary(console, directory, run.catalog_path, outcome, loaded.others)
            if serve:
                await serve_query_api(run, host, port, console, mcp=mcp)
        finally:
            await run.close()
    finally:
        lock.release()
    return outcome


def preflight(directory: Path, state_dir: Path, address: tuple[str, int] | None) -> StateLock:
    """Everything that would stop a run, checked before any work: the folder, the state lock, the port."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder of manifests")
    lock = StateLock(state_dir)
    lock.acquire()
    try:
        if address is not None:
            check_port_free(*address)
    except PreflightError:
        lock.release()
        raise
    return lock


def print_summary(
    console: Console, directory: Path, catalog: Path, outcome: LocalOutcome, others: Counter[str]
) -> None:
    """One line for the whole run, and why it will exit 1 if it will."""
    console.print(f"catalog: {catalog} ({outcome.products} products)", highlight=False)
    if others:
        kinds = ", ".join(f"{kind} ×{n}" if n > 1 else kind for kind, n in sorted(others.items()))
        console.print(f"[dim]skipped objects that mean nothing without a cluster: {kinds}[/]", highlight=False)
    problems = []
    if outcome.refused:
        problems.append(f"{outcome.refused} manifest{'s' if outcome.refused > 1 else ''} refused")
    if outcome.failed:
        problems.append(f"{outcome.failed} product{'s' if outcome.failed > 1 else ''} Failed")
    if not outcome.products and not outcome.refused:
        problems.append(f"no DataProduct in {directory} (*.yaml, *.yml, *.json)")
    if problems:
        console.print(f"[red]{'; '.join(problems)}[/]: exit status 1", highlight=False)


def query_app(
    run: LocalRun, authenticator: Authenticator | None = None, *, mcp: bool = False, host: str = "127.0.0.1"
) -> FastAPI:
    """The query service over this run's store and catalog file (with ``mcp``, its MCP tools at /mcp);
    anonymous callers unless ``authenticator`` says."""
    from datamesh.query.app import authenticator_of, create_app
    from datamesh.query.catalog_sources import FileCatalogSource
    from datamesh.query.settings import QuerySettings

    settings = QuerySettings(allow_anonymous=True, catalog_file=str(run.catalog_path), mcp=mcp)
    authenticator = authenticator or authenticator_of(settings)
    return create_app(FileCatalogSource(run.catalog_path), run.store, settings, authenticator, host=host)


async def serve_query_api(run: LocalRun, host: str, port: int, console: Console, *, mcp: bool = False) -> None:
    """The query service, its catalog page at ``/`` (and with ``mcp`` its MCP tools) over this run, until stopped."""
    app = query_app(run, mcp=mcp, host=host)
    console.print(f"catalog page on http://{host}:{port}/", highlight=False)
    console.print(f'query API on http://{host}:{port}  (try: datamesh ask "why do customers churn?")')
    if mcp:
        console.print(f"MCP tools for AI agents on http://{host}:{port}/mcp  (streamable HTTP; see docs/agents.md)")
    try:
        await serve_forever(app, host=host, port=port)
    except OSError as exc:  # taken since the check before reconciling
        raise PreflightError(
            f"port {port} on {host} cannot be used ({exc.strerror or exc}): choose a free one with --port"
        ) from None
