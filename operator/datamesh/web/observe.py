"""Observing every HTTP request of an app (for its metrics)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestObserver:
    """Middleware that hands each HTTP request's status and duration to :meth:`observe` once it is answered."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def observe(self, scope: Scope, status: int, seconds: float) -> None:
        """Record one request: its status (500 when the app raised before answering) and how long it took."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            self.observe(scope, status, time.perf_counter() - started)
