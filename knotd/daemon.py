"""``knotd run``: the daemon's lifecycle, readable top to bottom (startup → main loop → shutdown).

startup: the shared ``Bootstrap`` (the CLI has loaded the config and started loading Whisper) → status
server listening → LiveKit worker started (THREAD executor, on this loop) while the models finish loading.
main loop: ``worker_registered`` and models loaded → ``READY=1`` → wait for a stop signal. shutdown:
``STOPPING=1`` → drain the worker (bounded, extending systemd's stop timeout meanwhile) → close. Each step is
a timed ``stage``; every event updates the ``Facts`` and ``knotd.lifecycle.derive`` decides the lifecycle,
the ``STATUS=`` line and readiness.

Model loading overlaps the livekit import and the worker's connection (issue: fast start). LiveKit is told
the worker is full (load 1.0) until the models are in, so no job starts before them.

Signals only set an event (the work they trigger runs on the loop, never inside the handler); a second
SIGTERM/SIGINT exits at once with a non-zero code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
from concurrent.futures import Future
from typing import Any

import structlog
from aiohttp import web

from knotd import metrics
from knotd.bootstrap import Bootstrap
from knotd.bridge import Signal
from knotd.config import Settings
from knotd.errors import KnotdError, WorkerError
from knotd.lifecycle import Facts, Lifecycle
from knotd.stages import stage
from knotd.systemd import Notifier, Ticker
from knotd.worker import ConnectionWatch, FfiPanicWatch, announce_load, build_server

log = structlog.get_logger(__name__)

FORCED_EXIT_CODE = 130
# The livekit rtc SDK's native core panicked: drain what still runs, then exit non-zero so systemd restarts.
FFI_PANIC_EXIT_CODE = 1


class Daemon:
    """Runs knotd until stopped. ``run()`` returns the process exit code.

    Args:
        whisper: a Whisper load already running (``start_whisper_load``); None loads it with the VAD.
        guardrail: a guardrail load already running (``start_guardrail_load``); None loads it with the models.
    """

    def __init__(self, settings: Settings, notifier: Notifier, *, whisper: Future[Any] | None = None,
                 guardrail: Future[Any] | None = None) -> None:
        self.settings = settings
        self.notifier = notifier
        self.boot = Bootstrap(settings, whisper=whisper, guardrail=guardrail)
        self.state = self.boot.state
        self.facts = Facts(livekit_url=settings.livekit.url)
        self.ticker = Ticker(notifier)
        self._stop = asyncio.Event()
        self._signals = 0
        self._exit_code = 0
        # Resolved (on the main loop) with the job entrypoint once the models are loaded; job threads wait on it.
        self._entrypoint: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._sent_ready = False
        self._server: Any = None
        self._drain_expired = Signal()  # sessions still joining their room give up once it is set

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.ticker.start()
        runner: web.AppRunner | None = None
        try:
            with FfiPanicWatch(lambda: loop.call_soon_threadsafe(self._on_ffi_panic)):
                self._update()
                models_task = asyncio.create_task(self._load_models(), name="knotd:models")
                runner = await self.boot.start_status_server()
                return await self._serve_worker(models_task)
        finally:
            await self.ticker.stop()
            await self.boot.close()
            if runner is not None:
                await runner.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    # -- startup ----------------------------------------------------------------------------------
    async def _load_models(self) -> None:
        from knotd.agent.session import make_entrypoint

        resources = await self.boot.load_resources()
        self._entrypoint.set_result(make_entrypoint(resources, self.boot.observers, self._drain_expired))
        if self._stop.is_set():
            return
        self.facts.models_loaded = True
        await self._announce_load()
        self._update()

    async def _job_entrypoint(self, ctx: Any) -> None:
        # Runs in a job thread. LiveKit dispatches nothing before the models are in (load 1.0), but a job
        # that raced that waits for them instead of failing.
        entrypoint = await asyncio.wrap_future(self._entrypoint)
        await entrypoint(ctx)

    def _load(self) -> float:
        if not self._entrypoint.done():
            return 1.0
        return min(len(self.state.sessions) / self.settings.worker.max_sessions, 1.0)

    # -- main loop --------------------------------------------------------------------------------
    async def _serve_worker(self, models_task: asyncio.Task[None]) -> int:
        with stage("worker_start"):
            server = self._server = build_server(self.settings, self._job_entrypoint, self._load)
            server.on("worker_registered", self._on_registered)
            started = asyncio.Event()
            server.on("worker_started", started.set)
            run_task = asyncio.create_task(server.run(), name="knotd:worker")
            await self._first_of(started.wait(), run_task)
        with ConnectionWatch(self._on_connection_lost):
            waiter = asyncio.create_task(self._stop.wait())
            reporter = asyncio.create_task(self._report_status_changes(), name="knotd:status_reporter")
            pending: set[asyncio.Future[Any]] = {run_task, waiter, models_task}
            try:
                while True:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    if done == {models_task} and models_task.exception() is None:
                        continue  # the models are in: keep serving
                    break
            finally:
                waiter.cancel()
                reporter.cancel()
            if models_task.done() and models_task.exception() is not None:
                return await self._models_failed(server, run_task, models_task.exception())
            if run_task.done():
                return await self._worker_failed(server, run_task)
            if not models_task.done():
                models_task.cancel()
            return await self._drain(server, run_task)

    # -- shutdown ---------------------------------------------------------------------------------
    async def _drain(self, server: Any, run_task: asyncio.Task[None]) -> int:
        timeout = self.settings.worker.drain_timeout_s
        self.facts.draining = True
        self._update()
        self.ticker.extend_stop_timeout(True)  # the drain bounds itself; systemd waits as long as it runs
        log.info("draining", sessions=len(self.state.sessions), timeout_s=timeout)
        try:
            with stage("drain", sessions=len(self.state.sessions)):
                await server.drain(timeout=int(timeout))
        except TimeoutError:
            log.warning("drain_timed_out", timeout_s=timeout, sessions=len(self.state.sessions))
            self._drain_expired.set()
        with stage("worker_close"):
            await server.aclose()
            await asyncio.gather(run_task, return_exceptions=True)
        self.ticker.extend_stop_timeout(False)
        self.facts.stopped = True
        self._update()
        return self._exit_code

    async def _models_failed(self, server: Any, run_task: asyncio.Task[None], exc: BaseException) -> int:
        # The page, /api/status and STATUS= show knotd's own message or the type only: exception text from a
        # library can carry URLs, tokens or paths (the log line has the detail, redacted).
        detail = str(exc) if isinstance(exc, KnotdError) else type(exc).__name__
        self.facts.failure = f"model loading failed: {detail}"
        self._update()
        log.error("models_failed", error=str(exc), error_type=type(exc).__name__)
        await server.aclose()
        await asyncio.gather(run_task, return_exceptions=True)
        raise exc

    async def _worker_failed(self, server: Any, run_task: asyncio.Task[None]) -> int:
        exc = run_task.exception()
        reason = self._worker_failure_reason(exc)
        self.facts.failure = reason
        self._update()
        log.error("worker_failed", reason=reason, error=str(exc) if exc else None)
        await server.aclose()
        raise WorkerError(reason)

    def _worker_failure_reason(self, exc: BaseException | None) -> str:
        """What the page, /api/status and STATUS= say: knotd's own words, never the exception's text (it can
        carry URLs with tokens or request details); the log line has the detail, redacted."""
        if exc is None:
            return "LiveKit worker stopped unexpectedly"
        if "failed to connect" in str(exc):  # livekit gave up after worker.max_retry attempts
            return (f"LiveKit worker stopped: failed to connect to livekit after {self.settings.worker.max_retry} "
                    f"attempts ({self.settings.livekit.url})")
        return f"LiveKit worker stopped ({type(exc).__name__})"

    # -- events (all on the main loop) --------------------------------------------------------------
    def _on_registered(self, worker_id: str, server_info: Any = None) -> None:
        self.state.worker_registered(worker_id)
        metrics.WORKER_REGISTERED.set(1)
        metrics.WORKER_REGISTRATIONS.inc()
        log.info("worker_registered", worker_id=worker_id, registrations=self.state.registrations)
        self.facts.worker_id, self.facts.is_registered = worker_id, True
        self.facts.registrations += 1
        if not self._stop.is_set():
            # READY only once LiveKit knows the worker has room (see announce_load).
            asyncio.get_running_loop().create_task(self._announce_then_update(), name="knotd:announce")

    async def _announce_then_update(self) -> None:
        await self._announce_load()
        if not self._stop.is_set():
            self._update()

    async def _announce_load(self) -> None:
        if self._server is None or not self.facts.is_registered or self.facts.draining:
            return
        try:
            await announce_load(self._server)
        except Exception as err:  # the periodic update still comes within 2.5 s
            log.warning("announce_load_failed", error_type=type(err).__name__)

    def _on_connection_lost(self) -> None:
        # Called from livekit's logging call, on the main loop thread.
        if self._stop.is_set() or self.facts.draining or self.facts.failure is not None:
            return
        self.state.worker_lost()
        metrics.WORKER_REGISTERED.set(0)
        self.facts.is_registered, self.facts.connection_failed = False, True
        self._update()

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("forced_exit", signal=sig.name)
            logging.shutdown()
            os._exit(FORCED_EXIT_CODE)
        log.info("stop_requested", signal=sig.name)
        self._stop.set()

    def _on_ffi_panic(self) -> None:
        # livekit has printed "FFI Panic: <message>" to stderr (the journal) already.
        log.error("livekit_ffi_panic", action="draining, then exiting for a restart")
        metrics.LIVEKIT_FFI_PANICS.inc()
        self._exit_code = FFI_PANIC_EXIT_CODE
        self._stop.set()

    def _update(self) -> None:
        """Derive the lifecycle from the facts; tell the state, the metrics and systemd."""
        was_draining = self.state.lifecycle is Lifecycle.DRAINING
        lifecycle = self.boot.apply(self.facts)
        line = self.state.status_line()
        if lifecycle is Lifecycle.READY and not self._sent_ready:
            self._sent_ready = True
            self.notifier.ready(line)
            log.info("ready", worker_id=self.state.worker_id)
        elif lifecycle is Lifecycle.DRAINING and not was_draining:
            self.notifier.stopping(line)
        else:
            self.notifier.status(line)

    async def _report_status_changes(self) -> None:
        """Keep systemd's STATUS= current as sessions come and go ("ready: worker AW_x, 2 sessions")."""
        sent, version = self.state.status_line(), self.state.version
        sessions = len(self.state.sessions)
        while True:
            version = await self.state.wait_changed(version, timeout=30.0)
            if len(self.state.sessions) < sessions:
                await self._announce_load()  # a freed slot is offered to LiveKit at once
            sessions = len(self.state.sessions)
            line = self.state.status_line()
            if line != sent and self.state.lifecycle in (Lifecycle.READY, Lifecycle.DRAINING):
                self.notifier.status(line)
                sent = line

    # -- helpers ------------------------------------------------------------------------------------
    async def _first_of(self, awaitable: Any, run_task: asyncio.Task[None]) -> None:
        waiter = asyncio.ensure_future(awaitable)
        await asyncio.wait({waiter, run_task}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
