"""Debian's headless chromium, driven over the Chrome DevTools Protocol with aiohttp's WebSocket client.

Only what the status-page tests need: open a tab, load a URL, evaluate JavaScript, wait for a condition,
set the viewport, switch JavaScript off, take a screenshot, and collect console errors (CSP violations
land there). Nothing is downloaded: it runs the installed ``chromium`` with a fresh profile directory.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import time
from pathlib import Path
from typing import IO, Any, Self

import aiohttp

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class CDPError(RuntimeError):
    pass


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "wb")  # chromium writes its stderr here; read on failure


class Browser:
    """One chromium process and its browser-level DevTools connection."""

    def __init__(self, proc: asyncio.subprocess.Process, http: aiohttp.ClientSession,
                 ws: aiohttp.ClientWebSocketResponse, log_path: Path) -> None:
        self.proc, self.http, self.ws, self.log_path = proc, http, ws, log_path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    @classmethod
    async def launch(cls, profile_dir: Path, timeout: float = 30.0) -> Browser:
        """Start chromium with a fresh profile in ``profile_dir`` and connect to its DevTools endpoint."""
        executable = chromium_path()
        if executable is None:
            raise FileNotFoundError("chromium is not installed")
        profile_dir.mkdir(parents=True, exist_ok=True)
        log_path = profile_dir.parent / "chromium.log"
        with _open_log(log_path) as log:
            proc = await asyncio.create_subprocess_exec(
                executable, *FLAGS, f"--user-data-dir={profile_dir}", "about:blank",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )
        port_file = profile_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.returncode is not None or time.monotonic() > deadline:
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
                raise CDPError(f"chromium did not open DevTools (exit {proc.returncode}):\n"
                               f"{log_path.read_text(errors='replace')[-2000:]}")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        http = aiohttp.ClientSession()
        ws = await http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        return cls(proc, http, ws, log_path)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, method: str, session_id: str | None = None, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its result."""
        msg_id = next(self._ids)
        message: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        await self.ws.send_json(message)
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def new_page(self, width: int = 1280, height: int = 900) -> Page:
        """A new tab of ``width`` × ``height`` CSS pixels, with its Page, Runtime and Log events on."""
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        page = Page(self, attached["sessionId"])
        self._pages[page.session_id] = page
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.set_viewport(width, height)
        return page

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.send("Browser.close"), 5)
            except (CDPError, TimeoutError, ConnectionError, aiohttp.ClientError):
                pass  # the process is killed below
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.ws.close()
        await self.http.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = msg.json()
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif (page := self._pages.get(data.get("sessionId", ""))) is not None:
                page.on_event(data["method"], data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("DevTools connection closed"))


class Page:
    """One tab, addressed through its flattened DevTools session."""

    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser, self.session_id = browser, session_id
        self.errors: list[str] = []  # console errors, uncaught exceptions, CSP violations
        self.dialogs: list[str] = []  # alert()/confirm() that opened: an injected script ran
        self._loaded = asyncio.Event()
        self._tasks: set[asyncio.Future[Any]] = set()  # keeps replies to dialogs alive until sent

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, self.session_id, **params)

    def on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._loaded.set()
        elif method == "Page.javascriptDialogOpening":
            self.dialogs.append(params.get("message", ""))
            self._tasks.add(asyncio.ensure_future(self.send("Page.handleJavaScriptDialog", accept=True)))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"{entry.get('source')}: {entry.get('text')} ({entry.get('url', '')})")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))

    async def goto(self, url: str, timeout: float = 20.0) -> None:
        """Load ``url`` and wait for its load event."""
        self._loaded.clear()
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout}s (last: {value!r})")
            await asyncio.sleep(0.1)

    async def text(self, element_id: str) -> str:
        """The rendered text of the element with ``element_id`` (what a person reads)."""
        return await self.evaluate(f"document.getElementById({element_id!r}).innerText")

    async def set_viewport(self, width: int, height: int, *, mobile: bool = False, scale: float = 1.0) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=scale, mobile=mobile)

    async def disable_javascript(self) -> None:
        await self.send("Emulation.setScriptExecutionDisabled", value=True)

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not just the viewport) at ``path``."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
