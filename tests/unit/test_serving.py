"""datamesh.serving: ASGI apps under uvicorn on sockets bound here, and the loop-thread helpers built on it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from datamesh.web.json import SafeJSONResponse
from datamesh.web.serving import ServerStartError, bind_socket, free_ports, serve_app, serve_forever
from tests.httpserver import LoopThread, ServerThread


def hello_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/hang")
    async def hang() -> None:
        await asyncio.sleep(60)

    return app


def failing_app() -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("no catalog")
        yield

    return FastAPI(lifespan=lifespan)


def port_is_free(url: str) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) != 0


async def test_serve_app_serves_on_a_free_loopback_port_and_frees_it() -> None:
    async with serve_app(hello_app()) as url, httpx.AsyncClient() as client:
        assert url.startswith("http://127.0.0.1:")
        assert (await client.get(f"{url}/hello")).json() == {"hello": "world"}
    assert port_is_free(url)


async def test_connections_to_a_bound_socket_send_at_once_instead_of_waiting_for_a_delayed_ack() -> None:
    # uvicorn writes a response's headers and body apart: without TCP_NODELAY on the connection each
    # response waited ~40 ms for the client's delayed ACK. uvicorn serves on this socket through
    # asyncio, as here, and asyncio sets the option only on sockets made with IPPROTO_TCP.
    options: asyncio.Queue[int] = asyncio.Queue()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        options.put_nowait(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    with bind_socket() as sock:
        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            assert await asyncio.wait_for(options.get(), 10) != 0, "TCP_NODELAY is off: each response waits for an ACK"
            writer.close()


async def test_start_up_failure_raises_and_releases_the_socket() -> None:
    (port,) = free_ports(1)
    with pytest.raises(ServerStartError, match="exited during start-up"):
        async with serve_app(failing_app(), port=port):
            raise AssertionError("never served")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # without SO_REUSEADDR: fails while the server's socket is still open


async def test_a_hanging_request_does_not_hold_up_the_shutdown() -> None:
    started = time.monotonic()
    async with (
        serve_app(hello_app(), timeout_graceful_shutdown=1, shutdown_timeout=3) as url,
        httpx.AsyncClient() as client,
    ):
        request = asyncio.create_task(client.get(f"{url}/hang", timeout=30))
        await asyncio.sleep(0.2)
    assert time.monotonic() - started < 8
    with pytest.raises(httpx.HTTPError):
        await request


async def test_serve_forever_stops_and_closes_the_socket_when_cancelled() -> None:
    (port,) = free_ports(1)
    task = asyncio.create_task(serve_forever(hello_app(), port=port))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(f"{url}/hello")).status_code == 200:
                    break
            except httpx.ConnectError:
                await asyncio.sleep(0.02)
        else:
            raise AssertionError("serve_forever did not start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert port_is_free(url)


def test_bound_socket_and_free_ports() -> None:
    with bind_socket() as sock:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    ports = free_ports(5)
    assert len(set(ports)) == 5


def test_server_thread_and_loop_thread() -> None:
    with ServerThread(hello_app()) as url:
        assert httpx.get(f"{url}/hello").json() == {"hello": "world"}
    assert port_is_free(url)
    with LoopThread() as loop, loop.serving(hello_app()) as url:
        assert httpx.get(f"{url}/hello").json() == {"hello": "world"}
    with pytest.raises(ServerStartError):
        ServerThread(failing_app(), lifespan="on").start()


# ==== JSON answers ============================================================================


@pytest.mark.parametrize(
    ("content", "parsed"),
    [
        ({"city": "Zürich", "score": 0.5}, {"city": "Zürich", "score": 0.5}),
        ({"score": float("nan"), "similarity": float("-inf")}, {"score": None, "similarity": None}),
        # A lone surrogate (not UTF-8) and an integer over 64 bits: the slower encoder, never an error.
        ({"text": "caf\ud800", "score": float("inf")}, {"text": "caf\ud800", "score": None}),
        ({"count": 2**70}, {"count": 2**70}),
    ],
)
def test_a_json_answer_always_encodes_and_parses_back(content: dict[str, object], parsed: dict[str, object]) -> None:
    body = SafeJSONResponse(content).body
    assert json.loads(body) == parsed
