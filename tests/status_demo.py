"""A busy, made-up knotd for the status page: sessions, turns, guardrail hits, failures, stage timings.

The browser test screenshots it for the README, and ``python -m tests.status_demo [port]`` serves it for a
look by hand. Everything goes through the real ``DaemonState`` methods and the real app; only the numbers
are invented. Its histograms are private, not knotd's process-wide ones, so the screenshot is the same on
every run and other tests' metrics stay untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time

from aiohttp import web
from prometheus_client import Histogram

from knotd import metrics
from knotd.bridge import TaskFailure
from knotd.conversation.guardrails import GuardSummary, Verdict
from knotd.conversation.recognition import StepAnswer
from knotd.conversation.summary import SessionSummary
from knotd.state import DaemonState, Lifecycle
from knotd.status.app import create_app
from knotd.status.latency import LatencyHistograms

WORKER_ID = "AW_kT4mZq8vRx2L"

# (stage, seconds): lifecycle once, pipeline stages per turn
LIFECYCLE_STAGES = [
    ("config", 0.004), ("stt_load", 0.61), ("stt_warmup", 1.32), ("vad_init", 0.09), ("tts_init", 0.012),
    ("model_load", 2.1), ("status_listen", 0.002), ("worker_start", 0.21),
]
PIPELINE_STAGES = [("input_guard", 0.0004), ("output_guard", 0.0007), ("session_start", 0.35)]

# e2e seconds of the last turns; two miss the 0.8 s goal
E2E = [0.62, 0.58, 0.71, 0.66, 0.93, 0.61, 0.55, 0.64, 0.69, 0.72, 0.6, 0.57, 0.66, 1.12, 0.63, 0.59,
       0.68, 0.74, 0.61, 0.65, 0.58, 0.7, 0.66, 0.62]


def demo_histograms() -> LatencyHistograms:
    return LatencyHistograms(
        stages=Histogram("demo_stage_seconds", "demo", ["stage", "status"], buckets=metrics.STAGE_BUCKETS,
                         registry=None),
        turns=Histogram("demo_turn_seconds", "demo", ["component"], buckets=metrics.TURN_BUCKETS, registry=None),
    )


def build_demo(now: float | None = None) -> tuple[DaemonState, LatencyHistograms]:
    """A ready daemon, up for three hours, with two live sessions and three finished ones."""
    now = time.time() if now is None else now
    hist = demo_histograms()
    state = DaemonState(livekit_url="wss://livekit.werkstatt.example", agent_name="knotencheck",
                      model="faster-whisper base (int8, 15 s window) · Silero VAD · espeak-ng de",
                      max_sessions=4, started_at=now - 3 * 3600 - 17 * 60)

    def stage(name: str, seconds: float, status: str = "ok") -> None:
        hist.stages.labels(stage=name, status=status).observe(seconds)

    for name, seconds in LIFECYCLE_STAGES:
        stage(name, seconds)
    state.set_lifecycle(Lifecycle.READY, "ready")
    state.worker_registered(WORKER_ID)
    state.registered_since = now - 3 * 3600 - 16 * 60

    state.session_started("s-a41f", "werkstatt-7", "greeting")
    state.session_started("s-b93c", "<script>alert('knot')</script>", "greeting")  # room names are user input
    state.phase_changed("s-a41f", "step_size")
    state.phase_changed("s-b93c", "consent")
    state.sessions["s-a41f"].started_at = now - 4 * 60 - 12
    state.sessions["s-b93c"].started_at = now - 38

    for i, e2e in enumerate(E2E):
        session = "s-a41f" if i % 3 else "s-9d02"
        components = {"eou": 0.18 + (i % 4) * 0.02, "stt": 0.21 + (i % 5) * 0.03, "llm_ttft": 0.16 + (i % 3) * 0.04,
                      "tts_ttfb": 0.07 + (i % 2) * 0.02, "e2e": e2e}
        state.turn_completed(session, components)
        for component, seconds in components.items():
            hist.turns.labels(component=component).observe(seconds)
        for name, seconds in PIPELINE_STAGES[:2]:
            stage(name, seconds * (1 + (i % 3) / 2))
    state.turns = type(state.turns)(
        (dataclasses.replace(t, at=now - (len(E2E) - i) * 11) for i, t in enumerate(state.turns)),
        maxlen=state.turns.maxlen,
    )
    for i in range(5):
        stage("session_start", 0.3 + i * 0.04)
    stage("llm_request", 2.5, status="error")

    state.guard_verdict("s-a41f", "input", Verdict(False, rule="off_topic"))
    state.guard_verdict("s-9d02", "input", Verdict(False, rule="off_topic"))
    state.guard_verdict("s-9d02", "input", Verdict(False, rule="prompt_injection"))
    for _ in range(4):
        state.guard_verdict("s-0c11", "input", Verdict(False, rule="off_topic"))
    state.guard_verdict("s-0c11", "output", Verdict(False, rule="no_diagnosis"))

    state.task_failed(TaskFailure("s-9d02", "on_participant_connected", "ConnectionResetError", now - 22 * 60))
    state.task_failed(TaskFailure("s-a41f", "publish_phase", "TimeoutError", now - 95))

    # (session, room, outcome, ended ago, duration, turns, phases reached, {direction: {rule: hits}}, failures, e2e p50)
    finished = [
        ("s-0c11", "werkstatt-3", "completed", 41 * 60, 6 * 60 + 40, 14,
         ["greeting", "consent", "step_location", "step_size", "step_since", "step_changes", "summary", "goodbye"],
         {"input": {"off_topic": 4}, "output": {"no_diagnosis": 1}}, 0, 0.64),
        ("s-9d02", "werkstatt-2", "disconnected", 19 * 60, 2 * 60 + 5, 8, ["greeting", "consent", "step_location"],
         {"input": {"off_topic": 1, "prompt_injection": 1}}, 1, 0.71),
        ("s-77e4", "schulung-1", "drained", 2 * 3600 + 50 * 60, 9 * 60, 21,
         ["greeting", "consent", "step_location", "step_size", "step_since", "step_changes", "summary"], {}, 0, 0.83),
    ]
    for session_id, room, outcome, ago, duration, turns, phases, hits, failures, e2e_p50 in reversed(finished):
        state.session_finished(SessionSummary(
            session_id=session_id, room=room, started_at=now - ago - duration, ended_at=now - ago,
            outcome=outcome, phases_reached=tuple(phases), final_phase=phases[-1],
            turns=turns, latency_s={"e2e": {"n": turns, "p50": e2e_p50, "p95": e2e_p50 + 0.2}},
            guardrail=GuardSummary(checks={}, hits=hits, discarded_chars=0), task_failures=failures,
            answers={field: StepAnswer(True) for field, step in
                     (("location", "step_location"), ("size", "step_size"), ("since", "step_since"),
                      ("changes", "step_changes")) if step in phases},
        ))
    return state, hist


async def serve_demo(port: int) -> None:
    state, hist = build_demo()
    state.bind_loop(asyncio.get_running_loop())
    runner = web.AppRunner(create_app(state, histograms=hist))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"status page demo on http://127.0.0.1:{port}/ (Ctrl-C stops)")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve_demo(int(sys.argv[1]) if len(sys.argv) > 1 else 9465))
