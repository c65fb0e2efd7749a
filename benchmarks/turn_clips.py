"""The end-of-turn clip sets: German turns with pauses inside them, and clearly finished turns.

Made reproducibly with espeak-ng and sox (tests/audio.py's `cached_clip`: no dither, same bytes every run):

- PAUSED: a turn spoken in two parts with silence between them: a sentence broken off mid-way
  ("Der Knoten ist … ungefähr so groß wie eine Erbse"), counting, hesitations ("äh …"). Each is made with
  each of PAUSES_S. Ending the turn inside the pause is a false cut-off.
- FINISHED: complete answers a caller would give; the agent should answer soon after the last word.

Every other item (odd index) is held back: benchmarks/turns.py tunes nothing on it and reports on it with
`--held-back`. The split is by sentence, so no held-back sentence is ever heard while tuning.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.audio import cache_dir, cached_clip, read_wav  # noqa: E402

PAUSES_S = (0.3, 0.6, 0.9)
SAMPLE_RATE = 16000

# (before the pause, after it)
PAUSED: tuple[tuple[str, str], ...] = (
    ("Der Knoten ist", "ungefähr so groß wie eine Erbse."),
    ("Ich habe ihn vor", "zwei Wochen zum ersten Mal bemerkt."),
    ("Eins, zwei, drei,", "vier, fünf."),
    ("Ich glaube, äh", "er sitzt an der linken Seite."),
    ("Er tut", "eigentlich nicht weh."),
    ("Äh", "ja, ich bin einverstanden."),
    ("Meine Mutter hatte", "auch einmal so einen Knoten."),
    ("Ich möchte, äh", "den Knotencheck starten."),
    ("Er ist weich und", "lässt sich leicht verschieben."),
    ("Zuerst habe ich", "gedacht, das ist nichts."),
    ("Seit ungefähr", "drei Tagen ist er größer."),
    ("Also, äh", "wann soll ich zur Ärztin gehen?"),
)

FINISHED: tuple[str, ...] = (
    "Ja, gerne.",
    "Der Knoten ist ungefähr so groß wie eine Erbse.",
    "Nein, er tut nicht weh.",
    "Ich habe ihn vor zwei Wochen bemerkt.",
    "Er sitzt an der linken Seite, unter dem Arm.",
    "Ja, ich bin einverstanden.",
    "Bitte wiederholen Sie die Frage.",
    "Meine Mutter hatte auch einmal einen Knoten.",
    "Er ist weich und lässt sich verschieben.",
    "Das weiß ich nicht genau.",
    "Seit drei Tagen ist er größer geworden.",
    "Wann soll ich zur Ärztin gehen?",
)


@dataclass(frozen=True)
class TurnClip:
    name: str
    path: Path
    text: str
    pause_s: float | None  # None: a finished turn
    held_back: bool


def _silence(seconds: float) -> Path:
    path = cache_dir() / "clips" / f"silence-{int(round(seconds * 1000))}ms-{SAMPLE_RATE}.wav"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.wav")
        subprocess.run(["sox", "-D", "-n", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer",
                        str(tmp), "trim", "0", f"{seconds}"], check=True, capture_output=True)
        tmp.replace(path)
    return path


def _paused(before: str, after: str, pause_s: float) -> Path:
    """The two parts with `pause_s` of silence between the last sound of one and the first of the next."""
    key = hashlib.sha256(f"{before}|{after}".encode()).hexdigest()[:12]
    path = cache_dir() / "clips" / f"paused-{key}-{int(round(pause_s * 1000))}ms.wav"
    if not path.exists():
        a = _trimmed(cached_clip(before, sample_rate=SAMPLE_RATE))
        b = _trimmed(cached_clip(after, sample_rate=SAMPLE_RATE), end=False)
        tmp = path.with_suffix(".tmp.wav")
        subprocess.run(["sox", "-D", str(a), str(_silence(pause_s)), str(b), str(tmp)], check=True, capture_output=True)
        tmp.replace(path)
    return path


def _trimmed(path: Path, *, end: bool = True) -> Path:
    """`path` without espeak-ng's trailing (or leading) silence, so the pause is exactly the one asked for."""
    out = path.with_suffix(".trim-end.wav" if end else ".trim-start.wav")
    if not out.exists():
        effects = ["reverse", "silence", "1", "0.01", "0.5%", "reverse"] if end else ["silence", "1", "0.01", "0.5%"]
        subprocess.run(["sox", "-D", str(path), str(out), *effects], check=True, capture_output=True)
    return out


def paused_clips() -> list[TurnClip]:
    clips = []
    for i, (before, after) in enumerate(PAUSED):
        for pause in PAUSES_S:
            clips.append(TurnClip(f"paused{i:02d}-{pause:.1f}", _paused(before, after, pause),
                                  f"{before} {after}", pause, held_back=i % 2 == 1))
    return clips


def finished_clips() -> list[TurnClip]:
    return [TurnClip(f"finished{i:02d}", _trimmed(cached_clip(text, sample_rate=SAMPLE_RATE)), text, None,
                     held_back=i % 2 == 1)
            for i, text in enumerate(FINISHED)]


def samples(clip: TurnClip):  # -> np.ndarray (int16)
    data, rate = read_wav(clip.path)
    assert rate == SAMPLE_RATE, (clip.path, rate)
    return data
