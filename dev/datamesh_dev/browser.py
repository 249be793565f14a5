"""Debian's chromium for the browser tests and the catalog page's screenshot in docs/.

``hack/browser/install-deps.sh`` installs it; Playwright drives it by ``executable_path``, since
Playwright's own browser downloads cannot be reached from CI. ``python -m datamesh_dev.browser
screenshot docs/catalog-page.png`` (``make screenshot``) serves the examples exactly as ``make run``
does and photographs the page with a product opened and a question answered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.async_api import async_playwright, expect

from datamesh.web.serving import free_port

INSTALL_HINT = (
    "run `sudo hack/browser/install-deps.sh` (Debian's chromium), or set DATAMESH_CHROMIUM to a Chromium executable"
)
REPO = Path(__file__).resolve().parents[2]
SHOT_PRODUCT = "sales/customer-churn"
SHOT_QUESTION = "why do employees leave the company?"


class ChromiumMissing(RuntimeError):
    """No Chromium to drive; the message says how to get one."""


def chromium_executable() -> str:
    """The Chromium to drive: ``$DATAMESH_CHROMIUM``, else ``chromium`` on PATH; ChromiumMissing otherwise."""
    found = os.environ.get("DATAMESH_CHROMIUM") or shutil.which("chromium")
    if not found or not os.access(found, os.X_OK):
        raise ChromiumMissing(f"no Chromium found: {INSTALL_HINT}")
    return found


def _wait_ready(url: str, server: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"`datamesh local` exited with status {server.returncode} before serving")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.25)
    raise RuntimeError(f"`datamesh local` did not serve {url} within {timeout:g} s")


async def _photograph(url: str, out: Path) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_executable())
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(url)
            await expect(page.locator('#products[aria-busy="false"]')).to_be_attached()
            await page.click(f'button[data-product="{SHOT_PRODUCT}"]')
            await expect(page.locator('#product[aria-busy="false"]')).to_be_attached()
            await page.fill("#question", SHOT_QUESTION)
            await page.press("#question", "Enter")
            await expect(page.locator("#answer-status")).to_have_text(re.compile(r"^Answered in"))
            await page.locator("#question").blur()  # no focus ring in the picture
            await page.screenshot(path=str(out), full_page=True)
        finally:
            await browser.close()


def screenshot(out: Path) -> None:
    """Serve the examples as ``make run`` does (own port and state folder) and photograph the catalog page."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="datamesh-screenshot-") as state:
        command = [
            sys.executable,
            "-m",
            "datamesh",
            "local",
            "examples/",
            "--port",
            str(port),
            "--state-dir",
            state,
        ]
        server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL)
        try:
            _wait_ready(url, server)
            asyncio.run(_photograph(url, out))
        finally:
            server.send_signal(signal.SIGINT)  # a graceful stop closes the embedded store
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def main() -> None:
    """``python -m datamesh_dev.browser screenshot OUT.png``, or ``chromium`` to print the browser's path."""
    parser = argparse.ArgumentParser(prog="python -m datamesh_dev.browser")
    commands = parser.add_subparsers(dest="command", required=True)
    shot = commands.add_parser("screenshot", help="photograph the catalog page over the examples")
    shot.add_argument("out", type=Path)
    commands.add_parser("chromium", help="print the Chromium the browser tests drive")
    args = parser.parse_args()
    try:
        if args.command == "chromium":
            print(chromium_executable())
        else:
            screenshot(args.out.resolve())
            print(f"wrote {args.out}")
    except (ChromiumMissing, RuntimeError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
