"""The status page in a real browser: Debian's headless chromium, driven over the DevTools protocol.

The live-update test runs a real ``knotd run`` against the LiveKit stand-in. The others serve the busy
demo state of ``tests/status_demo.py`` from this process; its full-page screenshot is the README's
(``artifacts/status-page.png``; with ``KNOTD_UPDATE_SCREENSHOT=1`` also ``docs/status-page.png``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from knotd.status.app import create_app
from tests.chromium import Browser, Page, chromium_path
from tests.conftest import ROOT
from tests.status_demo import WORKER_ID, build_demo

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="Debian's chromium is not installed (apt-get install chromium)")

ARTIFACTS = ROOT / "artifacts"
# Long enough to open the page and read its first paint before the stand-in answers the registration.
REGISTRATION_DELAY_S = 8.0

IS_LIVE = "document.getElementById('live').dataset.state === 'live'"


def section_contains(section: str, text: str) -> str:
    """A JavaScript condition: the rendered text of section ``section`` contains ``text``."""
    return f"document.getElementById({section!r}).innerText.includes({text!r})"


@pytest.fixture
async def browser(tmp_path) -> AsyncIterator[Browser]:
    async with await Browser.launch(tmp_path / "chromium-profile") as b:
        yield b


@contextlib.asynccontextmanager
async def serve_demo() -> AsyncIterator[tuple[str, object]]:
    """The demo state behind the real status app on a free loopback port; yields (url, state)."""
    state, histograms = build_demo()
    state.bind_loop(asyncio.get_running_loop())
    runner = web.AppRunner(create_app(state, histograms=histograms))
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/", state
    finally:
        await runner.cleanup()


async def assert_clean(page: Page) -> None:
    """No console errors (CSP violations land there), no alert() ran, no inline style attributes."""
    assert page.errors == []
    assert page.dialogs == []
    assert await page.evaluate("document.querySelectorAll('[style]').length") == 0


@pytest.mark.models
async def test_page_turns_ready_without_reload_when_the_worker_registers(standin, start_daemon, notify_socket,
                                                                        browser):
    """1. The stand-in holds the worker's registration back; the page is opened while knotd connects.
    2. The stand-in registers the worker. 3. SIGTERM.

    Result: the first paint says NOT READY / connecting; then the same page (no reload) says ready and
    names the worker id; after the daemon exits, the page says it is reconnecting.
    """
    standin.set_delay(REGISTRATION_DELAY_S)
    daemon = await start_daemon(standin.url)
    await daemon.wait_http("/healthz", 200, timeout=60)
    # Open the page once the models are in and knotd is connecting (the models' load time varies with the
    # machine's load; the registration is held back for REGISTRATION_DELAY_S).
    deadline = time.monotonic() + 60
    while json.loads((await daemon.get("/readyz"))[1]).get("state") != "connecting":
        assert time.monotonic() < deadline, "knotd never reported connecting"
        await asyncio.sleep(0.1)
    page = await browser.new_page()
    await page.goto(daemon.status_url + "/")
    first_paint = await page.text("status")
    assert not standin.registrations, "the worker registered before the first paint was read; raise the delay"
    assert "NOT READY" in first_paint and "Connecting to LiveKit" in first_paint
    await page.evaluate("window.knotdSamePage = true")
    await page.wait_for(IS_LIVE)

    registration = await standin.wait_registered(1, timeout=REGISTRATION_DELAY_S + 30)
    await page.wait_for(section_contains("status", "Ready for sessions"), timeout=15)
    assert registration.worker_id in await page.text("status")
    assert registration.worker_id in await page.text("about")
    assert await page.evaluate("window.knotdSamePage === true"), "the page was reloaded"
    assert (await page.evaluate("document.title")).startswith("knotd: ready")
    await page.screenshot(ARTIFACTS / "status-page-daemon.png")
    await assert_clean(page)

    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(timeout=20) == 0
    await page.wait_for("document.getElementById('live').dataset.state === 'down'", timeout=10)


async def test_demo_page_shows_a_new_session_live_and_saves_the_readme_screenshot(browser):
    """1. A busy daemon (demo state) with two sessions. 2. A third session starts while the page is open.

    Result: the sessions table and the capacity line show it without a reload; the room name that looks
    like a script stays text; the full-page screenshot is saved.
    """
    async with serve_demo() as (url, state):
        page = await browser.new_page(1280, 900)
        await page.goto(url)
        await page.wait_for(IS_LIVE)
        await page.evaluate("window.knotdSamePage = true")
        state.session_started("s-new", "werkstatt-9", "greeting")
        await page.wait_for(section_contains("sessions", "werkstatt-9"))
        await page.wait_for(section_contains("status", "3 of 4 sessions in use"))
        assert await page.evaluate("window.knotdSamePage === true"), "the page was reloaded"
        assert "<script>alert('knot')</script>" in await page.text("sessions")
        await assert_clean(page)
        shot = await page.screenshot(ARTIFACTS / "status-page.png")
    if os.environ.get("KNOTD_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "status-page.png")


async def test_first_paint_is_complete_without_javascript(browser):
    """With JavaScript off, the server-rendered page already shows everything a live page shows."""
    async with serve_demo() as (url, _state):
        page = await browser.new_page()
        await page.disable_javascript()
        await page.goto(url)
        status = await page.text("status")
        assert "READY" in status and WORKER_ID in status and "2 of 4 sessions in use" in status
        assert "wss://livekit.werkstatt.example" in await page.text("about")
        assert "werkstatt-7" in await page.text("sessions")
        assert "End to end" in await page.text("turns")
        assert "off_topic" in await page.text("guardrails")
        assert "TimeoutError" in await page.text("failures")
        assert "completed" in await page.text("finished")
        assert "model_load" in await page.text("stages")
        assert await page.evaluate("document.querySelectorAll('svg.spark circle').length") == 24
        assert await page.evaluate("document.getElementById('live').hidden") is True  # the script never ran
        await assert_clean(page)
        await page.screenshot(ARTIFACTS / "status-page-no-js.png")


async def test_page_fits_a_phone_screen(browser):
    """On a 390 px wide phone nothing runs off the side of the page; wide tables become stacked rows."""
    async with serve_demo() as (url, _state):
        page = await browser.new_page()
        await page.set_viewport(390, 844, mobile=True, scale=2)
        await page.goto(url)
        await page.wait_for(IS_LIVE)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert await page.evaluate("getComputedStyle(document.querySelector('#sessions thead th')).display") == "none"
        await assert_clean(page)
        await page.screenshot(ARTIFACTS / "status-page-phone.png")

