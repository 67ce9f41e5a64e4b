"""Fixtures for the chat-page tests: a live uvicorn on 127.0.0.1 (random port) and Debian's chromium driven
by Python Playwright. Playwright's own browser download is never used: the browser is /usr/bin/chromium
(`scripts/setup-ui-test.sh` installs it). A missing chromium FAILS these tests, it does not skip them."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests import net

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
SCREENSHOTS = Path(os.environ.get("LAMINA_UI_SCREENSHOTS", "/tmp/lamina-ui-screenshots"))
IMAGES = Path(__file__).resolve().parent.parent / "data" / "images"


def chromium_path() -> str:
    for candidate in (os.environ.get("LAMINA_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("chromium is not installed: the chat-page tests need Debian's chromium. Install it with "
                "`bash scripts/setup-ui-test.sh` (apt-get install chromium), or point LAMINA_CHROMIUM at a "
                "Chromium binary.", pytrace=False)


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Python Playwright is missing: install the test extra (`pip install -e '.[test]'`).",
                    pytrace=False)
    executable = chromium_path()
    with sync_playwright() as p:
        # launch() gives every run a fresh temporary user-data-dir, removed on close
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True,
                              chromium_sandbox=False)
        try:
            yield b
        finally:
            b.close()


class PageProbe:
    """A fresh browser context + page that records console errors, page errors and any request that
    leaves the server (they are aborted: the page must work offline)."""

    def __init__(self, browser, base: str):
        self.base = base
        self.context = browser.new_context(viewport={"width": 1200, "height": 900}, device_scale_factor=1)
        self.errors: list[str] = []
        self.external: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

    def _route(self, route):
        url = route.request.url
        if url.startswith(self.base + "/") or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.external.append(url)
            route.abort()

    def console_errors(self, allow: tuple[str, ...] = ()) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in allow)]

    def close(self):
        self.context.close()


@pytest.fixture
def open_page(browser):
    probes: list[PageProbe] = []

    def make(base: str) -> PageProbe:
        probe = PageProbe(browser, base)
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        probe.close()


def live_server(app, ready_path: str = "/v1/models", headers: dict | None = None, timeout: float = 120.0):
    """tests.net.live_server for the page: ready on 200 or 401 (an app that wants a key), quiet logs."""
    return net.live_server(app, ready_path=ready_path, ready_statuses=(200, 401), headers=headers,
                           timeout=timeout, log_level="warning")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for: {message}")


def poll(page, js: str, arg=None, timeout: float = 15.0):
    """Wait until the JS function `js` returns something truthy in the page. (Playwright's wait_for_function
    compiles its predicate with eval, which the page's Content-Security-Policy rightly forbids; evaluate()
    goes through the devtools protocol and is not affected.)"""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(js, arg)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {js}")
        time.sleep(0.03)


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    page.screenshot(path=str(path))
    return path
