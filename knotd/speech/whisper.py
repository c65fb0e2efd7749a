"""Whisper transcription with an encoder window sized to the utterance (no livekit: importable in a thread).

faster-whisper pads every utterance to a 30 s window, and the encoder pass over 30 s is most of the
latency of a short turn on CPU (≈0.8 s of ≈1.3 s for a 3 s clip on 2 cores). CTranslate2's encoder
accepts shorter windows, so `WhisperTranscriber` feeds it the smallest window of `WINDOW_BUCKETS_S` that
holds the utterance (buckets keep the shapes few and repeating) and falls back to faster-whisper's stock
30 s path beyond the largest bucket allowed by `stt.max_window_s`. Windows under 10 s are never used:
5 s windows gave empty or repeated text.

Decoding is greedy or beam as configured, at temperature 0 only: the stock fallback ladder (0.2 … 1.0)
re-decodes misheard clips up to five times (6 s instead of 1.2 s) without better text.

This module does not load the model (see `knotd.speech.models`), does not detect speech (VAD does) and does
not import livekit, so the daemon can load and self-test Whisper while livekit is still being imported.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.feature_extractor import FeatureExtractor

from knotd.config import SttSettings

WHISPER_SAMPLE_RATE = 16000
STOCK_WINDOW_S = 30
WINDOW_BUCKETS_S = (10, 15, 20, 30)
# Shorter than this is no speech worth decoding (and an empty array would fail in the feature extractor).
_MIN_SAMPLES = WHISPER_SAMPLE_RATE // 20


class Transcript(NamedTuple):
    """What one utterance became: its text, the language it was decoded as, the encoder window used."""

    text: str
    language: str
    window_s: int


class _WindowedWhisper(WhisperModel):
    """A view of a loaded WhisperModel whose encoder window is `window_s` seconds instead of 30.

    It shares the CTranslate2 model, tokenizer and options of `base` (nothing is loaded or copied) and has
    its own FeatureExtractor, so the shared model's extractor is never changed (`transcribe(chunk_length=…)`
    would change it for every later caller). The view holds no per-call state: one view serves all threads.
    """

    def __init__(self, base: WhisperModel, window_s: int) -> None:  # no super().__init__: nothing to load
        vars(self).update(vars(base))
        self.feature_extractor = FeatureExtractor(**{**base.feat_kwargs, "chunk_length": window_s})
        self.window_frames = self.feature_extractor.nb_max_frames

    def encode(self, features: np.ndarray):  # -> ctranslate2.StorageView
        # generate_segments() cuts segments of at most window_frames and then pads each to 3000 frames
        # (faster_whisper.audio.pad_or_trim); cutting the padding back gives the short window.
        return super().encode(features[..., : self.window_frames])


class WhisperTranscriber:
    """Transcribes 16 kHz mono audio with a shared WhisperModel and the daemon's STT settings.

    Thread-safe: several sessions may call `transcribe_pcm` at once; CTranslate2 runs up to
    `stt.num_workers` of them in parallel and queues the rest.
    """

    def __init__(self, model: WhisperModel, settings: SttSettings) -> None:
        self.model = model
        self.settings = settings
        # Buckets up to stt.max_window_s; a max_window_s under 10 turns sized windows off.
        self._views = {
            w: _WindowedWhisper(model, w)
            for w in WINDOW_BUCKETS_S
            if w < STOCK_WINDOW_S and w <= settings.max_window_s
        }

    def window_for(self, duration_s: float) -> int:
        """The encoder window (seconds) used for an utterance of `duration_s`."""
        return next((w for w in sorted(self._views) if duration_s <= w), STOCK_WINDOW_S)

    def transcribe_pcm(self, pcm: np.ndarray, *, language: str | None = None,
                       window_s: int | None = None) -> Transcript:
        """Transcribe one utterance; blocks for about 0.3–1.5 s, so call it off the event loop.

        Args:
            pcm: 16 kHz mono float32 samples in [-1, 1].
            language: overrides `stt.language` ("" or None there means: detect, which costs an encoder pass).
            window_s: force an encoder window: an enabled bucket, else the stock 30 s path is used;
                default: the smallest bucket that holds `pcm`.
        """
        language = language or self.settings.language or None
        if pcm.size < _MIN_SAMPLES:
            return Transcript("", language or "", 0)
        window = window_s if window_s is not None else self.window_for(pcm.size / WHISPER_SAMPLE_RATE)
        model: WhisperModel | None = self._views.get(window)
        if model is None:
            model, window = self.model, STOCK_WINDOW_S
        segments, info = model.transcribe(
            pcm.astype(np.float32, copy=False),
            language=language,
            beam_size=self.settings.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
            hotwords=self.settings.hotwords or None,
            vad_filter=False,
        )
        text = " ".join(segment.text.strip() for segment in segments).strip()
        return Transcript(text, info.language, window)
