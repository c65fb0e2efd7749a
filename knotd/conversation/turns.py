"""Per-turn latency, observed live from livekit's ``ChatMessage.metrics`` as each message is added.

A user message carries ``end_of_turn_delay`` (eou) and ``transcription_delay`` (stt); the assistant message
that answers it carries ``llm_node_ttft``, ``tts_node_ttfb`` and ``e2e_latency``. The components:

- eou: end of user speech → turn committed (the VAD's silence, endpointing, waiting for the transcript);
- stt: end of user speech → final transcript. Part of eou, not added to it;
- llm_ttft: LLM request → first token; tts_ttfb: first sentence at the TTS → its first audio;
- e2e: end of user speech → the first agent audio frame handed to the output (the room's audio track, or
  the local speaker): livekit takes it from the output's ``on_playback_started``, so it is what a person
  hears, not the LLM's first token.

So e2e = eou + llm_ttft + tts_ttfb + the hand-offs between them (input guard, scheduling, the rest of the
first sentence after the first token, forwarding audio): a few milliseconds with the scripted LLM and
espeak-ng, more with an LLM that streams its first sentence slowly (tests/test_latency.py checks the sum).
"End of user speech" is where the session's Silero VAD puts it; its smoothed speech probability lags the
last audible sound by roughly 30–110 ms (espeak-ng speech), so what the user perceives is about that much
longer than e2e.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

USER_COMPONENTS = {"eou": "end_of_turn_delay", "stt": "transcription_delay"}
AGENT_COMPONENTS = {"llm_ttft": "llm_node_ttft", "tts_ttfb": "tts_node_ttfb", "e2e": "e2e_latency"}


class TurnObserver:
    """Pairs user and assistant messages into turns.

    Args:
        on_turn: called with the components (seconds) of every completed turn.
    """

    def __init__(self, on_turn: Callable[[dict[str, float]], None]) -> None:
        self._on_turn = on_turn
        self._pending_user: dict[str, float] = {}
        self.turns: list[dict[str, float]] = []

    def on_message(self, role: str, report: dict[str, Any] | None) -> None:
        report = report or {}
        if role == "user":
            self._pending_user = _pick(report, USER_COMPONENTS)
            return
        if role != "assistant":
            return
        turn = {**self._pending_user, **_pick(report, AGENT_COMPONENTS)}
        self._pending_user = {}
        if not turn:
            return
        self.turns.append(turn)
        self._on_turn(turn)


def _pick(report: dict[str, Any], mapping: dict[str, str]) -> dict[str, float]:
    out = {}
    for component, key in mapping.items():
        value = report.get(key)
        if isinstance(value, (int, float)) and value >= 0:
            out[component] = float(value)
    return out


# How a user turn ended (``knotd_turn_endings_total{how}``): the model said "done" and min_delay passed;
# the model said "not done" and max_delay passed; the model gave no answer in time (min_delay); or the
# VAD's silence ended it (detection "vad", or the model is unavailable).
TURN_ENDINGS = ("model", "max_delay", "min_delay", "vad")
# The caller resumed speaking this soon after the agent began answering: the turn was ended too early.
CUTOFF_WINDOW_S = 1.0


class TurnDecision:
    """The end-of-turn model's answer for the pause that ended a turn."""

    __slots__ = ("probability", "threshold")

    def __init__(self, probability: float | None, threshold: float | None) -> None:
        self.probability, self.threshold = probability, threshold

    @property
    def ending(self) -> str:
        """One of ``TURN_ENDINGS`` (never ``vad``: a decision exists only with the model)."""
        if self.probability is None or self.threshold is None:
            return "min_delay"
        return "model" if self.probability >= self.threshold else "max_delay"


class CutoffWatch:
    """Counts answers the caller talked into within ``CUTOFF_WINDOW_S`` of their start.

    Feed it the agent's and the user's state changes with their times (seconds, any one clock).

    Args:
        on_cutoff: called once per such answer.
    """

    def __init__(self, on_cutoff: Callable[[], None]) -> None:
        self._on_cutoff = on_cutoff
        self._answer_started: float | None = None

    def agent_speaking(self, at: float) -> None:
        self._answer_started = at

    def user_speaking(self, at: float) -> None:
        started, self._answer_started = self._answer_started, None
        if started is not None and 0 <= at - started <= CUTOFF_WINDOW_S:
            self._on_cutoff()
