"""End-of-turn detection for one session: LiveKit's local model, and which rule ended each turn.

``EndOfTurnDetector`` is livekit's ``TurnDetector(version="v1-mini")`` (the local model over
``livekit-local-inference``; ``knotd.speech.turn_model`` loaded it once for the daemon) that also remembers
the model's answer for the current pause, so the session can tell how the turn ended. livekit asks the
model once the VAD has heard 0.2 s of silence; at the VAD's end of speech it waits, from the end of speech,
``min_delay`` when the probability is at least the language's threshold (German: 0.245) and ``max_delay``
when it is below. One detector per session: livekit subscribes each session's activity to its events.
"""

from __future__ import annotations

from typing import Any

from livekit.agents.inference import TurnDetector
from livekit.agents.inference.eot.base import _BaseStreamingTurnDetectorStream
from livekit.agents.inference.eot.transports import _LocalTransport
from livekit.agents.language import LanguageCode
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

from knotd.conversation.turns import TurnDecision

# livekit refuses a VAD silence below its 0.2 s prediction point + 50 ms with the model; the session's VAD
# ends speech this early so the model, not the VAD's silence, decides when the turn ends.
MODEL_VAD_SILENCE_S = 0.25


class _RecordingStream(_BaseStreamingTurnDetectorStream):
    """livekit's per-session stream, noting the model's answer to the latest request."""

    probability: float | None = None

    def predict(self) -> Any:
        self.probability = None  # a new pause: the previous answer no longer applies
        return super().predict()

    def _resolve_prediction(self, request_id: str, probability: float, **kwargs: Any) -> None:
        if request_id == self._request_id:
            self.probability = probability
        super()._resolve_prediction(request_id, probability, **kwargs)


class EndOfTurnDetector(TurnDetector):
    """The local end-of-turn model for one session.

    Args:
        language: the conversation's language (its threshold is used for the decision).
        threshold: replaces the shipped threshold for `language` (0: keep it).
    """

    def __init__(self, language: str, threshold: float = 0.0) -> None:
        super().__init__(version="v1-mini")
        self._language = LanguageCode(language)
        if threshold:
            # Not the constructor's `unlikely_threshold`, which warns on every session.
            self._opts.thresholds.update_overrides({self._language: threshold})
        self._stream: _RecordingStream | None = None

    def stream(self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> _RecordingStream:
        self._stream = _RecordingStream(detector=self, opts=self._opts, transport=_LocalTransport(opts=self._opts),
                                        model=self._model, local_fallback=False)
        return self._stream

    @property
    def threshold(self) -> float | None:
        return self._opts.thresholds.lookup(self._language)

    def decision(self) -> TurnDecision:
        """The model's answer for the pause that ended the latest turn (probability None: it gave none)."""
        probability = self._stream.probability if self._stream is not None else None
        return TurnDecision(probability, self.threshold)
