"""Every Prometheus metric knotd exports, declared once.

They live in prometheus_client's default registry on purpose: livekit-agents registers its ``lk_agents_*``
series there, and so do the process and platform collectors, so one registry gives the whole picture at
``/metrics``. Label values are bounded enums only: never room names, identities or text.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from knotd import __version__
from knotd.conversation.turns import TURN_ENDINGS as TURN_ENDING_KINDS

if TYPE_CHECKING:
    from knotd.bridge import TaskFailure
    from knotd.conversation.guardrails import Guardrail, Verdict
    from knotd.conversation.summary import SessionSummary

# Boundaries at 0.5 s and 0.8 s (the voice-to-voice goal) so quantiles near the target are sharp.
TURN_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

TURN_COMPONENTS = ("eou", "stt", "llm_ttft", "tts_ttfb", "e2e")
GUARD_DIRECTIONS = ("input", "output")
TASK_OUTCOMES = ("ok", "failed", "cancelled")
SESSION_OUTCOMES = ("completed", "disconnected", "error", "drained", "interrupted", "crashed")
SPECULATIVE_RESULTS = ("used", "discarded", "skipped")
TURN_DETECTIONS = ("model", "vad")
STT_DROP_REASONS = ("echo", "no_speech", "repetition")

STAGE_DURATION = Histogram(
    "knotd_stage_duration_seconds",
    "Duration of a named pipeline or lifecycle stage (config, model_load, stt_init, input_guard, ...).",
    ["stage", "status"],
    buckets=STAGE_BUCKETS,
)
TURN_LATENCY = Histogram(
    "knotd_turn_latency_seconds",
    "Per-turn latency by component; e2e is end of user speech to the first agent audio frame.",
    ["component"],
    buckets=TURN_BUCKETS,
)
STT_SPECULATIVE = Counter(
    "knotd_stt_speculative_total",
    "Transcriptions started at the user's first pause before the turn ended: used as the turn's transcript, "
    "discarded because the user went on speaking, or skipped because a discarded one was still running.",
    ["result"],
)
TURN_ENDINGS = Counter(
    "knotd_turn_endings_total",
    "User turns by what ended them: model (the end-of-turn model said done, min delay), max_delay (it said "
    "not done, the caller stayed silent), min_delay (no prediction in time), vad (VAD endpointing).",
    ["how"],
)
TURN_CUTOFFS = Counter(
    "knotd_turn_cutoffs_total",
    "Agent answers the caller talked into within 1 s of their start (the turn probably ended too early), "
    "by turn detection (model, vad).",
    ["detection"],
)
STT_DROPPED = Counter(
    "knotd_stt_dropped_total",
    "Prompted transcripts dropped as not the caller's words: an echo of the prompt, no speech, or a decoder loop.",
    ["reason"],
)
GUARDRAIL_CHECKS = Counter(
    "knotd_guardrail_checks_total",
    "Guardrail rule evaluations, by direction (input: user transcript, output: LLM text) and rule.",
    ["direction", "rule"],
)
GUARDRAIL_HITS = Counter(
    "knotd_guardrail_hits_total",
    "Guardrail rule hits: texts that were blocked or replaced, by direction and rule.",
    ["direction", "rule"],
)
HANDLER_TASKS = Counter(
    "knotd_handler_tasks_total",
    "Async tasks spawned by sync event handlers through the bridge, by handler and outcome.",
    ["handler", "outcome"],
)
HANDLER_TASKS_INFLIGHT = Gauge(
    "knotd_handler_tasks_inflight",
    "Bridged handler tasks currently running, by handler.",
    ["handler"],
)
SESSIONS_ACTIVE = Gauge("knotd_sessions_active", "Knotencheck sessions running now.")
SESSIONS = Counter(
    "knotd_sessions_total",
    "Finished Knotencheck sessions, by outcome (completed, disconnected, error, drained, interrupted).",
    ["outcome"],
)
PHASE_TRANSITIONS = Counter(
    "knotd_phase_transitions_total",
    "Conversation phase transitions, by the phase entered.",
    ["phase"],
)
LLM_FAILURES = Counter(
    "knotd_llm_failures_total",
    "LLM requests that failed and were answered with the fallback line, by reason.",
    ["reason"],
)
RECORD_WRITE_FAILURES = Counter(
    "knotd_session_record_write_failures_total",
    "Session records that could not be appended to sessions.jsonl (state directory full or read-only); they "
    "wait in memory and are written with the next record that succeeds.",
)
READY = Gauge("knotd_ready", "1 when knotd is ready to take sessions (the same as /readyz answering 200).")
WORKER_REGISTERED = Gauge("knotd_worker_registered", "1 while the LiveKit worker is registered with the server.")
WORKER_REGISTRATIONS = Counter(
    "knotd_worker_registrations_total",
    "Successful worker registrations with LiveKit; more than one means the connection was re-established.",
)
LIVEKIT_FFI_PANICS = Counter(
    "knotd_livekit_ffi_panics_total",
    "Panics of the livekit rtc SDK's native core; each makes knotd drain and exit 1 for a restart.",
)
SD_NOTIFY_DROPPED = Counter(
    "knotd_sd_notify_dropped_total",
    "sd_notify messages not delivered (error: BlockingIOError when systemd's queue is full, "
    "FileNotFoundError or ConnectionRefusedError when it is gone); never waited for.",
    ["error"],
)
MAX_SESSIONS = Gauge("knotd_sessions_max", "Configured session capacity of this worker (worker.max_sessions).")
BUILD_INFO = Gauge("knotd_build_info", "Always 1; the label carries the knotd version.", ["version"])


def initialise(max_sessions: int) -> None:
    """Set the constant series and create every known label combination, so dashboards see zeros, not gaps."""
    BUILD_INFO.labels(version=__version__).set(1)
    MAX_SESSIONS.set(max_sessions)
    for component in TURN_COMPONENTS:
        TURN_LATENCY.labels(component=component)
    # A counter's first sample is never counted by rate()/increase(): start every outcome at zero.
    for outcome in SESSION_OUTCOMES:
        SESSIONS.labels(outcome=outcome)
    for result in SPECULATIVE_RESULTS:
        STT_SPECULATIVE.labels(result=result)
    for how in TURN_ENDING_KINDS:
        TURN_ENDINGS.labels(how=how)
    for detection in TURN_DETECTIONS:
        TURN_CUTOFFS.labels(detection=detection)
    for reason in STT_DROP_REASONS:
        STT_DROPPED.labels(reason=reason)


def initialise_guardrail(guardrail: Guardrail) -> None:
    """Create every (direction, rule) series at zero so dashboards see zeros, not gaps."""
    for direction in GUARD_DIRECTIONS:
        for rule in guardrail.rule_names(direction):
            GUARDRAIL_CHECKS.labels(direction=direction, rule=rule)
        for rule in guardrail.hit_labels(direction):
            GUARDRAIL_HITS.labels(direction=direction, rule=rule)


def initialise_phases(phases: Iterable[str]) -> None:
    """Create every phase's transition series at zero."""
    for name in phases:
        PHASE_TRANSITIONS.labels(phase=name)


def record_guardrail_verdict(direction: str, verdict: Verdict) -> None:
    """Count one check in ``knotd_guardrail_checks_total`` (per rule evaluated) and a hit in ``..._hits_total``."""
    for rule in verdict.checked:
        GUARDRAIL_CHECKS.labels(direction=direction, rule=rule).inc()
    if not verdict.allowed and verdict.rule:
        GUARDRAIL_HITS.labels(direction=direction, rule=verdict.rule).inc()


def observe_turn(components: Mapping[str, float]) -> None:
    """Observe one completed turn's components in ``knotd_turn_latency_seconds``."""
    for component, value in components.items():
        TURN_LATENCY.labels(component=component).observe(value)


class MetricsObserver:
    """The sessions' series, as a ``knotd.agent.observer.SessionObserver``: active and finished sessions, phase
    transitions, turn latency, guardrail checks and hits. (Bridged tasks count themselves in ``knotd.bridge``.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0

    def session_started(self, session_id: str, room: str, phase: str) -> None:
        with self._lock:
            self._active += 1
            SESSIONS_ACTIVE.set(self._active)

    def phase_changed(self, session_id: str, phase: str) -> None:
        PHASE_TRANSITIONS.labels(phase=phase).inc()

    def turn_completed(self, session_id: str, components: Mapping[str, float]) -> None:
        observe_turn(components)

    def turn_ended(self, session_id: str, how: str) -> None:
        TURN_ENDINGS.labels(how=how).inc()

    def turn_cut_off(self, session_id: str, detection: str) -> None:
        TURN_CUTOFFS.labels(detection=detection).inc()

    def guard_verdict(self, session_id: str, direction: str, verdict: Verdict) -> None:
        record_guardrail_verdict(direction, verdict)

    def task_failed(self, failure: TaskFailure) -> None:
        pass

    def session_finished(self, summary: SessionSummary) -> None:
        SESSIONS.labels(outcome=summary.outcome).inc()
        with self._lock:
            self._active -= 1
            SESSIONS_ACTIVE.set(self._active)

    @property
    def is_draining(self) -> bool:
        return False


def render() -> tuple[bytes, str]:
    """The exposition text of the whole registry and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
