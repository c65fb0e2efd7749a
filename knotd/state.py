"""What the daemon is doing right now: lifecycle phase, worker, sessions, recent failures.

One ``DaemonState`` is owned by the daemon (or the demo) and read by the status server through typed
``StatusSnapshot``s. Sessions report into it as a ``SessionObserver`` from their job threads while the main
loop reads it, so every access holds a lock, and changes wake the main loop's waiters (``/events``) through
``call_soon_threadsafe``. It sets no metrics (``knotd.metrics.MetricsObserver`` and the daemon do).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from knotd import __version__, stages
from knotd.agent.observer import SessionObserver
from knotd.bridge import TaskFailure
from knotd.conversation.guardrails import Verdict
from knotd.conversation.summary import SessionSummary
from knotd.lifecycle import Lifecycle
from knotd.status.snapshot import LIVEKIT, ActiveSession, LiveKitInfo, StatusSnapshot, TurnRecord


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


@dataclass
class DaemonState(SessionObserver):
    livekit_url: str = ""
    agent_name: str = ""
    model: str = ""
    mode: str = LIVEKIT
    started_at: float = field(default_factory=time.time)
    lifecycle: Lifecycle = Lifecycle.STARTING
    reason: str = "starting"
    worker_id: str | None = None
    registered_since: float | None = None
    registrations: int = 0
    max_sessions: int = 1
    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    finished: collections.deque[SessionSummary] = field(default_factory=lambda: collections.deque(maxlen=20))
    failures: collections.deque[TaskFailure] = field(default_factory=lambda: collections.deque(maxlen=50))
    turns: collections.deque[TurnRecord] = field(default_factory=lambda: collections.deque(maxlen=100))
    guardrail_hits: collections.Counter[str] = field(default_factory=collections.Counter)
    journal_problem: str | None = None  # sessions.jsonl cannot be written: path and error
    journal_pending: int = 0
    turn_endings: collections.Counter[str] = field(default_factory=collections.Counter)
    turn_cutoffs: collections.Counter[str] = field(default_factory=collections.Counter)
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

    @property
    def is_draining(self) -> bool:
        return self.lifecycle is Lifecycle.DRAINING

    def set_lifecycle(self, lifecycle: Lifecycle, reason: str) -> None:
        with self._lock:
            self.lifecycle, self.reason = lifecycle, reason
            self._touch()

    def worker_registered(self, worker_id: str) -> None:
        with self._lock:
            self.worker_id = worker_id
            self.registered_since = time.time()
            self.registrations += 1
            self._touch()

    def worker_lost(self) -> None:
        with self._lock:
            self.registered_since = None
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

    # -- sessions (the SessionObserver; called from job threads) ------------------------------------
    def session_started(self, session_id: str, room: str, phase: str) -> None:
        with self._lock:
            self.sessions[session_id] = SessionInfo(session_id, room, time.time(), phase=phase)
            self._touch()

    def phase_changed(self, session_id: str, phase: str) -> None:
        with self._lock:
            info = self.sessions.get(session_id)
            if info is not None:
                info.phase = phase
                self._touch()

    def session_finished(self, summary: SessionSummary) -> None:
        with self._lock:
            self.sessions.pop(summary.session_id, None)
            self.finished.append(dataclasses.replace(summary, transcript=None))  # transcripts stay in the journal
            self._touch()

    def turn_completed(self, session_id: str, components: Mapping[str, float]) -> None:
        with self._lock:
            self.turns.append(TurnRecord(session_id, time.time(), dict(components)))
            info = self.sessions.get(session_id)
            if info is not None:
                info.turns += 1
                info.last_e2e_s = components.get("e2e")
            self._touch()

    def turn_ended(self, session_id: str, how: str) -> None:
        with self._lock:
            self.turn_endings[how] += 1
            self._touch()

    def turn_cut_off(self, session_id: str, detection: str) -> None:
        with self._lock:
            self.turn_cutoffs[detection] += 1
            self._touch()

    def guard_verdict(self, session_id: str, direction: str, verdict: Verdict) -> None:
        if verdict.allowed:
            return
        with self._lock:
            self.guardrail_hits[f"{direction}:{verdict.rule or 'unknown'}"] += 1
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

    def journal_status(self, problem: str | None, pending: int) -> None:
        """The sessions journal cannot write (``problem``: path and error) or writes again (None)."""
        with self._lock:
            self.journal_problem, self.journal_pending = problem, pending
            self._touch()

    # -- views --------------------------------------------------------------------------------------
    def snapshot(self) -> StatusSnapshot:
        """A typed view for the status server. Holds no secrets by construction."""
        now = time.time()
        with self._lock:
            return StatusSnapshot(
                version=__version__,
                uptime_s=round(now - self.started_at, 1),
                ready=self.is_ready,
                state=self.lifecycle.value,
                reason=self.reason,
                status=self.status_line(),
                mode=self.mode,
                livekit=LiveKitInfo(self.livekit_url, self.agent_name, self.worker_id, self.registered_since,
                                    self.registrations),
                model=self.model,
                max_sessions=self.max_sessions,
                sessions=tuple(
                    ActiveSession(**dataclasses.asdict(s), duration_s=round(now - s.started_at, 1))
                    for s in self.sessions.values()
                ),
                finished_sessions=tuple(self.finished)[::-1],
                turns=tuple(self.turns)[-30:],
                guardrail_hits=dict(self.guardrail_hits),
                task_failures=tuple(self.failures)[::-1][:20],
                stages=tuple(stages.recent(40)),
                journal_problem=self.journal_problem,
                journal_pending=self.journal_pending,
                turn_endings=dict(self.turn_endings),
                turn_cutoffs=dict(self.turn_cutoffs),
            )
