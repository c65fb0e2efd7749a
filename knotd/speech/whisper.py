"""Whisper transcription with an encoder window sized to the utterance (no livekit: importable in a thread).

faster-whisper pads every utterance to a 30 s window, and the encoder pass over 30 s is most of the
latency of a short turn on CPU (≈0.8 s of ≈1.3 s for a 3 s clip on 2 cores). CTranslate2's encoder
accepts shorter windows, so `WhisperTranscriber` feeds it the smallest window of `WINDOW_BUCKETS_S` that
holds the utterance (buckets keep the shapes few and repeating) and falls back to faster-whisper's stock
30 s path beyond the largest bucket allowed by `stt.max_window_s`. Windows under 10 s are never used:
5 s windows gave empty or repeated text.

Decoding is greedy or beam as configured, at temperature 0 only: the stock fallback ladder (0.2 … 1.0)
re-decodes misheard clips up to five times (6 s instead of 1.2 s) without better text.

A caller may pass a `prompt`: text Whisper reads as if it had been said just before the utterance (the
question the agent asked and the words expected in the answer). It steers the decoder towards those words
(base hears "Kiel kopf" without it and "Kehlkopf" with it) at the cost of a few prompt tokens in the
decoder. Prompted Whisper has a known failure: on silence or noise it may "hear" the prompt itself. So a
prompted transcript is dropped when its text is the prompt or a piece of it (`is_prompt_echo`), when
Whisper's no-speech probability is above `stt.no_speech_threshold` (on silence and noise prompted base says
"Sie ihn zum Beispiel mit einer Kirsche" at 0.8–0.9), or when it is a loop (gzip compression ratio above
2.4, Whisper's own hallucination test; "Ich bin der Knotencheck. Ich bin der Knotencheck. …" on 8 s of
silence at a no-speech probability of 0.34); `Transcript.dropped` says why. A caller may also pass a
`correct` function, applied to the text the guard kept (the phase's near-miss correction, "Kielkopf" →
"Kehlkopf"; `knotd.conversation.recognition`); `Transcript.heard` keeps what Whisper decoded.

This module does not load the model (see `knotd.speech.models`), does not detect speech (VAD does) and does
not import livekit, so the daemon can load and self-test Whisper while livekit is still being imported.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.feature_extractor import FeatureExtractor

from knotd.config import SttSettings

WHISPER_SAMPLE_RATE = 16000
STOCK_WINDOW_S = 30
WINDOW_BUCKETS_S = (10, 15, 20, 30)
ECHO_MIN_WORDS = 4
ECHO_LONG_WORDS = 8
ECHO_COVERAGE = 0.9
# Whisper's own test for a decoder caught in a loop ("die Knoten, die Knoten, …"): text that gzip shrinks
# more than this is repetition, not an answer.
_MAX_COMPRESSION_RATIO = 2.4
# Shorter than this is no speech worth decoding (and an empty array would fail in the feature extractor).
_MIN_SAMPLES = WHISPER_SAMPLE_RATE // 20


def _max_tokens(duration_s: float) -> int:
    """A bound on the tokens one utterance can need (fast speech is ≈ 4 words, ≈ 8 tokens a second).

    A decoder caught in a loop ("ich bin einig, ich bin einig, …") otherwise runs to Whisper's 224 tokens,
    seconds of CPU for text nobody wants.
    """
    return min(200, 16 + int(10 * duration_s))


class Context(NamedTuple):
    """What a session tells Whisper about the next utterance: the prompt (see the module docstring) and how
    to correct the decoded text (`knotd.conversation.recognition.Recognition.correct`: near-misses of the
    phase's words rewritten to them), both taken when the transcription starts."""

    prompt: str | None = None
    correct: Callable[[str], str] | None = None


class Transcript(NamedTuple):
    """What one utterance became: its text, the language it was decoded as, the encoder window used.

    With a prompt, also the prompt, Whisper's lowest no-speech probability over the segments, and why the
    decoded text was dropped ("echo" or "no_speech"; `text` is then empty, `heard` keeps it), else None.
    With a correction, `text` is the corrected text and `heard` what Whisper decoded.
    """

    text: str
    language: str
    window_s: int
    prompt: str | None = None
    no_speech_prob: float = 0.0
    dropped: str | None = None
    heard: str = ""  # the decoded text, also when dropped (for logs at debug level and the benchmark)


def _words(text: str) -> list[str]:
    """Lowercase words without punctuation or accents ("Größe?" -> ["grosse"])."""
    text = unicodedata.normalize("NFKD", text.lower().replace("ß", "ss"))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return re.findall(r"\w+", text)


def is_prompt_echo(text: str, prompt: str) -> bool:
    """Whether `text` is an echo of `prompt`: at least `ECHO_MIN_WORDS` words that are a run of the prompt's
    words, or a longer text (`ECHO_LONG_WORDS`) nearly all of whose words (`ECHO_COVERAGE`) appear in the
    prompt in the same order (prompted Whisper on white noise: "Sie ihn zum Beispiel mit einer Kirsche oder
    einer Walnuss." for "… Vergleichen Sie ihn zum Beispiel mit einer Erbse, einer Kirsche oder einer
    Walnuss.").

    Compared word by word, ignoring case, punctuation and accents. Answers reuse the question's words ("In der
    Leiste." to "… oder in der Leiste?", "Die Haut darüber ist gerötet." to "… hat sich die Haut darüber
    verändert? … gerötet"): short runs and loose matches are kept, and dropped only when Whisper also judges
    them no speech.
    """
    said, prompted = _words(text), _words(prompt)
    n = len(said)
    if n < ECHO_MIN_WORDS:
        return bool(said) and said == prompted
    if any(prompted[i:i + n] == said for i in range(len(prompted) - n + 1)):
        return True
    blocks = difflib.SequenceMatcher(None, said, prompted, autojunk=False).get_matching_blocks()
    return n >= ECHO_LONG_WORDS and sum(block.size for block in blocks) >= ECHO_COVERAGE * n


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
                       window_s: int | None = None, prompt: str | None = None,
                       correct: Callable[[str], str] | None = None) -> Transcript:
        """Transcribe one utterance; blocks for about 0.3–1.5 s, so call it off the event loop.

        Args:
            pcm: 16 kHz mono float32 samples in [-1, 1].
            language: overrides `stt.language` ("" or None there means: detect, which costs an encoder pass).
            window_s: force an encoder window: an enabled bucket, else the stock 30 s path is used;
                default: the smallest bucket that holds `pcm`.
            prompt: the conversation so far as Whisper should read it (see the module docstring); a
                per-call argument, so sessions sharing the model never see each other's.
            correct: applied to the text the echo guard kept (the phase's near-miss correction).
        """
        language = language or self.settings.language or None
        prompt = (prompt or "").strip() or None
        if pcm.size < _MIN_SAMPLES:
            return Transcript("", language or "", 0, prompt)
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
            initial_prompt=prompt,
            max_new_tokens=_max_tokens(pcm.size / WHISPER_SAMPLE_RATE),
            vad_filter=False,
        )
        segments = list(segments)
        text = " ".join(segment.text.strip() for segment in segments).strip()
        # Nothing was said only if no segment heard speech: one quiet segment of a long utterance (a caller cut
        # at stt.max_utterance_s) must not drop the words of all the others.
        no_speech = min((segment.no_speech_prob for segment in segments), default=0.0)
        dropped = None
        if prompt is not None and text:
            if not _words(text):  # "…": punctuation only
                dropped = "no_speech"
            elif is_prompt_echo(text, prompt):
                dropped = "echo"
            elif no_speech > self.settings.no_speech_threshold:
                dropped = "no_speech"
            elif max(segment.compression_ratio for segment in segments) > _MAX_COMPRESSION_RATIO:
                dropped = "repetition"
        kept = "" if dropped else text
        if kept and correct is not None:
            kept = correct(kept)
        return Transcript(kept, info.language, window, prompt, no_speech, dropped, text)
