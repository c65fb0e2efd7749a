"""The status page's model: what ``DaemonState.snapshot()`` and the latency histograms mean to a person.

``build_page()`` turns the snapshot (plain JSON data) into small frozen records the templates draw:
a headline that says whether knotd is ready and why not, the facts about this daemon, sessions, latency
charts, guardrail hits and failures. It formats nothing (that is the templates' job) and reads no state
of its own; the same model feeds the first paint and every live update, so the two cannot disagree.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from knotd.status import charts
from knotd.status.latency import (
    LatencyHistograms,
    LatencySummary,
    error_counts,
    stage_summaries,
    turn_summaries,
)

RECENT_TURNS_SHOWN = 8

# lifecycle value -> (what is happening, badge tone)
_HEADLINES = {
    "starting": ("Starting", "warn"),
    "loading_models": ("Loading models", "warn"),
    "connecting": ("Connecting to LiveKit", "warn"),
    "ready": ("Ready for sessions", "ok"),
    "reconnecting": ("Reconnecting to LiveKit", "warn"),
    "draining": ("Draining", "warn"),
    "stopped": ("Stopped", "idle"),
    "failed": ("Failed", "bad"),
}

TURN_COMPONENT_LABELS = {
    "eou": "End of turn",
    "stt": "Speech to text",
    "llm_ttft": "LLM first token",
    "tts_ttfb": "TTS first audio",
    "e2e": "End to end",
}


@dataclass(frozen=True)
class Step:
    """One step on the way to ready; ``state`` is done, active, todo, off (stopped on purpose) or failed."""

    label: str
    state: str


@dataclass(frozen=True)
class Headline:
    is_ready: bool
    badge: str  # READY / NOT READY / DRAINING / STOPPED / FAILED
    tone: str  # ok / warn / bad / idle: the badge colour
    title: str  # what is happening, e.g. "Connecting to LiveKit"
    reason: str  # the daemon's own words for it
    worker_id: str | None
    active_sessions: int
    max_sessions: int
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class About:
    version: str
    started_at: float
    uptime_s: float
    livekit_url: str
    agent_name: str
    worker_id: str | None
    registered_since: float | None
    registrations: int
    model: str


@dataclass(frozen=True)
class ActiveSession:
    room: str
    phase: str
    started_at: float
    turns: int
    guardrail_hits: int
    task_failures: int
    last_e2e_s: float | None


@dataclass(frozen=True)
class FinishedSession:
    room: str
    outcome: str
    ended_at: float | None
    duration_s: float | None
    turns: int | None
    guardrail_hits: int | None
    task_failures: int | None
    last_phase: str
    e2e_p50_s: float | None
    # (field, understood, normalised answer or None when the record keeps no values), in script order
    answers: tuple[tuple[str, bool, str | None], ...] = ()


@dataclass(frozen=True)
class LatencyRow:
    """One stage or turn component: how often it ran, mean and p50/p95 from the histogram, and its bar.

    ``last_s`` is the latest turn's value (turn components only).
    """

    name: str
    label: str
    count: int
    errors: int
    mean_s: float | None
    p50_s: float | None
    p95_s: float | None
    last_s: float | None
    bar: charts.RangeBar | None


@dataclass(frozen=True)
class TurnRow:
    at: float
    room: str
    components: dict[str, float]

    @property
    def is_over_goal(self) -> bool:
        return self.components.get("e2e", 0.0) > charts.E2E_GOAL_S


@dataclass(frozen=True)
class GuardrailRow:
    direction: str
    rule: str
    hits: int
    share_pct: float  # of the most-hit rule, for the bar


@dataclass(frozen=True)
class FailureRow:
    at: float
    handler: str
    exception: str
    room: str


@dataclass(frozen=True)
class Page:
    now: float
    headline: Headline
    about: About
    sessions: tuple[ActiveSession, ...]
    finished: tuple[FinishedSession, ...]
    e2e: charts.Sparkline
    turn_components: tuple[LatencyRow, ...]
    recent_turns: tuple[TurnRow, ...]
    stages: tuple[LatencyRow, ...]
    guardrails: tuple[GuardrailRow, ...]
    failures: tuple[FailureRow, ...]
    goal_s: float = charts.E2E_GOAL_S
    stage_scale: charts.Scale = charts.STAGE_SCALE
    turn_scale: charts.Scale = charts.TURN_SCALE

    @property
    def title(self) -> str:
        """The browser tab's title: readable at a glance among other tabs."""
        h = self.headline
        if h.is_ready:
            return f"knotd: ready · {h.active_sessions}/{h.max_sessions} sessions"
        return f"knotd: {h.badge.lower()} · {h.title}"


def build_page(snapshot: Mapping[str, Any], histograms: LatencyHistograms, now: float | None = None) -> Page:
    """The page model for one ``DaemonState.snapshot()`` and the current histograms."""
    now = time.time() if now is None else now
    rooms = _rooms_by_session(snapshot)
    turns = snapshot.get("turns", [])
    return Page(
        now=now,
        headline=_headline(snapshot),
        about=_about(snapshot, now),
        sessions=tuple(_active(s) for s in snapshot.get("sessions", [])),
        finished=tuple(_finished(s) for s in snapshot.get("finished_sessions", [])),
        e2e=charts.sparkline([t["components"]["e2e"] for t in turns if "e2e" in t.get("components", {})]),
        turn_components=_turn_rows(turn_summaries(histograms), turns),
        recent_turns=tuple(
            TurnRow(t["at"], rooms.get(t["session_id"], _short(t["session_id"])), dict(t["components"]))
            for t in turns[::-1][:RECENT_TURNS_SHOWN]
        ),
        stages=_stage_rows(histograms),
        guardrails=_guardrail_rows(snapshot.get("guardrail_hits", {})),
        failures=tuple(
            FailureRow(f["at"], f["handler"], f["exception"], rooms.get(f["session_id"], _short(f["session_id"])))
            for f in snapshot.get("task_failures", [])
        ),
    )


def status_document(snapshot: Mapping[str, Any], histograms: LatencyHistograms) -> dict[str, Any]:
    """``/api/status``: the snapshot plus p50/p95 per turn component and stage, read from the histograms."""

    def summary(name_key: str, name: str, s: LatencySummary) -> dict[str, Any]:
        return {
            name_key: name, "count": s.count,
            "mean_s": _round(s.mean_s), "p50_s": _round(s.p50_s), "p95_s": _round(s.p95_s),
        }

    return {
        **snapshot,
        "latency": {
            "goal_s": charts.E2E_GOAL_S,
            "turn": [summary("component", n, s) for n, s in turn_summaries(histograms).items()],
            "stages": [summary("stage", n, s) for n, s in stage_summaries(histograms).items()],
        },
    }


# -- pieces ------------------------------------------------------------------------------------------------
def _headline(snap: Mapping[str, Any]) -> Headline:
    state = snap.get("state", "starting")
    title, tone = _HEADLINES.get(state, (state.replace("_", " ").capitalize(), "warn"))
    badge = {"ready": "READY", "draining": "DRAINING", "stopped": "STOPPED", "failed": "FAILED"}.get(state, "NOT READY")
    livekit, capacity = snap.get("livekit", {}), snap.get("capacity", {})
    return Headline(
        is_ready=bool(snap.get("ready")),
        badge=badge,
        tone=tone,
        title=title,
        reason=str(snap.get("reason", "")),
        worker_id=livekit.get("worker_id"),
        active_sessions=int(capacity.get("active_sessions", 0)),
        max_sessions=int(capacity.get("max_sessions", 0)),
        steps=_steps(state, is_registered=livekit.get("registered_since") is not None),
    )


def _steps(state: str, *, is_registered: bool) -> tuple[Step, ...]:
    models = {"starting": "todo", "loading_models": "active"}.get(state, "done")
    registered = "done" if is_registered else ("active" if state in ("connecting", "reconnecting") else "todo")
    taking = {"ready": "done", "draining": "off", "stopped": "off"}.get(state, "todo")
    states = [models, registered, taking]
    if state == "failed":  # mark where it broke
        states = [s if s == "done" else "todo" for s in states]
        states[next((i for i, s in enumerate(states) if s != "done"), len(states) - 1)] = "failed"
    labels = ("Models loaded", "Registered with LiveKit", "Taking sessions")
    return tuple(Step(label, s) for label, s in zip(labels, states, strict=True))


def _about(snap: Mapping[str, Any], now: float) -> About:
    livekit = snap.get("livekit", {})
    uptime = float(snap.get("uptime_s", 0.0))
    return About(
        version=str(snap.get("version", "")),
        started_at=now - uptime,
        uptime_s=uptime,
        livekit_url=str(livekit.get("url", "")),
        agent_name=str(livekit.get("agent_name", "")),
        worker_id=livekit.get("worker_id"),
        registered_since=livekit.get("registered_since"),
        registrations=int(livekit.get("registrations", 0)),
        model=str(snap.get("model", "")),
    )


def _active(s: Mapping[str, Any]) -> ActiveSession:
    return ActiveSession(
        room=str(s.get("room", "")),
        phase=str(s.get("phase", "")),
        started_at=float(s["started_at"]),
        turns=int(s.get("turns", 0)),
        guardrail_hits=int(s.get("guardrail_hits", 0)),
        task_failures=int(s.get("task_failures", 0)),
        last_e2e_s=s.get("last_e2e_s"),
    )


def _finished(summary: Mapping[str, Any]) -> FinishedSession:
    """A session summary record (``knotd/agent/session.py``), read tolerantly: a missing or odd field shows as —."""
    started, ended = _number(summary.get("started_at")), _number(summary.get("ended_at"))
    duration = _number(summary.get("duration_s"))
    if duration is None and started is not None and ended is not None:
        duration = ended - started
    phases = summary.get("phases_reached", [])
    last_phase = summary.get("final_phase") or (phases[-1] if isinstance(phases, list) and phases else "")
    guardrail = summary.get("guardrail")
    hits = guardrail.get("hits") if isinstance(guardrail, Mapping) else summary.get("guardrail_hits")
    latency = summary.get("latency_s")
    e2e = latency.get("e2e") if isinstance(latency, Mapping) else None
    return FinishedSession(
        room=str(summary.get("room") or _short(str(summary.get("session_id", "")))),
        outcome=str(summary.get("outcome", "")),
        ended_at=ended,
        duration_s=duration,
        turns=_count(summary.get("turns")),
        guardrail_hits=_count(hits),
        task_failures=_count(summary.get("task_failures")),
        last_phase=str(last_phase),
        e2e_p50_s=_number(e2e.get("p50")) if isinstance(e2e, Mapping) else None,
        answers=_answers(summary.get("answers")),
    )


def _answers(raw: Any) -> tuple[tuple[str, bool, str | None], ...]:
    if not isinstance(raw, Mapping):
        return ()
    out = []
    for name, entry in raw.items():
        if isinstance(entry, Mapping):
            value = entry.get("answer")
            out.append((str(name), bool(entry.get("understood")), str(value) if value is not None else None))
    return tuple(out)


def _turn_rows(summaries: Mapping[str, LatencySummary], turns: Sequence[Mapping[str, Any]]) -> tuple[LatencyRow, ...]:
    last = turns[-1]["components"] if turns else {}
    return tuple(
        LatencyRow(
            name=name,
            label=TURN_COMPONENT_LABELS.get(name, name),
            count=s.count,
            errors=0,
            mean_s=s.mean_s,
            p50_s=s.p50_s,
            p95_s=s.p95_s,
            last_s=last.get(name),
            bar=charts.range_bar(charts.TURN_SCALE, s.p50_s, s.p95_s),
        )
        for name, s in summaries.items()
    )


def _stage_rows(histograms: LatencyHistograms) -> tuple[LatencyRow, ...]:
    errors = error_counts(histograms.stages)
    return tuple(
        LatencyRow(
            name=name,
            label=name,
            count=s.count,
            errors=errors.get(name, 0),
            mean_s=s.mean_s,
            p50_s=s.p50_s,
            p95_s=s.p95_s,
            last_s=None,
            bar=charts.range_bar(charts.STAGE_SCALE, s.p50_s, s.p95_s),
        )
        for name, s in stage_summaries(histograms).items()
    )


def _guardrail_rows(hits: Mapping[str, int]) -> tuple[GuardrailRow, ...]:
    most = max(hits.values(), default=0) or 1
    rows = []
    for key, count in sorted(hits.items(), key=lambda kv: (-kv[1], kv[0])):
        direction, _, rule = key.partition(":")
        rows.append(GuardrailRow(direction, rule or direction, int(count), round(100 * count / most, 1)))
    return tuple(rows)


def _rooms_by_session(snap: Mapping[str, Any]) -> dict[str, str]:
    rooms = {str(s.get("session_id")): str(s.get("room", "")) for s in snap.get("finished_sessions", [])}
    rooms.update({s["session_id"]: s["room"] for s in snap.get("sessions", [])})
    return rooms


def _short(session_id: str) -> str:
    return f"session {session_id[:8]}" if session_id else "—"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    """An int, the size of a list, or the sum of a (nested) mapping of counts such as {direction: {rule: n}}."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        return sum(_count(v) or 0 for v in value.values())
    if isinstance(value, list):
        return len(value)
    return None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
