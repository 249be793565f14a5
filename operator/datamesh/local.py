"""Local mode: the operator's lifecycle on a folder of manifests, without any cluster.

``datamesh local DIR`` validates the DataProduct manifests in DIR with the same models as
the CRD, reconciles them with the same core into an embedded Qdrant under ``.datamesh/``,
writes the catalog to a file, and serves the query API on 127.0.0.1. Operator and query
service share one process and one Qdrant client, since local mode locks its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import ValidationError
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
from datamesh.engine.catalog_writer import CatalogWriter
from datamesh.engine.reconciler import Outcome, Ports, ProductRef, Reconciler, no_progress
from datamesh.resource.catalog import entry_of_object
from datamesh.resource.models import KIND, DataProductSpec, Inference, spec_error_message
from datamesh.settings import OperatorSettings, StoreSettings
from datamesh.web.serving import ServerStartError, serve_app, serve_forever

STATE_DIR = Path(".datamesh")


@dataclass
class ManifestError:
    """A manifest local mode could not use, with where and why."""

    path: Path
    name: str
    message: str


@dataclass
class LoadedManifests:
    """The DataProducts found in a folder, and the documents that were refused."""

    products: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)


def _documents(path: Path) -> Iterator[Any]:
    yield from yaml.safe_load_all(path.read_text())


def load_manifests(directory: Path) -> LoadedManifests:
    """Every DataProduct in ``directory`` (not recursive, like ``kubectl apply -f DIR``), validated."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a folder of manifests")
    loaded = LoadedManifests()
    seen: set[tuple[str, str]] = set()
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml"), *directory.glob("*.json")]):
        try:
            docs = [d for d in _documents(path) if d]
        except yaml.YAMLError as exc:
            loaded.errors.append(ManifestError(path, "-", f"not valid YAML: {exc}"))
            continue
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("kind") != KIND:
                continue  # Namespaces and other objects mean nothing without a cluster
            meta = doc.get("metadata") or {}
            name = str(meta.get("name") or "")
            namespace = str(meta.get("namespace") or "default")
            if not name:
                loaded.errors.append(ManifestError(path, "-", "metadata.name is missing"))
                continue
            try:
                DataProductSpec.model_validate(doc.get("spec") or {})
            except ValidationError as exc:
                loaded.errors.append(ManifestError(path, f"{namespace}/{name}", spec_error_message(exc)))
                continue
            if (namespace, name) in seen:
                loaded.errors.append(ManifestError(path, f"{namespace}/{name}", "declared twice in this folder"))
                continue
            seen.add((namespace, name))
            uid = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:32]
            body = {**doc, "metadata": {**meta, "namespace": namespace, "generation": 1, "uid": uid}}
            loaded.products.append((path, body))
    return loaded


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
        self.store = open_store(StoreSettings(url=None, path=str(state_dir / "store")))
        self.catalog_path = state_dir / "catalog.json"
        self.catalog = CatalogWriter(
            FileCatalogBackend(self.catalog_path),
            "catalog",
            self.settings.catalog_shard_bytes,
            self.settings.catalog_flush_seconds,
        )
        self.http = httpx.AsyncClient(timeout=self.settings.url_timeout)
        self.inference = LocalInferenceBackend()
        self._status_path = state_dir / "status.json"

    def _saved_status(self) -> dict[str, Any]:
        # Status survives between runs, so a second run over unchanged manifests writes nothing.
        return json.loads(self._status_path.read_text()) if self._status_path.exists() else {}

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
        """The products and their phases, and the manifests that were refused."""
        table = Table(
            "product", "domain", "phase", "records", "collection", "message", title="Data products", expand=True
        )
        for body, outcome in results:
            st = outcome.status
            colour = {"Ready": "green", "Failed": "red", "Degraded": "yellow"}.get(str(st.phase), "white")
            table.add_row(
                f"{body['metadata']['namespace']}/{body['metadata']['name']}",
                body["spec"]["domain"],
                f"[{colour}]{st.phase}[/]",
                str(st.records if st.records is not None else "-"),
                st.collection or "-",
                "" if st.phase == "Ready" else (st.message or "")[:120],
            )
        self.console.print(table)
        for err in errors:
            self.console.print(
                f"[red]refused[/] {err.path} ({err.name}): {err.message}", soft_wrap=True, markup=True, highlight=False
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
) -> int:
    """Reconcile a folder of manifests and serve the query API; returns the number of refused manifests."""
    console = console or Console()
    loaded = load_manifests(directory)
    run = LocalRun(state_dir, console)
    try:
        results = await run.reconcile_all(loaded.products)
        run.print_table(results, loaded.errors)
        console.print(f"catalog: {run.catalog_path} ({len(results)} products)")
        if serve:
            await serve_query_api(run, host, port, console)
    finally:
        await run.close()
    return len(loaded.errors)


async def serve_query_api(run: LocalRun, host: str, port: int, console: Console) -> None:
    """The query service over this run's store and catalog file, until interrupted."""
    from datamesh.query.app import authenticator_of, create_app
    from datamesh.query.catalog_sources import FileCatalogSource
    from datamesh.query.settings import QuerySettings

    settings = QuerySettings(allow_anonymous=True, catalog_file=str(run.catalog_path))
    app = create_app(FileCatalogSource(run.catalog_path), run.store, settings, authenticator_of(settings))
    console.print(f'query API on http://{host}:{port}  (try: datamesh ask "why do customers churn?")')
    await serve_forever(app, host=host, port=port)
