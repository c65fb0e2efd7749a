"""The status server: the one HTTP face of knotd (default 127.0.0.1:9464).

Routes: ``/`` (page), ``/events`` (the page's live updates, Server-Sent Events), ``/static/`` (its CSS,
script and icon), ``/api/status`` (JSON), ``/metrics`` (Prometheus), ``/healthz`` (event loop responsive),
``/readyz`` (ready for sessions, with a JSON reason when not). Handlers only read ``StatusSnapshot``s from a
``SnapshotSource`` (the daemon's state); nothing here changes the daemon.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from typing import Any

import jinja2
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from knotd import metrics
from knotd.config import ListenAddress
from knotd.errors import KnotdError
from knotd.status import page
from knotd.status.events import EventStreams, encode_event, stream_events
from knotd.status.latency import LatencyHistograms, observation_count
from knotd.status.snapshot import SnapshotSource
from knotd.status.view import build_page, status_document

log = structlog.get_logger(__name__)

SOURCE_KEY = web.AppKey("knotd.snapshots", SnapshotSource)
LOOP_MONITOR_KEY = web.AppKey("knotd.loop_monitor", "LoopMonitor")
TEMPLATES_KEY = web.AppKey("knotd.templates", jinja2.Environment)
HISTOGRAMS_KEY = web.AppKey("knotd.histograms", LatencyHistograms)
STREAMS_KEY = web.AppKey("knotd.event_streams", EventStreams)
HOSTS_KEY = web.AppKey("knotd.allowed_hosts", frozenset)

# A connection that has not sent a whole request this long after connecting or after its last answer is
# closed (idle keep-alive and slowloris headers alike). /events streams are busy, not idle: they stay.
IDLE_TIMEOUT_S = 10.0

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class LoopMonitor:
    """Measures event-loop lag with a ticker; ``/healthz`` fails when the loop was recently stuck.

    (systemd's watchdog has its own ticker on the same loop: ``knotd.systemd.Ticker``.)
    """

    def __init__(self, interval_s: float = 0.5, unhealthy_lag_s: float = 5.0) -> None:
        self.interval_s, self.unhealthy_lag_s = interval_s, unhealthy_lag_s
        self.last_tick = time.monotonic()
        self.max_recent_lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="knotd:loop_monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            lag = max(0.0, now - before - self.interval_s)
            # decay, so one stall shows for a while but not forever
            self.max_recent_lag_s = max(lag, self.max_recent_lag_s * 0.9)
            self.last_tick = now

    @property
    def healthy(self) -> bool:
        stale = time.monotonic() - self.last_tick
        return stale < self.unhealthy_lag_s and self.max_recent_lag_s < self.unhealthy_lag_s


def create_app(
    source: SnapshotSource, loop_monitor: LoopMonitor | None = None, *, histograms: LatencyHistograms | None = None,
    allowed_hosts: Iterable[str] = (),
) -> web.Application:
    """The aiohttp application serving the status routes for ``source``'s snapshots.

    ``/events`` waits on ``source.wait_changed``, so it must wake the loop that serves the app
    (``DaemonState.bind_loop()``). ``histograms`` defaults to knotd's own stage and turn histograms.
    ``allowed_hosts``: host names a request's ``Host`` may carry besides ``localhost`` and IP addresses
    (the status address's own name, ``status.allowed_hosts``); any other gets 421, so a page on another site
    whose name was rebound to this machine's address reads nothing.
    """
    app = web.Application(middlewares=[_check_host])
    app[HOSTS_KEY] = frozenset(h.lower() for h in allowed_hosts) | {"localhost"}
    app.on_response_prepare.append(_add_security_headers)
    app[SOURCE_KEY] = source
    app[LOOP_MONITOR_KEY] = loop_monitor or LoopMonitor()
    app[TEMPLATES_KEY] = page.create_environment()
    app[HISTOGRAMS_KEY] = histograms or LatencyHistograms()
    app[STREAMS_KEY] = streams = EventStreams()
    app.on_shutdown.append(streams.close)
    app.router.add_get("/", index)
    app.router.add_get("/events", events)
    app.router.add_static("/static/", page.STATIC_DIR)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@web.middleware
async def _check_host(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                      ) -> web.StreamResponse:
    host = request.headers.get("Host")
    if host is not None and not host_allowed(host, request.app[HOSTS_KEY]):
        return web.Response(status=421, text="421 Misdirected Request: unknown Host\n")
    return await handler(request)


def host_allowed(host: str, names: frozenset[str]) -> bool:
    """Whether a ``Host`` header names this server: an IP address (DNS rebinding needs a name) or a known name."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return name in names


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare rather than a middleware: it also covers streamed responses (/events, whose headers
    # go out before the handler returns), static files and aiohttp's own error pages.
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)


async def index(request: web.Request) -> web.Response:
    app = request.app
    model = build_page(app[SOURCE_KEY].snapshot(), app[HISTOGRAMS_KEY])
    return web.Response(text=page.render_index(app[TEMPLATES_KEY], model), content_type="text/html")


async def events(request: web.Request) -> web.StreamResponse:
    app = request.app

    def render() -> bytes:
        snapshot = app[SOURCE_KEY].snapshot()
        model = build_page(snapshot, app[HISTOGRAMS_KEY])
        return encode_event("status", status_document(snapshot, app[HISTOGRAMS_KEY])) + encode_event(
            "page", page.live_update(app[TEMPLATES_KEY], model)
        )

    return await stream_events(
        request, app[STREAMS_KEY], app[SOURCE_KEY], render,
        unseen_changes=lambda: observation_count(app[HISTOGRAMS_KEY]),
    )


async def api_status(request: web.Request) -> web.Response:
    app = request.app
    return web.json_response(status_document(app[SOURCE_KEY].snapshot(), app[HISTOGRAMS_KEY]))


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def healthz(request: web.Request) -> web.Response:
    monitor = request.app[LOOP_MONITOR_KEY]
    body = {"healthy": monitor.healthy, "loop_lag_s": round(monitor.max_recent_lag_s, 3)}
    return web.json_response(body, status=200 if monitor.healthy else 503)


async def readyz(request: web.Request) -> web.Response:
    snapshot = request.app[SOURCE_KEY].snapshot()
    body = {"ready": snapshot.ready, "state": snapshot.state, "reason": snapshot.reason}
    return web.json_response(body, status=200 if snapshot.ready else 503)


class ListenError(KnotdError):
    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")


class _StatusRequestHandler(RequestHandler):
    """aiohttp's connection handler, but its own error answers (a malformed request line, headers too long)
    carry the security headers and a fixed text (aiohttp's repeats the client's bytes), and are logged at
    debug level without a traceback: a hostile client must not fill the journal."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        log.debug("status_request_rejected", status=status, error=type(exc).__name__ if exc else None)
        if request.writer.output_size > 0:
            raise ConnectionError("response already sent")
        try:
            text = f"{status} {HTTPStatus(status).phrase}\n"
        except ValueError:
            text = f"{status}\n"
        response = web.Response(status=status, text=text, headers=SECURITY_HEADERS)
        response.force_close()
        return response


class _StatusServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _StatusRequestHandler(self, loop=self._loop, **self._kwargs)


class _StatusRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _StatusServer  # the same server, making our handler per connection
        return server


async def start_status_server(
    source: SnapshotSource, listen: ListenAddress, monitor: LoopMonitor | None = None, *,
    allowed_hosts: Iterable[str] = (), idle_timeout_s: float = IDLE_TIMEOUT_S,
) -> web.AppRunner:
    """Serve ``create_app(source)`` on ``listen``; the caller owns the runner (``await runner.cleanup()``).

    Raises:
        ListenError: the address cannot be bound (in use, not local, no permission).
    """
    hosts = {*allowed_hosts, listen.host}
    runner = _StatusRunner(create_app(source, monitor, allowed_hosts=hosts), access_log=None,
                           handle_signals=False, keepalive_timeout=idle_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        raise ListenError(str(listen), err.strerror or type(err).__name__) from None
    # With port 0 the kernel picks a free port; the line names the one bound (tests start knotd that way).
    bound = ListenAddress(listen.host, runner.addresses[0][1]) if runner.addresses else listen
    log.info("status_server_listening", address=str(bound))
    return runner
