"""Per-turn latency, observed live from livekit's ``ChatMessage.metrics`` as each message is added.

A user message carries ``end_of_turn_delay`` (eou) and ``transcription_delay`` (stt); the assistant message
that answers it carries ``llm_node_ttft``, ``tts_node_ttfb`` and ``e2e_latency``. livekit measures e2e from
the end of user speech to the moment the audio output reports its first frame played
(``on_playback_started``), which is what a person hears, not the LLM's first token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from knotd import metrics

USER_COMPONENTS = {"eou": "end_of_turn_delay", "stt": "transcription_delay"}
AGENT_COMPONENTS = {"llm_ttft": "llm_node_ttft", "tts_ttfb": "tts_node_ttfb", "e2e": "e2e_latency"}


class TurnObserver:
    """Pairs user and assistant messages into turns and observes ``knotd_turn_latency_seconds``.

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
        for component, value in turn.items():
            metrics.TURN_LATENCY.labels(component=component).observe(value)
        self.turns.append(turn)
        self._on_turn(turn)


def _pick(report: dict[str, Any], mapping: dict[str, str]) -> dict[str, float]:
    out = {}
    for component, key in mapping.items():
        value = report.get(key)
        if isinstance(value, (int, float)) and value >= 0:
            out[component] = float(value)
    return out
