"""Speech to text with faster-whisper behind livekit's STT ABC.

`WhisperSTT` is a non-streaming livekit STT around the daemon's shared WhisperModel: the session's VAD cuts
the utterances, this module turns each into 16 kHz mono and hands it to `knotd.agent.whisper`, which feeds
the encoder a window sized to the utterance (see there for why and how).

This module does not load the model (see `knotd.agent.models`) and does not detect speech (VAD does).
"""

from __future__ import annotations

import asyncio

import numpy as np
from faster_whisper import WhisperModel
from livekit import rtc
from livekit.agents import APIError, stt, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from knotd.agent.whisper import (
    STOCK_WINDOW_S,
    WHISPER_SAMPLE_RATE,
    WINDOW_BUCKETS_S,
    Transcript,
    WhisperTranscriber,
)
from knotd.config import SttSettings

__all__ = ["STOCK_WINDOW_S", "WINDOW_BUCKETS_S", "Transcript", "WhisperSTT", "WhisperTranscriber",
           "frame_to_whisper_input"]


def frame_to_whisper_input(frame: rtc.AudioFrame) -> np.ndarray:
    """One audio frame (any rate, any channel count, s16) as 16 kHz mono float32 in [-1, 1]."""
    samples = np.frombuffer(frame.data, dtype=np.int16)
    if frame.num_channels > 1:
        samples = samples.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
    if frame.sample_rate != WHISPER_SAMPLE_RATE and samples.size:
        resampler = rtc.AudioResampler(frame.sample_rate, WHISPER_SAMPLE_RATE, num_channels=1,
                                       quality=rtc.AudioResamplerQuality.HIGH)
        out = resampler.push(bytearray(samples.tobytes())) + resampler.flush()
        samples = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in out]) if out else samples[:0]
    return samples.astype(np.float32) / 32768.0


class WhisperSTT(stt.STT):
    """livekit STT (non-streaming) around a shared WhisperModel; the session's VAD cuts the utterances."""

    def __init__(self, model: WhisperModel, settings: SttSettings, *, model_name: str | None = None) -> None:
        """Cheap: builds views on the already loaded `model`.

        Args:
            model_name: reported in livekit's STT metrics; defaults to the model directory's name.
        """
        super().__init__(capabilities=stt.STTCapabilities(streaming=False, interim_results=False))
        self._transcriber = WhisperTranscriber(model, settings)
        self._model_name = model_name or settings.model.rstrip("/").rsplit("/", 1)[-1]

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return "faster-whisper"

    @property
    def transcriber(self) -> WhisperTranscriber:
        return self._transcriber

    def transcribe_pcm(self, pcm: np.ndarray, *, language: str | None = None) -> Transcript:
        """Transcribe 16 kHz mono float32 audio (blocking); see `WhisperTranscriber.transcribe_pcm`."""
        return self._transcriber.transcribe_pcm(pcm, language=language)

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.SpeechEvent:
        frames = buffer if isinstance(buffer, list) else [buffer]
        forced = language if utils.is_given(language) else None
        if frames:
            try:
                result = await asyncio.to_thread(self._recognize_blocking, rtc.combine_audio_frames(frames), forced)
            except (RuntimeError, ValueError) as err:  # CTranslate2 and numpy failures
                raise APIError(f"whisper transcription failed: {type(err).__name__}: {err}",
                               retryable=False) from err
        else:
            result = Transcript("", forced or self._transcriber.settings.language, 0)
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid("stt_"),
            alternatives=[stt.SpeechData(language=result.language, text=result.text)],
        )

    def _recognize_blocking(self, frame: rtc.AudioFrame, language: str | None) -> Transcript:
        return self._transcriber.transcribe_pcm(frame_to_whisper_input(frame), language=language)
