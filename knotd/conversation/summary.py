"""The summary of one finished session, as a typed record.

It says what happened (outcome, phases reached, turns, guardrail hits, latency summary, bridged-task
failures, whether each check step's answer was understood); transcript lines and the normalised answers
only when ``session.record_transcripts`` is on. It becomes JSON only at the
edges: ``to_record()`` for ``sessions.jsonl`` (``knotd.journal``) and ``/api/status``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from knotd.conversation.guardrails import GuardSummary
from knotd.conversation.recognition import StepAnswer


@dataclass(frozen=True)
class TranscriptLine:
    role: str  # user or assistant
    text: str
    at: float


@dataclass(frozen=True)
class SessionSummary:
    """What one session did, written once when it ends.

    ``latency_s`` maps a turn component (eou, stt, llm_ttft, tts_ttfb, e2e) to n/p50/p95/max in seconds;
    ``task_failures`` counts the session's failed bridged tasks; ``agent_speeches`` counts what the agent
    said by source (``generate_reply``, ``say``) and how often the user cut it off (``interrupted``).
    """

    session_id: str
    room: str
    started_at: float
    ended_at: float
    outcome: str
    phases_reached: tuple[str, ...]
    final_phase: str
    turns: int
    latency_s: Mapping[str, Mapping[str, float]]
    guardrail: GuardSummary
    task_failures: int = 0
    agent_speeches: Mapping[str, int] = field(default_factory=dict)
    transcript: tuple[TranscriptLine, ...] | None = None
    # Per check step (location, size, since, changes): understood, and the normalised answer where kept.
    answers: Mapping[str, StepAnswer] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at

    @property
    def e2e_p50_s(self) -> float | None:
        e2e = self.latency_s.get("e2e")
        return e2e.get("p50") if e2e else None

    def to_record(self) -> dict[str, Any]:
        """The JSON record (``sessions.jsonl``, ``/api/status``); ``transcript`` only when it was recorded."""
        record: dict[str, Any] = {
            "session_id": self.session_id,
            "room": self.room,
            "started_at": round(self.started_at, 3),
            "ended_at": round(self.ended_at, 3),
            "duration_s": round(self.duration_s, 3),
            "outcome": self.outcome,
            "phases_reached": list(self.phases_reached),
            "final_phase": self.final_phase,
            "turns": self.turns,
            "latency_s": {c: dict(v) for c, v in self.latency_s.items()},
            "guardrail": self.guardrail.to_dict(),
            "task_failures": self.task_failures,
            "agent_speeches": dict(self.agent_speeches),
            "answers": {name: answer.to_record() for name, answer in self.answers.items()},
        }
        if self.transcript is not None:
            record["transcript"] = [{"role": t.role, "text": t.text, "at": round(t.at, 3)} for t in self.transcript]
        return record


def latency_summary(turns: Iterable[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50/p95/max per component (seconds, 3 decimals) over a session's turns."""
    by_component: dict[str, list[float]] = {}
    for turn in turns:
        for component, value in turn.items():
            by_component.setdefault(component, []).append(value)
    out = {}
    for component, values in sorted(by_component.items()):
        values.sort()
        out[component] = {
            "n": len(values),
            "p50": round(statistics.median(values), 3),
            "p95": round(_quantile(values, 0.95), 3),
            "max": round(values[-1], 3),
        }
    return out


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
