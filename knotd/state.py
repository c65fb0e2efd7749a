"""What the daemon is doing right now: lifecycle phase, worker, sessions, recent failures.

One ``DaemonState`` is owned by the ``Daemon`` and read by the status server. Job threads update it
(sessions, turns, failures) while the main loop reads it, so every access holds a lock, and changes wake
the main loop's waiters (``/events``) through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from knotd import __version__, metrics, stages
from knotd.bridge import TaskFailure


class Lifecycle(enum.Enum):
    STARTING = "starting"
    LOADING_MODELS = "loading_models"
    CONNECTING = "connecting"
    READY = "ready"
    RECONNECTING = "reconnecting"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class SessionInfo:
    session_id: str
    room: str
    started_at: float
    phase: str = ""
    turns: int = 0
    guardrail_hits: int = 0
    task_failures: int = 0
    last_e2e_s: float | None = None


@dataclass(frozen=True)
class TurnRecord:
    session_id: str
    at: float
    components: dict[str, float]  # eou, stt, llm_ttft, tts_ttfb, e2e (seconds); missing when not measured


@dataclass
class DaemonState:
    livekit_url: str = ""
    agent_name: str = ""
    model: str = ""
    started_at: float = field(default_factory=time.time)
    lifecycle: Lifecycle = Lifecycle.STARTING
    reason: str = "starting"
    worker_id: str | None = None
    registered_since: float | None = None
    registrations: int = 0
    max_sessions: int = 1
    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    finished: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=20))
    failures: collections.deque[TaskFailure] = field(default_factory=lambda: collections.deque(maxlen=50))
    turns: collections.deque[TurnRecord] = field(default_factory=lambda: collections.deque(maxlen=100))
    guardrail_hits: collections.Counter[str] = field(default_factory=collections.Counter)
    version: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None

    # -- change notification -------------------------------------------------------------------------
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach the main loop, whose waiters (``wait_changed``) are woken on every change."""
        self._loop = loop
        self._changed = asyncio.Event()

    def _touch(self) -> None:
        self.version += 1
        if self._loop is not None and self._changed is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._changed.set)

    async def wait_changed(self, seen_version: int, timeout: float) -> int:
        """Wait (on the main loop) until the state version moves past ``seen_version`` or ``timeout`` passes."""
        assert self._changed is not None, "bind_loop() first"
        deadline = time.monotonic() + timeout
        while self.version == seen_version:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._changed.clear()
            if self.version != seen_version:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        return self.version

    # -- lifecycle ----------------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self.lifecycle is Lifecycle.READY

    def set_lifecycle(self, lifecycle: Lifecycle, reason: str) -> None:
        with self._lock:
            self.lifecycle, self.reason = lifecycle, reason
            metrics.READY.set(1 if lifecycle is Lifecycle.READY else 0)
            self._touch()

    def worker_registered(self, worker_id: str) -> None:
        with self._lock:
            self.worker_id = worker_id
            self.registered_since = time.time()
            self.registrations += 1
            metrics.WORKER_REGISTERED.set(1)
            metrics.WORKER_REGISTRATIONS.inc()
            self._touch()

    def worker_lost(self) -> None:
        with self._lock:
            self.registered_since = None
            metrics.WORKER_REGISTERED.set(0)
            self._touch()

    def status_line(self) -> str:
        """The one-line STATUS= text systemd shows: what is happening, for a person."""
        with self._lock:
            n = len(self.sessions)
            sessions = f"{n} session{'s' if n != 1 else ''}"
            if self.lifecycle is Lifecycle.READY:
                return f"ready: worker {self.worker_id}, {sessions}"
            if self.lifecycle is Lifecycle.DRAINING:
                return f"draining: {sessions}"
            return self.reason

    # -- sessions -----------------------------------------------------------------------------------
    def session_started(self, session_id: str, room: str) -> None:
        with self._lock:
            self.sessions[session_id] = SessionInfo(session_id, room, time.time())
            metrics.SESSIONS_ACTIVE.set(len(self.sessions))
            self._touch()

    def session_update(self, session_id: str, **changes: Any) -> None:
        with self._lock:
            info = self.sessions.get(session_id)
            if info is None:
                return
            for key, value in changes.items():
                setattr(info, key, value)
            self._touch()

    def session_finished(self, session_id: str, summary: dict[str, Any]) -> None:
        with self._lock:
            self.sessions.pop(session_id, None)
            self.finished.append(summary)
            metrics.SESSIONS_ACTIVE.set(len(self.sessions))
            self._touch()

    def turn_completed(self, session_id: str, components: dict[str, float]) -> None:
        with self._lock:
            self.turns.append(TurnRecord(session_id, time.time(), dict(components)))
            info = self.sessions.get(session_id)
            if info is not None:
                info.turns += 1
                info.last_e2e_s = components.get("e2e")
            self._touch()

    def guardrail_hit(self, session_id: str, direction: str, rule: str) -> None:
        with self._lock:
            self.guardrail_hits[f"{direction}:{rule}"] += 1
            info = self.sessions.get(session_id)
            if info is not None:
                info.guardrail_hits += 1
            self._touch()

    def task_failed(self, failure: TaskFailure) -> None:
        with self._lock:
            self.failures.append(failure)
            info = self.sessions.get(failure.session_id)
            if info is not None:
                info.task_failures += 1
            self._touch()

    # -- views --------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view for ``/api/status`` and the page. Holds no secrets by construction."""
        now = time.time()
        with self._lock:
            return {
                "version": __version__,
                "uptime_s": round(now - self.started_at, 1),
                "ready": self.is_ready,
                "state": self.lifecycle.value,
                "reason": self.reason,
                "status": self.status_line(),
                "livekit": {
                    "url": self.livekit_url,
                    "agent_name": self.agent_name,
                    "worker_id": self.worker_id,
                    "registered_since": self.registered_since,
                    "registrations": self.registrations,
                },
                "model": self.model,
                "capacity": {"max_sessions": self.max_sessions, "active_sessions": len(self.sessions)},
                "sessions": [
                    {**asdict(s), "duration_s": round(now - s.started_at, 1)} for s in self.sessions.values()
                ],
                "finished_sessions": list(self.finished)[::-1],
                "turns": [asdict(t) for t in list(self.turns)[-30:]],
                "guardrail_hits": dict(self.guardrail_hits),
                "task_failures": [asdict(f) for f in list(self.failures)[::-1][:20]],
                "stages": [asdict(s) for s in stages.recent(40)],
            }
