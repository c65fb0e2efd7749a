"""The status page's model: what a ``StatusSnapshot`` and the latency histograms mean to a person.

``build_page()`` turns the snapshot into small frozen records the templates draw:
a headline that says whether knotd is ready and why not, the facts about this daemon, sessions, latency
charts, guardrail hits and failures. It formats nothing (that is the templates' job) and reads no state
of its own; the same model feeds the first paint and every live update, so the two cannot disagree.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from knotd.conversation.summary import SessionSummary
from knotd.conversation.turns import TURN_ENDINGS
from knotd.status import charts
from knotd.status.latency import (
    LatencyHistograms,
    LatencySummary,
    error_counts,
    stage_summaries,
    turn_summaries,
)
from knotd.status.snapshot import ActiveSession, StatusSnapshot

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


DEMO_TITLE = "Demo: one session on local audio, no LiveKit"


@dataclass(frozen=True)
class Headline:
    is_ready: bool
    is_demo: bool
    badge: str  # READY / NOT READY / DRAINING / STOPPED / FAILED
    tone: str  # ok / warn / bad / idle: the badge colour
    title: str  # what is happening, e.g. "Connecting to LiveKit"
    reason: str  # the daemon's own words for it
    worker_id: str | None
    active_sessions: int
    max_sessions: int
    steps: tuple[Step, ...]
    journal_problem: str | None = None
    journal_pending: int = 0


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
    is_demo: bool = False


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
    turn_endings: tuple[tuple[str, int], ...] = ()  # (how, turns), in TURN_ENDINGS order
    cutoffs: int = 0
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


def build_page(snapshot: StatusSnapshot, histograms: LatencyHistograms, now: float | None = None) -> Page:
    """The page model for one snapshot and the current histograms."""
    now = time.time() if now is None else now
    rooms = _rooms_by_session(snapshot)
    turns = snapshot.turns
    return Page(
        now=now,
        headline=_headline(snapshot),
        about=_about(snapshot, now),
        sessions=snapshot.sessions,
        finished=tuple(_finished(s) for s in snapshot.finished_sessions),
        e2e=charts.sparkline([t.components["e2e"] for t in turns if "e2e" in t.components]),
        turn_components=_turn_rows(turn_summaries(histograms), turns[-1].components if turns else {}),
        recent_turns=tuple(
            TurnRow(t.at, rooms.get(t.session_id, _short(t.session_id)), dict(t.components))
            for t in turns[::-1][:RECENT_TURNS_SHOWN]
        ),
        stages=_stage_rows(histograms),
        guardrails=_guardrail_rows(snapshot.guardrail_hits),
        turn_endings=tuple((how, int(snapshot.turn_endings.get(how, 0))) for how in TURN_ENDINGS
                           if snapshot.turn_endings.get(how)),
        cutoffs=sum(snapshot.turn_cutoffs.values()),
        failures=tuple(
            FailureRow(f.at, f.handler, f.exception, rooms.get(f.session_id, _short(f.session_id)))
            for f in snapshot.task_failures
        ),
    )


def status_document(snapshot: StatusSnapshot, histograms: LatencyHistograms) -> dict[str, Any]:
    """``/api/status``: the snapshot plus p50/p95 per turn component and stage, read from the histograms."""

    def summary(name_key: str, name: str, s: LatencySummary) -> dict[str, Any]:
        return {
            name_key: name, "count": s.count,
            "mean_s": _round(s.mean_s), "p50_s": _round(s.p50_s), "p95_s": _round(s.p95_s),
        }

    return {
        **snapshot.to_json(),
        "latency": {
            "goal_s": charts.E2E_GOAL_S,
            "turn": [summary("component", n, s) for n, s in turn_summaries(histograms).items()],
            "stages": [summary("stage", n, s) for n, s in stage_summaries(histograms).items()],
        },
    }


# -- pieces ------------------------------------------------------------------------------------------------
def _headline(snap: StatusSnapshot) -> Headline:
    state = snap.state
    title, tone = _HEADLINES.get(state, (state.replace("_", " ").capitalize(), "warn"))
    badge = {"ready": "READY", "draining": "DRAINING", "stopped": "STOPPED", "failed": "FAILED"}.get(state, "NOT READY")
    if snap.is_demo and state == "ready":
        title, badge = DEMO_TITLE, "DEMO"
    return Headline(
        is_ready=snap.ready,
        is_demo=snap.is_demo,
        badge=badge,
        tone=tone,
        title=title,
        reason=snap.reason,
        worker_id=snap.livekit.worker_id,
        active_sessions=len(snap.sessions),
        max_sessions=snap.max_sessions,
        steps=_steps(state, is_registered=snap.livekit.registered_since is not None, is_demo=snap.is_demo),
        journal_problem=snap.journal_problem,
        journal_pending=snap.journal_pending,
    )


def _steps(state: str, *, is_registered: bool, is_demo: bool = False) -> tuple[Step, ...]:
    models = {"starting": "todo", "loading_models": "active"}.get(state, "done")
    registered = "done" if is_registered else ("active" if state in ("connecting", "reconnecting") else "todo")
    taking = {"ready": "done", "draining": "off", "stopped": "off"}.get(state, "todo")
    if is_demo:  # no LiveKit: the audio is local and in place from the start
        registered = "done"
    states = [models, registered, taking]
    if state == "failed":  # mark where it broke
        states = [s if s in ("done", "off") else "todo" for s in states]
        states[next((i for i, s in enumerate(states) if s == "todo"), len(states) - 1)] = "failed"
    second = "Local audio (demo, no LiveKit)" if is_demo else "Registered with LiveKit"
    labels = ("Models loaded", second, "Taking sessions")
    return tuple(Step(label, s) for label, s in zip(labels, states, strict=True))


def _about(snap: StatusSnapshot, now: float) -> About:
    livekit = snap.livekit
    return About(
        version=snap.version,
        started_at=now - snap.uptime_s,
        uptime_s=snap.uptime_s,
        livekit_url=livekit.url,
        agent_name=livekit.agent_name,
        worker_id=livekit.worker_id,
        registered_since=livekit.registered_since,
        registrations=livekit.registrations,
        model=snap.model,
        is_demo=snap.is_demo,
    )


def _finished(summary: SessionSummary) -> FinishedSession:
    """A finished session's summary; what was not measured (no turns, no e2e) shows as —."""
    phases = summary.phases_reached
    return FinishedSession(
        room=summary.room or _short(summary.session_id),
        outcome=summary.outcome,
        ended_at=summary.ended_at,
        duration_s=summary.duration_s,
        turns=summary.turns,
        guardrail_hits=summary.guardrail.total_hits,
        task_failures=summary.task_failures,
        last_phase=summary.final_phase or (phases[-1] if phases else ""),
        e2e_p50_s=summary.e2e_p50_s,
        answers=tuple((name, a.understood, a.answer if a.kept else None) for name, a in summary.answers.items()),
    )


def _turn_rows(summaries: Mapping[str, LatencySummary], last: Mapping[str, float]) -> tuple[LatencyRow, ...]:
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


def _rooms_by_session(snap: StatusSnapshot) -> dict[str, str]:
    rooms = {s.session_id: s.room for s in snap.finished_sessions}
    rooms.update({s.session_id: s.room for s in snap.sessions})
    return rooms


def _short(session_id: str) -> str:
    return f"session {session_id[:8]}" if session_id else "—"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
