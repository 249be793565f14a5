"""A real uvicorn server in a background thread, for tests that need HTTP on 127.0.0.1.

    with ServerThread(app) as url:
        httpx.get(f"{url}/healthz")
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

import uvicorn


class ServerThread:
    """Serves an ASGI app on a free loopback port until the ``with`` block ends."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
        graceful_shutdown: int = 1,
        log_level: str = "warning",
        **config: Any,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        # Short: a test's deliberately hanging handler must not hold up the shutdown.
        self.graceful_shutdown = graceful_shutdown
        self.config = {"log_level": log_level, "access_log": False, "lifespan": "auto", **config}
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None

    def start(self) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:<port>``) once it accepts."""
        # Binding here, and handing uvicorn the socket, leaves no window for another process
        # to take the port between choosing it and serving on it.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(self.app, timeout_graceful_shutdown=self.graceful_shutdown, **self.config)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                self._close_socket()
                raise RuntimeError(f"server on {self.url} exited during startup") from self._error
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server on {self.url} did not start within {self.startup_timeout}s")
            time.sleep(0.01)
        return self.url

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as e:  # noqa: BLE001 - uvicorn reports startup failure as SystemExit
            self._error = e

    def stop(self) -> None:
        """Ask the server to exit and wait for its thread (forcing it if it lingers)."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=self.graceful_shutdown + 5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=5)
        self._close_socket()
        if self._thread.is_alive():
            raise RuntimeError(f"server on {self.url} did not shut down")

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
