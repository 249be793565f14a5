"""Running an ASGI app under uvicorn on the current event loop, on a socket bound here.

Binding the socket before uvicorn starts leaves no window for another process to take the
port, and gives the URL at once (port 0 picks a free one). Used by local mode (its query API
and built-in inference runtimes), the tests and the benchmarks:

    async with serve_app(app) as url:
        await client.get(f"{url}/healthz")
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

LOOPBACK = "127.0.0.1"
# After a graceful shutdown has not finished in time: how long force_exit may take before the task is cancelled.
_FORCED_EXIT_SECONDS = 5.0


class ServerStartError(RuntimeError):
    """The server exited, or did not start in time, during start-up."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_socket(host: str = LOOPBACK, port: int = 0) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one), for uvicorn to listen on."""
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it every
    # response waits ~40 ms for a delayed ACK (uvicorn writes headers and body separately).
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def socket_url(sock: socket.socket) -> str:
    """The ``http://host:port`` base URL of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago, for programs that bind them themselves."""
    with contextlib.ExitStack() as stack:
        # All sockets stay open until every port is chosen, so no port is picked twice
        # (and none has SO_REUSEADDR, which would let two of them share a port).
        socks = [stack.enter_context(socket.socket(_family(host), socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (nothing listens on it)."""
    return free_ports(1, host)[0]


async def _run(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:
        # uvicorn exits the process when start-up fails; in a task, SystemExit would escape the event loop.
        raise RuntimeError(f"uvicorn exited with status {exc.code}") from None


async def _wait_started(server: uvicorn.Server, task: asyncio.Task[None], url: str, timeout: float | None) -> None:
    """Return once ``server`` accepts connections; ServerStartError if it exits or ``timeout`` passes first."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while not server.started:
        if task.done():
            cause = None if task.cancelled() else task.exception()
            raise ServerStartError(f"server on {url} exited during start-up{f': {cause}' if cause else ''}") from cause
        if deadline is not None and loop.time() > deadline:
            raise ServerStartError(f"server on {url} did not start within {timeout:g}s")
        await asyncio.sleep(0.01)


async def _shut_down(server: uvicorn.Server, task: asyncio.Task[None], url: str, timeout: float) -> None:
    """Ask ``server`` to exit and wait ``timeout`` s, then force it; raises if it still runs after that."""
    server.should_exit = True
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        server.force_exit = True  # stop waiting for open connections and background tasks
        done, _ = await asyncio.wait({task}, timeout=_FORCED_EXIT_SECONDS)
    if not done:
        task.cancel()
        await asyncio.wait({task})
        raise RuntimeError(f"server on {url} did not shut down within {timeout + _FORCED_EXIT_SECONDS:g}s")
    if not task.cancelled():
        task.exception()  # a start-up failure was reported already; nothing else is left to report


@contextlib.asynccontextmanager
async def _serving(
    app: Any,
    host: str,
    port: int,
    log_level: str,
    startup_timeout: float | None,
    shutdown_timeout: float,
    config: dict[str, Any],
) -> AsyncIterator[tuple[str, asyncio.Task[None]]]:
    """The started server's URL and task, for the block; then shut down, and the socket closed."""
    sock = bind_socket(host, port)
    try:
        url = socket_url(sock)
        server = uvicorn.Server(
            uvicorn.Config(app, **{"log_level": log_level, "access_log": False, "lifespan": "on", **config})
        )
        task = asyncio.create_task(_run(server, sock), name=f"uvicorn {url}")
        try:
            await _wait_started(server, task, url, startup_timeout)
            yield url, task
        finally:
            await _shut_down(server, task, url, shutdown_timeout)
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def serve_app(
    app: Any,
    *,
    host: str = LOOPBACK,
    port: int = 0,
    log_level: str = "warning",
    startup_timeout: float | None = 30.0,
    shutdown_timeout: float = 15.0,
    **config: Any,
) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on this event loop for the ``async with`` block; yields its base URL.

    ``config`` goes to ``uvicorn.Config`` (access log off and lifespan on unless given). Start-up
    failure or timeout raises ServerStartError; on leaving, the server gets ``shutdown_timeout``
    seconds to finish gracefully, then is forced.
    """
    async with _serving(app, host, port, log_level, startup_timeout, shutdown_timeout, config) as (url, _):
        yield url


async def serve_forever(
    app: Any,
    *,
    host: str = LOOPBACK,
    port: int = 0,
    log_level: str = "warning",
    shutdown_timeout: float = 15.0,
    **config: Any,
) -> None:
    """Serve ``app`` (as :func:`serve_app` does) until uvicorn exits on SIGINT/SIGTERM, or the caller is cancelled."""
    async with _serving(app, host, port, log_level, None, shutdown_timeout, config) as (_, task):
        await asyncio.wait({task})
        task.result()  # a server that failed rather than exited says why
