"""The browser tier: Debian's chromium driven by Playwright, over the examples served as ``make run`` serves them.

The examples are reconciled by local mode's own machinery (``LocalRun``, the default embedding
model) and its query app is served on a free port of 127.0.0.1, with tokens so that a visitor can
also be someone. One browser per module; a fresh context (own sessionStorage) per test.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright
from rich.console import Console

from datamesh.local import LocalRun, load_manifests, query_app
from datamesh.query.access import Authenticator
from datamesh.web.serving import serve_app
from datamesh_dev.browser import ChromiumMissing, chromium_executable

REPO = Path(__file__).resolve().parents[2]
TOKENS = {
    "alice-token": {"identity": "alice", "groups": ["finance", "sales"]},
    "bob-token": {"identity": "bob", "groups": ["sales"]},
    "cfo-token": {"identity": "cfo@example.com", "groups": []},
}
ALICE = {"Authorization": "Bearer alice-token"}
Manifest = tuple[Path, dict[str, Any]]


def chromium() -> str:
    """The Chromium to drive; fails the test (never skips it) without one."""
    try:
        return chromium_executable()
    except ChromiumMissing as exc:
        missing = str(exc)
    pytest.fail(missing, pytrace=False)  # outside the except: the message alone, no chained traceback


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the module (Playwright's browser downloads are never used)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium())
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class Site:
    """The examples, reconciled and served; ``api`` calls the same service without a browser."""

    url: str
    run: LocalRun
    examples: list[Manifest]
    phases: dict[str, str]
    api: httpx.AsyncClient

    async def reconcile(self, manifests: Iterable[Manifest]) -> None:
        """Make the served catalog hold exactly these products (unchanged ones are not ingested again)."""
        for _, outcome in await self.run.reconcile_all(list(manifests)):
            assert outcome.status.phase == "Ready", outcome.status.message


@pytest.fixture(scope="module")
async def site(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Site]:
    run = LocalRun(tmp_path_factory.mktemp("browser") / "state", Console(file=io.StringIO()))
    try:
        loaded = load_manifests(REPO / "examples")
        assert not loaded.errors, [e.line() for e in loaded.errors]
        results = await run.reconcile_all(loaded.products)
        phases = {f"{b['metadata']['namespace']}/{b['metadata']['name']}": o.status.phase for b, o in results}
        app = query_app(run, Authenticator(TOKENS, allow_anonymous=True))
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as api:
            yield Site(url, run, loaded.products, phases, api)
    finally:
        await run.close()


@pytest.fixture
async def page(browser: Browser, site: Site) -> AsyncIterator[Page]:
    """A fresh tab on the site; the test fails on any script error or Content-Security-Policy violation."""
    context = await browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 900})
    tab = await context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    tab.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        yield tab
    finally:
        await context.close()
    assert not problems, problems
