"""The sync→async bridge: the only way knotd's event handlers start async work.

livekit's ``EventEmitter.on()`` rejects coroutine functions, and a bare ``asyncio.create_task`` in a sync
callback loses the task's exception ("Task exception was never retrieved") and lets the garbage collector
destroy a task that nothing references. A ``TaskBridge`` belongs to one session (one event loop, usually a
livekit job thread's) and:

- schedules each coroutine on its loop, also when called from another thread;
- keeps a strong reference to every task until it ends;
- counts outcomes (``ok``, ``failed``, ``cancelled``) per handler and tracks in-flight tasks;
- logs a failure with the handler's name and the exception *type* only: exception messages and reprs can
  carry URLs, headers or keys (livekit/agents#6739 leaked an API key exactly that way); a storm of the same
  failure is logged once per ``FAILURE_LOG_INTERVAL_S`` with the number left out (every one is counted);
- on session close waits for in-flight tasks up to a bound, then cancels and counts the stragglers.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from knotd import metrics

log = structlog.get_logger(__name__)

FAILURE_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class TaskFailure:
    """One failed bridged task, as shown on the status page (no message text: it may carry secrets)."""

    session_id: str
    handler: str
    exception: str
    at: float


@dataclass(frozen=True)
class DrainResult:
    completed: int
    cancelled: int


class _Emitter(Protocol):
    def on(self, event: str, callback: Callable[..., Any] | None = None) -> Any: ...


class TaskBridge:
    """Runs the async side of sync event handlers for one session.

    Args:
        session_id: names the session in log lines and failure records.
        loop: the loop tasks run on; defaults to the running loop of the caller.
        on_failure: called with a ``TaskFailure`` for each failed task (on the bridge's loop).
    """

    def __init__(
        self,
        session_id: str,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        on_failure: Callable[[TaskFailure], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self._loop = loop or asyncio.get_running_loop()
        self._on_failure = on_failure
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = threading.Lock()
        self._closing = False
        self.failures = 0
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}  # (handler, type) -> (last logged, left out)

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._tasks)

    def spawn(self, handler: str, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the bridge's loop as a tracked task. Safe to call from any thread.

        Once ``drain`` has started, new work is not started: the coroutine is closed and counted as
        ``cancelled``.
        """
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._start(handler, coro)
        else:
            self._loop.call_soon_threadsafe(self._start, handler, coro)

    def handler(self, name: str) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., None]]:
        """Decorator: turn an async function into the sync callback ``.on()`` accepts."""

        def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., None]:
            @functools.wraps(fn)
            def callback(*args: Any, **kwargs: Any) -> None:
                self.spawn(name, fn(*args, **kwargs))  # type: ignore[arg-type]

            # functools.wraps copies the coroutine marker on some Pythons; the callback is plain sync.
            callback.__dict__.pop("_is_coroutine", None)
            return callback

        return decorate

    def on(self, emitter: _Emitter, event: str, fn: Callable[..., Awaitable[Any]], *, name: str | None = None) -> None:
        """Register ``fn`` (async) for ``event`` on a livekit emitter through the bridge."""
        handler = name or event
        # Series exist from registration on, so the first failure of a handler already counts in rate().
        for outcome in metrics.TASK_OUTCOMES:
            metrics.HANDLER_TASKS.labels(handler=handler, outcome=outcome)
        metrics.HANDLER_TASKS_INFLIGHT.labels(handler=handler)
        emitter.on(event, self.handler(handler)(fn))

    def _start(self, handler: str, coro: Coroutine[Any, Any, Any]) -> None:
        if self._closing:
            coro.close()
            metrics.HANDLER_TASKS.labels(handler=handler, outcome="cancelled").inc()
            log.warning("bridge_task_rejected", session_id=self.session_id, handler=handler, reason="closing")
            return
        task = self._loop.create_task(coro, name=f"knotd:{handler}")
        with self._lock:
            self._tasks.add(task)
        metrics.HANDLER_TASKS_INFLIGHT.labels(handler=handler).inc()
        task.add_done_callback(functools.partial(self._finished, handler, time.perf_counter()))

    def _finished(self, handler: str, started: float, task: asyncio.Task[Any]) -> None:
        with self._lock:
            self._tasks.discard(task)
        metrics.HANDLER_TASKS_INFLIGHT.labels(handler=handler).dec()
        if task.cancelled():
            outcome = "cancelled"
        elif task.exception() is not None:  # retrieving it also marks it as seen
            outcome = "failed"
        else:
            outcome = "ok"
        metrics.HANDLER_TASKS.labels(handler=handler, outcome=outcome).inc()
        if outcome != "failed":
            return
        self.failures += 1
        exc = task.exception()
        failure = TaskFailure(self.session_id, handler, type(exc).__name__, time.time())
        key, now = (handler, failure.exception), time.monotonic()
        last, left_out = self._logged.get(key, (-FAILURE_LOG_INTERVAL_S, 0))
        if now - last >= FAILURE_LOG_INTERVAL_S:
            self._logged[key] = (now, 0)
            log.error(
                "bridge_task_failed",
                session_id=self.session_id,
                handler=handler,
                exception=failure.exception,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
                **({"not_logged_since_last": left_out} if left_out else {}),
            )
        else:
            self._logged[key] = (last, left_out + 1)
        if self._on_failure is not None:
            try:
                self._on_failure(failure)
            except Exception as err:  # a broken observer must not break the session
                log.warning("bridge_failure_observer_failed", exception=type(err).__name__)

    async def drain(self, timeout: float) -> DrainResult:
        """Stop accepting work, wait up to ``timeout`` s for in-flight tasks, then cancel the rest.

        Must be awaited on the bridge's loop.
        """
        self._closing = True
        with self._lock:
            pending = set(self._tasks)
        if not pending:
            return DrainResult(0, 0)
        done, still = await asyncio.wait(pending, timeout=timeout)
        for task in still:
            task.cancel()
        if still:
            await asyncio.wait(still, timeout=1.0)
            log.warning(
                "bridge_drain_cancelled",
                session_id=self.session_id,
                cancelled=len(still),
                handlers=sorted({t.get_name().removeprefix("knotd:") for t in still}),
            )
        return DrainResult(len(done), len(still))


class Signal:
    """A one-shot event set from any thread and awaited on any loop (the daemon's main loop tells the job
    threads' loops, e.g. that the drain bound has passed). Waiters register and unregister, so a daemon that
    runs sessions for months keeps no callback per session."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set = True
            waiters, self._waiters = self._waiters, set()
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass  # that loop is closed: nobody waits there any more

    async def wait(self) -> None:
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            if self._set:
                return
            self._waiters.add(waiter)
        try:
            await event.wait()
        finally:
            with self._lock:
                self._waiters.discard(waiter)
