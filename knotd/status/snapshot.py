"""What the status server reads: one typed ``StatusSnapshot`` of the daemon, and where it comes from.

The daemon's state builds snapshots (``knotd.state``); the status server only reads them, and turns them
into JSON (``/api/status``, ``/events``) or a page. ``to_json()`` is the one place the shape of
``/api/status`` is written down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from knotd.bridge import TaskFailure
from knotd.conversation.summary import SessionSummary
from knotd.stages import StageRecord

LIVEKIT = "livekit"
DEMO = "demo"  # `knotd demo`: one session on local audio, no LiveKit


@dataclass(frozen=True)
class LiveKitInfo:
    url: str
    agent_name: str
    worker_id: str | None
    registered_since: float | None
    registrations: int


@dataclass(frozen=True)
class ActiveSession:
    session_id: str
    room: str
    started_at: float
    phase: str
    turns: int
    guardrail_hits: int
    task_failures: int
    last_e2e_s: float | None
    duration_s: float


@dataclass(frozen=True)
class TurnRecord:
    session_id: str
    at: float
    components: Mapping[str, float]  # eou, stt, llm_ttft, tts_ttfb, e2e (seconds); missing when not measured


@dataclass(frozen=True)
class StatusSnapshot:
    """The daemon at one moment. ``state`` is the lifecycle value (``ready``, ``draining``, ...)."""

    version: str
    uptime_s: float
    ready: bool
    state: str
    reason: str
    status: str
    mode: str  # LIVEKIT or DEMO
    livekit: LiveKitInfo
    model: str
    max_sessions: int
    sessions: tuple[ActiveSession, ...]
    finished_sessions: tuple[SessionSummary, ...]  # newest first
    turns: tuple[TurnRecord, ...]  # oldest first
    guardrail_hits: Mapping[str, int]  # "direction:rule" -> hits
    task_failures: tuple[TaskFailure, ...]  # newest first
    stages: tuple[StageRecord, ...]
    # Session records that could not be written to sessions.jsonl (state directory full or read-only) and wait
    # in memory, and the error; None when the journal is fine.
    journal_problem: str | None = None
    journal_pending: int = 0
    # How user turns ended (model, max_delay, min_delay, vad) and answers cut off, by detection (model, vad).
    turn_endings: Mapping[str, int] = field(default_factory=dict)
    turn_cutoffs: Mapping[str, int] = field(default_factory=dict)

    @property
    def is_demo(self) -> bool:
        return self.mode == DEMO

    def to_json(self) -> dict[str, Any]:
        """The JSON document of ``/api/status`` (without the latency summaries the histograms add)."""
        return {
            "version": self.version,
            "uptime_s": self.uptime_s,
            "ready": self.ready,
            "state": self.state,
            "reason": self.reason,
            "status": self.status,
            "mode": self.mode,
            "livekit": asdict(self.livekit),
            "model": self.model,
            "capacity": {"max_sessions": self.max_sessions, "active_sessions": len(self.sessions)},
            "sessions": [asdict(s) for s in self.sessions],
            "finished_sessions": [_without_transcript(s.to_record()) for s in self.finished_sessions],
            "turns": [{"session_id": t.session_id, "at": t.at, "components": dict(t.components)} for t in self.turns],
            "guardrail_hits": dict(self.guardrail_hits),
            "journal": {"problem": self.journal_problem, "pending_records": self.journal_pending},
            "turn_endings": dict(self.turn_endings),
            "turn_cutoffs": dict(self.turn_cutoffs),
            "task_failures": [asdict(f) for f in self.task_failures],
            "stages": [asdict(s) for s in self.stages],
        }


def _without_transcript(record: dict[str, Any]) -> dict[str, Any]:
    record.pop("transcript", None)
    return record


class SnapshotSource(Protocol):
    """Where the status server gets snapshots: the daemon's state."""

    @property
    def version(self) -> int:
        """Moves on every change."""
        ...

    def snapshot(self) -> StatusSnapshot: ...

    async def wait_changed(self, seen_version: int, timeout: float) -> int:
        """Wait until ``version`` moves past ``seen_version`` or ``timeout`` passes; returns the version."""
        ...
