"""The ``datamesh`` command."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from datamesh.resource.models import SourceFormat

if TYPE_CHECKING:
    from datamesh.settings import OperatorSettings

app = typer.Typer(
    help="Datamesh Operator: DataProducts on Kubernetes, a discovery catalog and federated queries.",
    no_args_is_help=True,
)
console = Console()

# onnxruntime (the default embedding model, and fastembed) writes a device id and a database under
# ~/.cache at import unless this is set first; set here, before any command can import it.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@app.command()
def operator(
    namespace: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Watch only this namespace (repeatable; globs allowed)."),
    ] = None,
    all_namespaces: Annotated[
        bool,
        typer.Option(
            "--all-namespaces", "-A", help="Watch every namespace (the default when no --namespace is given)."
        ),
    ] = False,
    liveness: Annotated[
        str, typer.Option(help="Liveness endpoint URL, served by kopf.")
    ] = "http://0.0.0.0:8081/healthz",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    query_port: Annotated[
        int | None,
        typer.Option(
            help="Also serve the query API on this port, over the operator's own store (for the embedded store, "
            "which one process owns; settings from DATAMESH_QUERY_*)."
        ),
    ] = None,
    query_host: Annotated[str, typer.Option(help="Address of the query API (with --query-port).")] = "0.0.0.0",
    label_selector: Annotated[
        str | None,
        typer.Option(
            "--label-selector",
            "-l",
            help="Reconcile only the DataProducts matching this label selector, e.g. datamesh.io/shard=a (the API "
            "server filters the watch; default: DATAMESH_LABEL_SELECTOR). Needs --shard.",
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="Name of this operator's shard (default: DATAMESH_SHARD): its catalog entries carry it, so its "
            "start-up rebuild replaces only its own, and its default Lease is datamesh-operator-<shard>.",
        ),
    ] = None,
    leader_election: Annotated[
        bool | None,
        typer.Option(
            "--leader-election/--no-leader-election",
            help="Reconcile only while holding the Lease DATAMESH_LEADER_ELECTION_LEASE_NAME in the platform "
            "namespace, so that replicas take over from each other (default: DATAMESH_LEADER_ELECTION, on). "
            "A standby serves its liveness endpoint, and opens the store and the query API only once it leads.",
        ),
    ] = None,
) -> None:
    """Run the DataProduct operator (kopf) against the current kubeconfig or in-cluster account.

    With leader election (the default), exits 1 when leadership is lost, so that Kubernetes restarts
    the container as a standby.
    """
    from prometheus_client import start_http_server

    from datamesh.controller.main import loopback_liveness, run_operator, run_operator_elected

    if namespace and all_namespaces:
        raise typer.BadParameter("use either --namespace or --all-namespaces, not both")
    settings = _operator_settings(shard=shard, label_selector=label_selector)
    handler = logging.StreamHandler()
    handler.setFormatter(ProductLogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    namespaces = namespace or None
    elected = settings.leader_election if leader_election is None else leader_election
    # Elected, kopf serves its probes on loopback; the public endpoint answers for a standby too.
    kopf_liveness = liveness or None
    if kopf_liveness and elected:
        kopf_liveness = loopback_liveness()
    lead: Callable[[asyncio.Event | None], Coroutine[Any, Any, None]] | None = None
    if query_port is not None:
        from datamesh.embedded import run_operator_with_query

        def lead(stop: asyncio.Event | None) -> Coroutine[Any, Any, None]:
            # Elected, this runs only once the process leads: the embedded store is opened then.
            return run_operator_with_query(
                settings,
                host=query_host,
                port=query_port,
                namespaces=namespaces,
                liveness_endpoint=kopf_liveness,
                stop_flag=stop,
            )

    if elected:
        code = asyncio.run(
            run_operator_elected(
                settings,
                namespaces=namespaces,
                liveness_endpoint=liveness or None,
                operator_liveness=kopf_liveness,
                lead=lead,
                handle_signals=True,
            )
        )
        raise typer.Exit(code)
    if lead is not None:
        asyncio.run(lead(None))
        return
    asyncio.run(run_operator(settings, namespaces=namespaces, liveness_endpoint=kopf_liveness))


class ProductLogFormatter(logging.Formatter):
    """Prefixes kopf's per-object records with ``[namespace/name]``.

    kopf's object logger puts the object on the record (``k8s_ref``) but only its own formatter
    shows it: without the prefix, "Handler ... succeeded" would not say which product it was.
    """

    def format(self, record: logging.LogRecord) -> str:
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and ref.get("name"):
            name = f"{ref['namespace']}/{ref['name']}" if ref.get("namespace") else str(ref["name"])
            record = logging.makeLogRecord({**record.__dict__, "msg": f"[{name}] {record.msg}"})
        return super().format(record)


def _operator_settings(**overrides: str | None) -> OperatorSettings:
    """The environment's operator settings with the command line's overrides; a bad value is a usage error."""
    from pydantic import ValidationError

    from datamesh.settings import OperatorSettings, get_settings

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return OperatorSettings(**given) if given else get_settings()  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(problems) from None


@app.command()
def local(
    directory: Annotated[Path, typer.Argument(help="Folder of DataProduct manifests, e.g. examples/.")],
    host: Annotated[str, typer.Option(help="Address of the query API.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the query API.")] = 8080,
    serve: Annotated[bool, typer.Option(help="Serve the query API after reconciling (--no-serve to exit).")] = True,
    state_dir: Annotated[Path, typer.Option(help="Where the embedded Qdrant, catalog and status are kept.")] = Path(
        ".datamesh"
    ),
    mcp: Annotated[
        bool,
        typer.Option(
            "--mcp", help="Also serve the MCP tools for AI agents at /mcp on the same port (streamable HTTP)."
        ),
    ] = False,
) -> None:
    """Run the product lifecycle on a folder of manifests with an embedded Qdrant, and serve the query API.

    Exits 1 when a manifest was refused or a product is Failed, and 2 when it cannot start
    (the port is taken, or another `datamesh local` uses the state folder).
    """
    from datamesh.local import LocalOutcome, PreflightError, run_local

    logging.basicConfig(level=logging.WARNING)
    outcome = LocalOutcome()
    try:
        asyncio.run(
            run_local(
                directory,
                host=host,
                port=port,
                serve=serve,
                state_dir=state_dir,
                console=console,
                outcome=outcome,
                mcp=mcp,
            )
        )
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except PreflightError as exc:
        console.print(f"[red]cannot start[/]: {exc}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass  # the outcome was known before serving started
    raise typer.Exit(outcome.exit_code)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="A question in plain words.")],
    url: Annotated[
        str, typer.Option(envvar="DATAMESH_URL", help="Query service URL (local mode or in-cluster).")
    ] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(envvar="DATAMESH_TOKEN", help="Bearer token.")] = None,
    domain: Annotated[list[str] | None, typer.Option("--domain", "-d", help="Only these domains (repeatable).")] = None,
    product: Annotated[
        list[str] | None,
        typer.Option("--product", "-p", help="Ask exactly these products: namespace/name or a bare name (repeatable)."),
    ] = None,
    limit: Annotated[int, typer.Option(help="Rows in the merged ranking.")] = 10,
    per_product: Annotated[int, typer.Option("--per-product", help="Hits per product.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 30.0,
) -> None:
    """Ask a running query service a question; prints the routing, the merged ranking with row keys, and each
    product's hits. Exits 1 when nothing could be answered."""
    import json

    import httpx

    body: dict[str, object] = {"question": question, "limit": limit, "perProduct": per_product}
    if domain:
        body["domains"] = domain
    if product:
        body["products"] = product
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{url.rstrip('/')}/v1/query", json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach the query service at {url}[/]: {exc}\nIs `datamesh local examples/` running?")
        raise typer.Exit(2) from exc
    try:
        answer = response.json()
    except ValueError:
        answer = {"detail": response.text[:500]}
    answered = response.is_success and bool(answer.get("merged"))
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        raise typer.Exit(0 if answered else 1)
    if not response.is_success:
        console.print(f"[red]HTTP {response.status_code}[/]: {answer.get('detail', answer)}", highlight=False)
        for err in answer.get("errors", []):
            console.print(f"[yellow]{err['product']}[/]: {err['error']}", highlight=False)
        raise typer.Exit(1)
    _print_answer(answer)
    if not answered:
        raise typer.Exit(1)


def _print_answer(answer: dict[str, Any]) -> None:
    """Routing, the merged ranking with row keys, each product's hits, notes and errors."""
    routed = Table("product", "score", "why", title="Routed to")
    for r in answer.get("routedTo", []):
        routed.add_row(r["product"], f"{r['score']:.3f}", r.get("why", ""))
    console.print(routed)
    if answer.get("lowConfidence"):
        console.print(
            f"[yellow]low confidence[/]: {answer.get('confidenceNote') or 'no product clearly holds the answer'}"
        )
    texts = {(h["product"], json_key(h["key"])): h for res in answer.get("results", []) for h in res["hits"]}
    merged = Table("#", "product", "key", "score", "text", title="Answer (merged ranking)")
    for i, m in enumerate(answer.get("merged", []), 1):
        hit = texts.get((m["product"], json_key(m["key"])), {})
        merged.add_row(str(i), m["product"], json_key(m["key"]), f"{m['score']:.3f}", str(hit.get("text", ""))[:90])
    console.print(merged)
    for result in answer.get("results", []):
        table = Table("key", "score", "text", title=f"{result['product']} ({result.get('latencyMs', 0):.0f} ms)")
        for hit in result.get("hits", []):
            table.add_row(json_key(hit["key"]), f"{hit['score']:.3f}", str(hit.get("text", ""))[:100])
        console.print(table)
    if answer.get("message"):
        console.print(str(answer["message"]), highlight=False)
    for err in answer.get("errors", []):
        console.print(f"[yellow]{err['product']}[/]: {err['error']}", highlight=False)


def json_key(key: object) -> str:
    """A row key as a person reads it (a composite key's values joined by '/')."""
    return "/".join(map(str, key)) if isinstance(key, list) else str(key)


@app.command("query-service")
def query_service(
    host: Annotated[str, typer.Option()] = "0.0.0.0",
    port: Annotated[int, typer.Option()] = 8080,
) -> None:
    """Run the federated query service (settings from DATAMESH_QUERY_* and DATAMESH_QDRANT_*)."""
    from datamesh.query.app import serve

    logging.basicConfig(level=logging.INFO)
    asyncio.run(serve(host, port))


@app.command("mcp")
def mcp_server(
    http: Annotated[
        bool, typer.Option("--http", help="Serve streamable HTTP at http://HOST:PORT/mcp instead of stdio.")
    ] = False,
    host: Annotated[str, typer.Option(help="Address to listen on (with --http).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (with --http).")] = 8090,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="DATAMESH_MCP_TOKEN",
            help="stdio: act as this token's identity (a token of DATAMESH_QUERY_TOKENS_FILE); without it, as "
            "anonymous when allowed. Not with --http, where every request carries its own bearer token.",
        ),
    ] = None,
    catalog_file: Annotated[
        Path | None,
        typer.Option(
            help="Read the catalog from this file (default: DATAMESH_QUERY_CATALOG_FILE, else the catalog "
            "ConfigMaps of DATAMESH_QUERY_CATALOG_NAMESPACE through the Kubernetes API); the store from "
            "DATAMESH_QDRANT_*."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Use a `datamesh local` state folder (its catalog and embedded store) while no `datamesh local` "
            "runs on it; anonymous callers allowed, as in local mode."
        ),
    ] = None,
) -> None:
    """Serve the mesh as MCP tools for AI agents (list_products, describe_product, ask, ask_product) over stdio, or
    streamable HTTP with --http. Exits 2 when it cannot start."""
    from datamesh.core.ports import VectorStore
    from datamesh.local import PreflightError, StateInUse, local_state
    from datamesh.query.access import Unauthenticated
    from datamesh.query.app import authenticator_of
    from datamesh.query.mcp import serve_mcp, stdio_identity
    from datamesh.query.settings import QuerySettings

    # stdout is the protocol on stdio: everything else goes to stderr.
    errors = Console(stderr=True)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if http and token:
        raise typer.BadParameter("--token (DATAMESH_MCP_TOKEN) is for stdio; on HTTP each request carries its token")
    if state_dir is not None and catalog_file is not None:
        raise typer.BadParameter("use either --state-dir or --catalog-file, not both")

    def cannot_start(message: str) -> typer.Exit:
        errors.print(f"[red]cannot start[/]: {message}", soft_wrap=True, highlight=False)
        return typer.Exit(2)

    async def serve(settings: QuerySettings, store: VectorStore | None = None) -> None:
        try:
            authenticator = authenticator_of(settings)
            if not http:
                stdio_identity(authenticator, token)
        except (OSError, ValueError, Unauthenticated) as exc:
            raise cannot_start(str(exc)) from None
        await serve_mcp(settings, authenticator, store=store, http=(host, port) if http else None, token=token)

    async def main() -> None:
        if state_dir is None:
            settings = QuerySettings()
            if catalog_file is not None:
                settings = settings.model_copy(update={"catalog_file": str(catalog_file)})
            await serve(settings)
            return
        try:
            async with local_state(state_dir, "datamesh mcp") as (store, catalog):
                await serve(QuerySettings(allow_anonymous=True, catalog_file=str(catalog)), store)
        except StateInUse as exc:
            raise cannot_start(
                f"the state folder {state_dir} is in use by another {exc.holder or 'process'}, and its embedded "
                "store opens in one process only: serve the tools from that process instead with "
                "`datamesh local DIR --mcp` (agents then connect to http://127.0.0.1:8080/mcp), or stop it first"
            ) from None
        except PreflightError as exc:
            raise cannot_start(str(exc)) from None

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


@app.command()
def ingest(
    product: Annotated[str, typer.Argument(help="The DataProduct to ingest, as NAMESPACE/NAME.")],
    report: Annotated[
        Path,
        typer.Option(help="Where the report goes (the pod's termination message: the operator reads it there)."),
    ] = Path("/dev/termination-log"),
) -> None:
    """Ingest one product's source as its ingestion Job does (settings from DATAMESH_* and DATAMESH_QDRANT_*).

    Exit status: 0 ingested, 2 failed for good (bad data or spec: retrying cannot help), 1 failed (retry).
    """
    from datamesh.controller.runtime import ingest_in_job
    from datamesh.core.jobs import EXIT_PERMANENT

    namespace, _, name = product.partition("/")
    if not namespace or not name:
        raise typer.BadParameter(f"expected NAMESPACE/NAME, got {product!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _operator_settings()
    try:
        result = asyncio.run(ingest_in_job(namespace, name, settings))
    except Exception as exc:  # the API server or the store unreachable: a retry may help
        from datamesh.engine.ingest_job import IngestReport

        result = IngestReport(generation=0, error=f"{type(exc).__name__}: {exc}")
    text = result.message()
    try:
        report.write_text(text)
    except OSError as exc:  # outside a pod: the report is on stdout anyway
        logging.getLogger(__name__).info("report not written to %s: %s", report, exc)
    console.print_json(text)
    if result.error is not None:
        console.print(f"[red]ingestion of {product} failed:[/red] {result.error}")
        raise typer.Exit(EXIT_PERMANENT if result.permanent else 1)


@app.command("inference-server")
def inference_server(
    host: Annotated[str, typer.Option()] = "0.0.0.0",
    port: Annotated[int, typer.Option()] = 8080,
    model: Annotated[
        str | None, typer.Option(help="Embedding model served (default from DATAMESH_INFERENCE_MODEL).")
    ] = None,
    chat_endpoint: Annotated[
        str | None, typer.Option(help="OpenAI-compatible chat server for prompt-based enrichment.")
    ] = None,
    chat_model: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Run the built-in inference runtime: /v1/embeddings and /v1/transform."""
    from datamesh.inference.runtime import main

    logging.basicConfig(level=logging.INFO)
    main(host, port, model, chat_endpoint, chat_model)


@app.command()
def crd(
    write: Annotated[
        Path | None, typer.Option(help="Write the CRD file into this folder instead of printing it.")
    ] = None,
    check: Annotated[Path | None, typer.Option(help="Exit 1 if the CRD file in this folder is stale.")] = None,
) -> None:
    """Print, write or check the DataProduct CRD generated from the pydantic models."""
    from datamesh.resource.crd import CRD_FILE, crd_is_current, render_crd, write_crd

    if check is not None:
        if not crd_is_current(check):
            typer.echo(f"{check / CRD_FILE} is stale: run `datamesh crd --write {check}` and commit it", err=True)
            raise typer.Exit(1)
        typer.echo(f"{check / CRD_FILE} is current")
    elif write is None:
        typer.echo(render_crd(), nl=False)
    else:
        typer.echo(f"wrote {write_crd(write)}")


contract_app = typer.Typer(
    help="Data contracts: a DataProduct as an Open Data Contract Standard (ODCS) v3 document, and back.",
    no_args_is_help=True,
)
app.add_typer(contract_app, name="contract")
STDIN = "-"


def _read_input(location: str) -> tuple[str, bytes]:
    """How to name the input in messages, and its bytes (stdin for ``-``); exits 1 when it cannot be read."""
    if location == STDIN:
        return "stdin", sys.stdin.buffer.read()
    try:
        return location, Path(location).read_bytes()
    except OSError as exc:
        _fail(location, exc.strerror or str(exc))


def _fail(label: str, problem: object) -> NoReturn:
    """Say what is wrong with which input, without a traceback, and exit 1."""
    typer.echo(f"error: {label}: {problem}", err=True)
    raise typer.Exit(1)


def _write(text: str, output: Path | None) -> None:
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        _fail(str(output), exc.strerror or str(exc))
    typer.echo(f"wrote {output}", err=True)


@contract_app.command("export")
def contract_export(
    manifest: Annotated[
        str,
        typer.Argument(
            help="Manifest file holding the DataProduct, or - for stdin: "
            "`kubectl get dp NAME -n NAMESPACE -o json | datamesh contract export -`."
        ),
    ],
    product: Annotated[
        str | None,
        typer.Option("--product", "-p", help="namespace/name or name of the DataProduct, when there are several."),
    ] = None,
    contract_version: Annotated[
        str | None,
        typer.Option(help="The contract's version (default: the datamesh.io/contract-version annotation, or 1.0.0)."),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            help="The contract's status: proposed, draft, active, deprecated or retired "
            "(default: the datamesh.io/contract-status annotation, or active)."
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the contract to this file.")] = None,
) -> None:
    """Print the ODCS v3 data contract of a DataProduct: schema, SLA, owner, tags and description."""
    from datamesh.resource.contracts import ContractError, contract_yaml, export_contract, product_to_export
    from datamesh.resource.manifest import ManifestFileError, decode, parse_documents

    label, data = _read_input(manifest)
    try:
        checked = product_to_export(parse_documents(decode(data)), product)
        text = contract_yaml(export_contract(checked, version=contract_version, status=status))
    except (ManifestFileError, ContractError) as exc:
        _fail(label, exc)
    _write(text, output)


@contract_app.command("import")
def contract_import(
    contract: Annotated[str, typer.Argument(help="ODCS v3 contract (YAML or JSON), or - for stdin.")],
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Namespace of the product (default: its domain).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name of the product (default: the contract's name).")] = None,
    domain: Annotated[str | None, typer.Option(help="Domain of the product (default: the contract's).")] = None,
    schema_object: Annotated[
        str | None, typer.Option("--object", help="The schema object that becomes the product, when there are several.")
    ] = None,
    source_url: Annotated[str | None, typer.Option(help="Rows from this http(s) URL.")] = None,
    configmap: Annotated[str | None, typer.Option(help="Rows from this ConfigMap of the namespace.")] = None,
    configmap_key: Annotated[str | None, typer.Option(help="The ConfigMap key holding the rows.")] = None,
    source_format: Annotated[
        SourceFormat | None, typer.Option(help="Encoding of the rows (default: from the URL's or key's suffix).")
    ] = None,
    refresh_interval: Annotated[
        str | None, typer.Option(help="Re-ingest this often, e.g. 1h (default: the contract's SLA frequency).")
    ] = None,
    key_fields: Annotated[
        list[str] | None,
        typer.Option(help="Fields whose text is embedded for semantic search (repeatable, or comma-separated)."),
    ] = None,
    embedding_model: Annotated[
        str | None, typer.Option(help="Embedding model (default: the platform's, onnx:all-MiniLM-L6-v2).")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the manifest to this file.")] = None,
) -> None:
    """Print the DataProduct manifest of an ODCS v3 data contract, checked as `datamesh local` checks manifests.

    A contract does not say where the rows come from or which fields are embedded: give those as options.
    """
    from datamesh.resource.contracts import ContractError, ImportOptions, OptionError, import_contract, read_contract

    label, data = _read_input(contract)
    options = ImportOptions(
        namespace=namespace,
        name=name,
        domain=domain,
        schema_object=schema_object,
        source_url=source_url,
        configmap=configmap,
        configmap_key=configmap_key,
        source_format=source_format.value if source_format else None,
        refresh_interval=refresh_interval,
        key_fields=tuple(key_fields or ()),
        embedding_model=embedding_model,
    )
    try:
        imported = import_contract(read_contract(data), options)
    except OptionError as exc:
        raise typer.BadParameter(str(exc)) from None
    except ContractError as exc:
        _fail(label, exc)
    for note in imported.notes:
        typer.echo(f"note: {label}: {note}", err=True)
    _write(imported.to_yaml(), output)


@app.command()
def settings() -> None:
    """Show the operator, store and embedding settings in effect (from DATAMESH_* environment variables)."""
    from pydantic_settings import BaseSettings

    from datamesh.settings import EmbeddingSettings, OperatorSettings, StoreSettings

    table = Table("variable", "value", "meaning")
    sections: tuple[tuple[type[BaseSettings], str], ...] = (
        (OperatorSettings, "DATAMESH_"),
        (StoreSettings, "DATAMESH_QDRANT_"),
        (EmbeddingSettings, "DATAMESH_EMBEDDING_"),
    )
    for model, prefix in sections:
        current = model()
        for name, info in model.model_fields.items():
            table.add_row(f"{prefix}{name.upper()}", repr(getattr(current, name)), info.description or "")
    console.print(table)
