"""Event loops in background threads, and real uvicorn servers on them, for tests that need HTTP on 127.0.0.1.

with ServerThread(app) as url:
    httpx.get(f"{url}/healthz")
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

from datamesh.web.serving import LOOPBACK, serve_app

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``call`` runs a coroutine on it from any other thread."""

    def __init__(self, name: str = "loop-thread") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @contextlib.contextmanager
    def serving(self, app: Any, **options: Any) -> Iterator[str]:
        """``app`` served on this loop (``options`` as for ``serve_app``) for the ``with`` block; yields its URL."""
        server = serve_app(app, **options)
        url = self.call(server.__aenter__())
        try:
            yield url
        finally:
            self.call(server.__aexit__(None, None, None))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what still runs on the loop (as ``asyncio.run`` does), stop it and wait for its thread."""
        self.call(_cancel_leftovers(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_leftovers() -> None:
    tasks = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    await asyncio.get_running_loop().shutdown_asyncgens()


class ServerThread:
    """Serves an ASGI app on a free loopback port, on a loop thread of its own, until the ``with`` block ends."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        startup_timeout: float = 10.0,
        graceful_shutdown: int = 1,
        log_level: str = "warning",
        **config: Any,
    ) -> None:
        self.app = app
        # A short graceful shutdown: a test's deliberately hanging handler must not hold up the end.
        self.options: dict[str, Any] = {
            "host": host,
            "port": port,
            "log_level": log_level,
            "startup_timeout": startup_timeout,
            "timeout_graceful_shutdown": graceful_shutdown,
            "shutdown_timeout": graceful_shutdown + 5,
            "lifespan": "auto",
            **config,
        }
        self.url = ""
        self._stack: contextlib.ExitStack | None = None

    def start(self) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:<port>``) once it accepts."""
        with contextlib.ExitStack() as stack:
            loop = stack.enter_context(LoopThread(f"uvicorn-{self.options['port'] or 'any'}"))
            self.url = stack.enter_context(loop.serving(self.app, **self.options))
            self._stack = stack.pop_all()
        return self.url

    def stop(self) -> None:
        """Shut the server down (forcing it if it lingers) and end its thread."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
