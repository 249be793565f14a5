"""The catalog page: a static page and its script over the query API, called as the visitor.

The page holds no data. Its script calls ``/v1/products``, ``/v1/products/{ns}/{name}`` and its
``/sample``, and ``/v1/query`` with the visitor's bearer token (kept in sessionStorage), so what a
visitor sees, and which fields are masked, is decided by the API alone. Every value is put into
the page as text, never as HTML, and the Content-Security-Policy admits only this origin's script,
style and API calls (no inline script or style, no other origin, no framing).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STATIC = Path(__file__).parent / "static"
ASSETS = "/ui"
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",  # the forms are handled by the script; nothing is ever posted by the browser
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load (ETag): an upgraded service never runs yesterday's script.
    "Cache-Control": "no-cache",
}


class _WithPageHeaders:
    """An ASGI app whose HTTP responses also carry :data:`PAGE_HEADERS`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(PAGE_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_catalog_page(app: FastAPI) -> None:
    """Serve the catalog page at ``/`` and its script and style under ``/ui/``, unauthenticated: they hold no data."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def catalog_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount(ASSETS, _WithPageHeaders(StaticFiles(directory=STATIC)), name="ui")
