"""How a session reports what happens: one ``SessionObserver``, never a reach into the daemon.

The daemon's state (what the status page shows), the metrics and the sessions journal each implement it;
``Observers`` hands every event to all of them. A session calls these from its job thread, so an
implementation that shares data with the main loop must lock it. The methods do nothing by default, so an
observer overrides only what it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from knotd.bridge import TaskFailure
from knotd.conversation.guardrails import Verdict
from knotd.conversation.summary import SessionSummary


class SessionObserver(Protocol):
    """What a session reports: started, phase, turn, guard verdict, task failed, finished; and asks: draining?"""

    def session_started(self, session_id: str, room: str, phase: str) -> None:
        """A session began in ``room`` at its first ``phase``."""

    def phase_changed(self, session_id: str, phase: str) -> None:
        """The conversation moved to ``phase``."""

    def turn_completed(self, session_id: str, components: Mapping[str, float]) -> None:
        """A user turn was answered; ``components`` are its latencies in seconds (eou, stt, ..., e2e)."""

    def turn_ended(self, session_id: str, how: str) -> None:
        """A user turn was committed; ``how`` is one of ``knotd.conversation.turns.TURN_ENDINGS``."""

    def turn_cut_off(self, session_id: str, detection: str) -> None:
        """The caller spoke again within 1 s of the agent starting its answer (``detection``: model or vad)."""

    def guard_verdict(self, session_id: str, direction: str, verdict: Verdict) -> None:
        """Every guardrail check (``direction`` input or output); ``verdict.allowed`` is False on a hit."""

    def task_failed(self, failure: TaskFailure) -> None:
        """A bridged handler task raised."""

    def session_finished(self, summary: SessionSummary) -> None:
        """The session ended; called once, with its summary."""

    @property
    def is_draining(self) -> bool:
        """Whether the daemon is draining (a session cut short then ends as ``drained``)."""
        return False


class Observers(SessionObserver):
    """Several observers as one: each event goes to every observer in order."""

    def __init__(self, *observers: SessionObserver) -> None:
        self.observers = observers

    def session_started(self, session_id: str, room: str, phase: str) -> None:
        for o in self.observers:
            o.session_started(session_id, room, phase)

    def phase_changed(self, session_id: str, phase: str) -> None:
        for o in self.observers:
            o.phase_changed(session_id, phase)

    def turn_completed(self, session_id: str, components: Mapping[str, float]) -> None:
        for o in self.observers:
            o.turn_completed(session_id, components)

    def turn_ended(self, session_id: str, how: str) -> None:
        for o in self.observers:
            o.turn_ended(session_id, how)

    def turn_cut_off(self, session_id: str, detection: str) -> None:
        for o in self.observers:
            o.turn_cut_off(session_id, detection)

    def guard_verdict(self, session_id: str, direction: str, verdict: Verdict) -> None:
        for o in self.observers:
            o.guard_verdict(session_id, direction, verdict)

    def task_failed(self, failure: TaskFailure) -> None:
        for o in self.observers:
            o.task_failed(failure)

    def session_finished(self, summary: SessionSummary) -> None:
        for o in self.observers:
            o.session_finished(summary)

    @property
    def is_draining(self) -> bool:
        return any(o.is_draining for o in self.observers)
