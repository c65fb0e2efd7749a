"""The daemon's lifecycle, and nothing else.

config (done by the CLI, which also starts loading Whisper) → status server listening → LiveKit worker
started (THREAD executor, on this loop) while the models finish loading → ``worker_registered`` and models
loaded → ``READY=1`` → wait for a stop signal → ``STOPPING=1`` → drain the worker (bounded) → close. Each
step is a timed ``stage`` and a ``STATUS=`` line for systemd.

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
from typing import Any, Protocol

import structlog
from aiohttp import web

from knotd import metrics
from knotd.config import Settings
from knotd.errors import WorkerError
from knotd.stages import stage
from knotd.state import DaemonState, Lifecycle
from knotd.status.app import LoopMonitor, start_status_server
from knotd.systemd import Notifier
from knotd.worker import ConnectionWatch, build_server

log = structlog.get_logger(__name__)

FORCED_EXIT_CODE = 130


class AgentRuntime(Protocol):
    """What the daemon needs from the agent: load models once, then a job entrypoint that uses them."""

    def load_models(self, settings: Settings) -> Any: ...

    def describe_models(self, models: Any) -> str: ...

    def build_entrypoint(self, settings: Settings, models: Any, state: DaemonState) -> Any: ...


class Daemon:
    """Runs knotd until stopped. ``run()`` returns the process exit code."""

    def __init__(self, settings: Settings, runtime: AgentRuntime, notifier: Notifier) -> None:
        self.settings = settings
        self.runtime = runtime
        self.notifier = notifier
        self.state = DaemonState(
            livekit_url=settings.livekit.url,
            agent_name=settings.livekit.agent_name,
            max_sessions=settings.worker.max_sessions,
        )
        self._stop = asyncio.Event()
        self._signals = 0
        # Resolved (on the main loop) with the job entrypoint once the models are loaded; job threads wait on it.
        self._entrypoint: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._sent_ready = False
        self._last_watchdog = 0.0

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.state.bind_loop(loop)
        metrics.initialise(self.settings.worker.max_sessions)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

        monitor = LoopMonitor(on_tick=self._watchdog_tick)
        monitor.start()
        runner: web.AppRunner | None = None
        try:
            self._set(Lifecycle.LOADING_MODELS, "loading models")
            models_task = asyncio.create_task(self._load_models(), name="knotd:models")
            with stage("status_listen"):
                runner = await start_status_server(self.state, self.settings.status.listen, monitor)
            return await self._serve_worker(models_task)
        finally:
            await monitor.stop()
            if runner is not None:
                await runner.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _load_models(self) -> None:
        with stage("model_load"):
            models = await asyncio.to_thread(self.runtime.load_models, self.settings)
        self.state.model = self.runtime.describe_models(models)
        self._entrypoint.set_result(self.runtime.build_entrypoint(self.settings, models, self.state))
        if self._stop.is_set():
            return
        if self.state.registered_since is not None:
            self._become_ready()
        elif self.state.registrations == 0:
            self._set(Lifecycle.CONNECTING, f"connecting to {self.settings.livekit.url}")

    async def _job_entrypoint(self, ctx: Any) -> None:
        # Runs in a job thread. LiveKit dispatches nothing before the models are in (load 1.0), but a job
        # that raced that waits for them instead of failing.
        entrypoint = await asyncio.wrap_future(self._entrypoint)
        await entrypoint(ctx)

    def _load(self) -> float:
        if not self._entrypoint.done():
            return 1.0
        return min(len(self.state.sessions) / self.settings.worker.max_sessions, 1.0)

    async def _serve_worker(self, models_task: asyncio.Task[None]) -> int:
        with stage("worker_start"):
            server = build_server(self.settings, self._job_entrypoint, self._load)
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

    async def _drain(self, server: Any, run_task: asyncio.Task[None]) -> int:
        timeout = self.settings.worker.drain_timeout_s
        self.state.set_lifecycle(Lifecycle.DRAINING, "draining")
        self.notifier.stopping(self.state.status_line())
        log.info("draining", sessions=len(self.state.sessions), timeout_s=timeout)
        try:
            with stage("drain", sessions=len(self.state.sessions)):
                await server.drain(timeout=int(timeout))
        except TimeoutError:
            log.warning("drain_timed_out", timeout_s=timeout, sessions=len(self.state.sessions))
        with stage("worker_close"):
            await server.aclose()
            await asyncio.gather(run_task, return_exceptions=True)
        self.state.set_lifecycle(Lifecycle.STOPPED, "stopped")
        self.notifier.status("stopped")
        return 0

    async def _models_failed(self, server: Any, run_task: asyncio.Task[None], exc: BaseException) -> int:
        reason = f"model loading failed: {exc}"
        self.state.set_lifecycle(Lifecycle.FAILED, reason)
        self.notifier.status(reason)
        log.error("models_failed", error=str(exc), error_type=type(exc).__name__)
        await server.aclose()
        await asyncio.gather(run_task, return_exceptions=True)
        raise exc

    async def _worker_failed(self, server: Any, run_task: asyncio.Task[None]) -> int:
        exc = run_task.exception()
        reason = f"LiveKit worker stopped: {exc}" if exc else "LiveKit worker stopped unexpectedly"
        self.state.set_lifecycle(Lifecycle.FAILED, reason)
        self.notifier.status(reason)
        log.error("worker_failed", reason=reason)
        await server.aclose()
        raise WorkerError(reason)

    # -- events (all on the main loop) --------------------------------------------------------------
    def _on_registered(self, worker_id: str, server_info: Any = None) -> None:
        self.state.worker_registered(worker_id)
        log.info("worker_registered", worker_id=worker_id, registrations=self.state.registrations)
        if self._stop.is_set():
            return
        if self._entrypoint.done():
            self._become_ready()
        else:
            self._set(Lifecycle.LOADING_MODELS, f"loading models (registered as worker {worker_id})")

    def _become_ready(self) -> None:
        self.state.set_lifecycle(Lifecycle.READY, "ready")
        if self._sent_ready:
            self.notifier.status(self.state.status_line())
            return
        self._sent_ready = True
        self.notifier.ready(self.state.status_line())
        log.info("ready", worker_id=self.state.worker_id)

    def _on_connection_lost(self) -> None:
        # Called from livekit's logging call, on the main loop thread.
        if self._stop.is_set() or self.state.lifecycle in (Lifecycle.DRAINING, Lifecycle.FAILED):
            return
        url = self.settings.livekit.url
        self.state.worker_lost()
        if self.state.registrations > 0:
            self._set(Lifecycle.RECONNECTING, f"reconnecting to {url}: connection lost")
        elif self._entrypoint.done():
            self._set(Lifecycle.CONNECTING, f"connecting to {url}: not reachable yet, retrying")

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("forced_exit", signal=sig.name)
            logging.shutdown()
            os._exit(FORCED_EXIT_CODE)
        log.info("stop_requested", signal=sig.name)
        self._stop.set()

    def _watchdog_tick(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is None:
            return
        now = asyncio.get_running_loop().time()
        if now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()

    async def _report_status_changes(self) -> None:
        """Keep systemd's STATUS= current as sessions come and go ("ready: worker AW_x, 2 sessions")."""
        sent, version = self.state.status_line(), self.state.version
        while True:
            version = await self.state.wait_changed(version, timeout=30.0)
            line = self.state.status_line()
            if line != sent and self.state.lifecycle in (Lifecycle.READY, Lifecycle.DRAINING):
                self.notifier.status(line)
                sent = line

    # -- helpers ------------------------------------------------------------------------------------
    def _set(self, lifecycle: Lifecycle, reason: str) -> None:
        self.state.set_lifecycle(lifecycle, reason)
        self.notifier.status(self.state.status_line())

    async def _first_of(self, awaitable: Any, run_task: asyncio.Task[None]) -> None:
        waiter = asyncio.ensure_future(awaitable)
        await asyncio.wait({waiter, run_task}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
