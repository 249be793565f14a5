"""The MCP server as an agent meets it, through the SDK's own client over both transports.

A mesh of five examples (the builtin n-gram model, for speed) is reconciled by local mode's core
into a state folder once per module. stdio: `datamesh mcp --state-dir` is spawned by
``stdio_client``. Streamable HTTP: the query service with /mcp on 127.0.0.1 (a copy of the state
folder, since an embedded store opens in one process only), `datamesh mcp --http` and
`datamesh local --mcp` as processes. Callers are alice (group finance, may read the restricted
finance/expense-exceptions and the churn contacts), bob (group sales) and anonymous.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
import yaml
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult
from rich.console import Console
from typer.testing import CliRunner

from datamesh import cli
from datamesh.local import LocalRun, StateLock, load_manifests, local_state
from datamesh.query.access import Authenticator
from datamesh.query.app import create_app
from datamesh.query.catalog_sources import FileCatalogSource
from datamesh.query.settings import QuerySettings
from datamesh.web.serving import free_port, serve_app
from tests.harness import wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MODEL = "builtin:ngram-384"
MESH = ["sales-customer-churn", "logistics-shipment-delays", "hr-exit-interviews", "finance-expense-exceptions"]
DEGRADED = "product/feature-requests"  # its inference endpoint refuses connections
RESTRICTED = "finance/expense-exceptions"
TOKENS = {
    "alice-token": {"identity": "alice", "groups": ["finance"]},
    "bob-token": {"identity": "bob", "groups": ["sales"]},
}
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
TOOLS = {"list_products", "describe_product", "ask", "ask_product"}
PRICE = "too expensive, the price went up again at renewal"  # ACC-20877's churn reason, in other words
HOTEL = "hotel per night above the city cap"  # expense claims EXP-77120 and EXP-77329
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "*", "COLUMNS": "250"}
TIMEOUT = 30.0
ERROR = "Error executing tool "  # how the SDK prefixes a tool error's message


def manifests(folder: Path, names: list[str], dead_port: int) -> Path:
    """The examples with the fast model; alice may read churn contacts; feature-requests' runtime is down."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in [*names, "product-feature-requests"]:
        doc = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
        doc["spec"]["semanticSearch"]["embeddingModel"] = MODEL
        if name == "sales-customer-churn":
            doc["spec"]["access"]["piiReaders"] = ["alice"]
        if name == "product-feature-requests":
            doc["spec"]["inference"] = {"enabled": True, "endpoint": f"http://127.0.0.1:{dead_port}"}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return folder


async def reconcile(folder: Path, state: Path) -> dict[str, str]:
    """Local mode's reconcile of a folder into a state folder; the phases by product."""
    run = LocalRun(state, Console(file=io.StringIO()))
    try:
        results = await run.reconcile_all(load_manifests(folder).products)
    finally:
        await run.close()
    return {f"{b['metadata']['namespace']}/{b['metadata']['name']}": str(o.status.phase) for b, o in results}


@dataclass
class Mesh:
    state: Path  # for processes (stdio, `datamesh mcp --http`)
    url: str  # the query service with /mcp, over a copy of the state
    tokens_file: Path
    tmp: Path


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mcp")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        phases = await reconcile(manifests(tmp / "manifests", MESH, closed.getsockname()[1]), tmp / "state")
    assert phases.pop(DEGRADED) == "Degraded"
    assert set(phases.values()) == {"Ready"}, phases
    tokens_file = tmp / "tokens.yaml"
    tokens_file.write_text(yaml.safe_dump(TOKENS))
    shutil.copytree(tmp / "state", tmp / "served")
    async with local_state(tmp / "served", "tests") as (store, catalog):
        settings = QuerySettings(catalog_file=str(catalog), mcp=True)
        app = create_app(FileCatalogSource(catalog), store, settings, Authenticator(tokens_file=tokens_file))
        async with serve_app(app) as url:
            yield Mesh(tmp / "state", url, tokens_file, tmp)


# ==== clients ===================================================================================


@asynccontextmanager
async def http_session(url: str, headers: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """The SDK's streamable HTTP client, initialised, sending ``headers`` with every request."""
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(TIMEOUT)) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write, read_timeout_seconds=TIMEOUT) as session,
    ):
        await session.initialize()
        yield session


@asynccontextmanager
async def stdio_session(mesh: Mesh, *args: str) -> AsyncIterator[ClientSession]:
    """`datamesh mcp --state-dir` spawned by the SDK's stdio client, initialised."""
    env = {**ENV, "DATAMESH_QUERY_TOKENS_FILE": str(mesh.tokens_file)}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "datamesh", "mcp", "--state-dir", str(mesh.state), *args], env=env
    )
    with (mesh.tmp / "stdio-stderr.log").open("w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write, read_timeout_seconds=TIMEOUT) as session,
        ):
            await session.initialize()
            yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool's structured result; fails on a tool error."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, text(result)
    assert isinstance(result.structured_content, dict)
    assert json.loads(text(result)) == result.structured_content, "the text content is the same JSON"
    return result.structured_content


async def refused(session: ClientSession, tool: str, **arguments: Any) -> str:
    """A tool error's message."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result.structured_content
    return text(result)


def text(result: CallToolResult) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


def products_in(answer: dict[str, Any]) -> set[str]:
    """Every product an `ask` answer names anywhere."""
    return (
        {r["product"] for r in answer["routedTo"]}
        | {h["product"] for h in answer["hits"]}
        | {e["product"] for e in answer["errors"]}
    )


# ==== what an agent sees of the tools ============================================================


async def test_tools_are_four_read_only_tools_with_typed_inputs_and_outputs(mesh: Mesh) -> None:
    async with http_session(mesh.url, ALICE) as session:
        tools = {t.name: t for t in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 150, f"{tool.name}: written for an agent"
        assert tool.annotations is not None and tool.annotations.read_only_hint is True
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"
    ask = tools["ask"].input_schema
    assert ask["required"] == ["question"]
    assert ask["properties"]["question"]["maxLength"] == 2000 and ask["properties"]["limit"]["maximum"] == 100
    assert set(ask["properties"]) == {"question", "domains", "products", "limit", "per_product", "max_products"}
    assert tools["ask_product"].input_schema["required"] == ["product", "question"]
    assert "pattern" in tools["describe_product"].input_schema["properties"]["product"]
    assert {"routedTo", "lowConfidence", "confidenceNote", "hits"} <= set(tools["ask"].output_schema["properties"])


# ==== stdio =======================================================================================


async def test_stdio_lists_describes_and_answers_with_product_and_row_keys(mesh: Mesh) -> None:
    async with stdio_session(mesh, "--token", "alice-token") as session:
        assert {t.name for t in (await session.list_tools()).tools} == TOOLS
        listing = await call(session, "list_products")
        sales = await call(session, "list_products", domain="sales")
        churn = await call(session, "describe_product", product="customer-churn")  # a bare name is enough
        answer = await call(session, "ask", question=PRICE, limit=3)
        one = await call(session, "ask_product", product="sales/customer-churn", question=PRICE, limit=2)
        hotel = await call(session, "ask", question=HOTEL, domains=["finance"])

    names = [p["product"] for p in listing["products"]]
    assert names == sorted(names) and listing["count"] == 5 and RESTRICTED in names, "alice reads finance"
    first = listing["products"][names.index("sales/customer-churn")]
    assert first == {
        "product": "sales/customer-churn",
        "domain": "sales",
        "description": first["description"],
        "owner": "sales-analytics",
        "phase": "Ready",
        "records": first["records"],
        "tags": first["tags"],
        "answersQuestions": True,
    }
    assert first["records"] > 10 and "churn" in first["tags"]
    assert [p["product"] for p in sales["products"]] == ["sales/customer-churn"]

    assert churn["product"] == "sales/customer-churn" and churn["primaryKey"] == ["customer_id"]
    fields = {f["name"]: f for f in churn["fields"]}
    assert fields["customer_id"]["primaryKey"] and fields["primary_contact_email"]["pii"]
    assert fields["churn_reason"]["description"] == "Reason given at cancellation" or fields["churn_reason"]["type"]
    assert churn["sla"]["queryLatencyP99"] and churn["conditions"] == [] and churn["consumers"] == ["*"]
    assert churn["piiVisible"] is True and churn["keyFields"] == ["churn_reason"]

    assert answer["routedTo"][0]["product"] == "sales/customer-churn" and answer["routedTo"][0]["why"]
    assert answer["lowConfidence"] in (True, False) and "confidenceNote" in answer
    assert len(answer["hits"]) == 3 and answer["hits"][0]["product"] == "sales/customer-churn"
    assert "ACC-20877" in [h["key"] for h in answer["hits"]], answer["hits"]
    best = next(h for h in answer["hits"] if h["key"] == "ACC-20877")
    assert best["fields"]["customer_id"] == "ACC-20877" and best["text"] == best["fields"]["churn_reason"]
    assert best["fields"]["primary_contact_email"] and best["masked"] == [], "alice may read the contacts"
    assert [h["score"] for h in answer["hits"]] == sorted((h["score"] for h in answer["hits"]), reverse=True)

    assert one["product"] == "sales/customer-churn" and len(one["hits"]) == 2
    assert one["hits"][0]["key"] == "ACC-20877" and one["hits"][0]["similarity"] is not None

    assert hotel["routedTo"][0]["product"] == RESTRICTED, "alice's question reaches the restricted product"
    assert {"EXP-77120", "EXP-77329"} & {h["key"] for h in hotel["hits"]}
    assert all(h["masked"] == ["employee_name"] for h in hotel["hits"] if h["product"] == RESTRICTED)


async def test_stdio_anonymous_caller_never_meets_the_restricted_product(mesh: Mesh) -> None:
    async with stdio_session(mesh) as session:  # --state-dir: anonymous callers allowed, as in local mode
        listing = await call(session, "list_products")
        answer = await call(session, "ask", question=HOTEL)
        hidden = await refused(session, "describe_product", product=RESTRICTED)
        missing = await refused(session, "describe_product", product="finance/no-such-product")
        churn = await call(session, "ask_product", product="sales/customer-churn", question=PRICE)
    assert RESTRICTED not in [p["product"] for p in listing["products"]] and listing["count"] == 4
    assert RESTRICTED not in products_in(answer) and answer["hits"], "answered from what anonymous may read"
    assert hidden == f"{ERROR}describe_product: product {RESTRICTED} not found"
    assert hidden.replace(RESTRICTED, "finance/no-such-product") == missing, "hidden reads exactly like missing"
    assert churn["hits"][0]["fields"]["primary_contact_email"] is None
    assert churn["hits"][0]["masked"] == ["primary_contact_email"]


def test_stdio_without_identity_or_with_a_bad_token_does_not_start(mesh: Mesh, tmp_path: Path) -> None:
    """No --state-dir: anonymous is off unless DATAMESH_QUERY_ALLOW_ANONYMOUS says so; a wrong token is refused."""
    catalog = mesh.state / "catalog.json"
    env = {"DATAMESH_QUERY_TOKENS_FILE": str(mesh.tokens_file), "DATAMESH_QUERY_ALLOW_ANONYMOUS": "false"}
    nobody = CliRunner().invoke(cli.app, ["mcp", "--catalog-file", str(catalog)], env=env)
    assert nobody.exit_code == 2 and "no identity: pass --token" in " ".join(nobody.stderr.split())
    wrong = CliRunner().invoke(cli.app, ["mcp", "--catalog-file", str(catalog), "--token", "nope"], env=env)
    assert wrong.exit_code == 2 and "invalid bearer token" in wrong.stderr
    both = CliRunner().invoke(cli.app, ["mcp", "--http", "--token", "alice-token"], env=env)
    assert both.exit_code == 2 and "for stdio" in both.stderr


# ==== streamable HTTP ==============================================================================


async def test_http_caller_is_the_bearer_token_and_a_restricted_product_stays_hidden(mesh: Mesh) -> None:
    async with http_session(mesh.url, BOB) as bob:
        listing = await call(bob, "list_products")
        answer = await call(bob, "ask", question=HOTEL)
        hidden = await refused(bob, "describe_product", product=RESTRICTED)
        missing = await refused(bob, "describe_product", product="finance/no-such-product")
        asked = await refused(bob, "ask_product", product=RESTRICTED, question=HOTEL)
        named = await refused(bob, "ask", question=HOTEL, products=[RESTRICTED])
        bare = await refused(bob, "describe_product", product="expense-exceptions")
    async with http_session(mesh.url, ALICE) as alice:
        allowed = await call(alice, "describe_product", product=RESTRICTED)
        theirs = await call(alice, "ask", question=HOTEL, products=[RESTRICTED], limit=2)

    assert RESTRICTED not in [p["product"] for p in listing["products"]] and listing["count"] == 4
    assert RESTRICTED not in products_in(answer)
    assert hidden == f"{ERROR}describe_product: product {RESTRICTED} not found"
    assert hidden == missing.replace("finance/no-such-product", RESTRICTED), "hidden reads exactly like missing"
    assert asked == f"{ERROR}ask_product: product {RESTRICTED} not found"
    assert named == f"{ERROR}ask: product {RESTRICTED} not found", "naming it in ask does not reveal it either"
    assert bare == f"{ERROR}describe_product: product expense-exceptions not found"
    assert allowed["consumers"] == ["group:finance", "cfo@example.com"] and allowed["piiVisible"] is False
    assert {f["name"] for f in allowed["fields"] if f["pii"]} == {"employee_name"}
    assert [r["product"] for r in theirs["routedTo"]] == [RESTRICTED] and theirs["routedTo"][0]["requested"]
    assert len(theirs["hits"]) == 2 and all(h["fields"]["employee_name"] is None for h in theirs["hits"])


async def test_http_refuses_a_missing_or_wrong_token_before_mcp(mesh: Mesh) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        anonymous = await http.post(f"{mesh.url}/mcp", json=body, headers=headers)
        wrong = await http.post(f"{mesh.url}/mcp", json=body, headers={**headers, "Authorization": "Bearer nope"})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == 'Bearer realm="datamesh"'
    assert anonymous.json() == {"detail": "a bearer token is required (Authorization: Bearer <token>)"}
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["www-authenticate"]
    with pytest.raises(Exception, match="unhandled errors"):  # the SDK client fails at initialize
        async with http_session(mesh.url, {"Authorization": "Bearer nope"}) as session:
            await session.list_tools()
    async with httpx.AsyncClient(timeout=TIMEOUT) as http:
        assert "/mcp" not in (await http.get(f"{mesh.url}/openapi.json")).json()["paths"], "not a REST endpoint"


async def test_describe_says_why_a_product_is_not_ready(mesh: Mesh) -> None:
    async with http_session(mesh.url, BOB) as session:
        listing = await call(session, "list_products", domain="product")
        degraded = await call(session, "describe_product", product=DEGRADED)
    assert [(p["product"], p["phase"], p["answersQuestions"]) for p in listing["products"]] == [
        (DEGRADED, "Degraded", True)
    ]
    conditions = {c["type"]: c for c in degraded["conditions"]}
    assert conditions["InferenceReady"]["status"] == "False" and conditions["InferenceReady"]["reason"]
    assert "is unreachable" in conditions["InferenceReady"]["message"] and degraded["inference"] is True
    assert "Ready" not in conditions and "CollectionReady" not in conditions, "only what is wrong"


async def test_tool_arguments_are_checked_against_their_schema(mesh: Mesh) -> None:
    async with http_session(mesh.url, BOB) as session:
        empty = await session.call_tool("ask", {"question": ""})
        too_many = await session.call_tool("ask", {"question": "why", "limit": 1000})
        bad_name = await session.call_tool("describe_product", {"product": "Not A Name!"})
    for result in (empty, too_many, bad_name):
        assert result.is_error and "validation error" in text(result).lower(), text(result)


# ==== the processes: `datamesh mcp --http`, `datamesh local --mcp` and the state lock ================


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "datamesh", *args], stdout=out, stderr=out, env=env)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, log.read_text()
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


async def test_datamesh_mcp_http_serves_the_tools_with_the_token_file(mesh: Mesh) -> None:
    port = free_port()
    env = {**ENV, "DATAMESH_QUERY_TOKENS_FILE": str(mesh.tokens_file)}
    log = mesh.tmp / "mcp-http.log"
    with process(["mcp", "--http", "--port", str(port), "--state-dir", str(mesh.state)], env, log) as proc:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_for, lambda: ready(f"{url}/readyz", proc, log), 60, 0.1, "datamesh mcp --http")
        async with http_session(url, ALICE) as alice:
            answer = await call(alice, "ask", question=HOTEL)
        async with http_session(url) as anonymous:  # the state folder's rule: anonymous allowed
            listing = await call(anonymous, "list_products")
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            rebinding = await http.post(f"{url}/mcp", json={}, headers={**ALICE, "Host": "evil.example.com"})
    assert answer["routedTo"][0]["product"] == RESTRICTED
    assert RESTRICTED not in [p["product"] for p in listing["products"]]
    assert rebinding.status_code == 421, "on loopback, a foreign Host is refused (DNS rebinding)"


async def test_datamesh_local_mcp_serves_the_tools_and_datamesh_mcp_names_it_as_the_fix(mesh: Mesh) -> None:
    port = free_port()
    state = mesh.tmp / "busy"
    log = mesh.tmp / "local-mcp.log"
    folder = manifests(mesh.tmp / "one", ["sales-customer-churn"], free_port())
    (folder / "product-feature-requests.yaml").unlink()
    args = ["local", str(folder), "--mcp", "--port", str(port), "--state-dir", str(state)]
    with process(args, ENV, log) as proc:
        url = f"http://127.0.0.1:{port}"
        await asyncio.to_thread(wait_for, lambda: ready(f"{url}/readyz", proc, log), 90, 0.1, "datamesh local")
        async with http_session(url) as session:
            answer = await call(session, "ask", question=PRICE, limit=1)
        # In a thread: the command runs its own event loop.
        busy = await asyncio.to_thread(CliRunner().invoke, cli.app, ["mcp", "--state-dir", str(state)])
    assert "MCP tools for AI agents on http://127.0.0.1:" in log.read_text()
    assert answer["hits"][0]["key"] == "ACC-20877"
    message = " ".join(busy.stderr.split())
    assert busy.exit_code == 2, message
    assert f"the state folder {state} is in use by another `datamesh local` (pid {proc.pid})" in message
    assert "`datamesh local DIR --mcp`" in message and "http://127.0.0.1:8080/mcp" in message


def test_a_datamesh_local_refuses_a_state_folder_that_datamesh_mcp_holds(tmp_path: Path) -> None:
    holder = StateLock(tmp_path, "datamesh mcp")
    holder.acquire()
    try:
        other = StateLock(tmp_path)
        with pytest.raises(Exception, match=r"in use by another `datamesh mcp` \(pid \d+\)"):
            other.acquire()
    finally:
        holder.release()
    missing = CliRunner().invoke(cli.app, ["mcp", "--state-dir", str(tmp_path)], env={"COLUMNS": "250"})
    assert missing.exit_code == 2 and "holds no catalog" in missing.stderr and "--no-serve" in missing.stderr
