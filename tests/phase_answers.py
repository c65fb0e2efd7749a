"""A labelled German clip set of answers to the Knotencheck's four questions, and silence/noise clips.

Every answer is spoken by espeak-ng (tests/audio.py) in one of several voices and speeds and then mixed
with noise at 10–20 dB SNR. Voice, speed, noise colour, SNR and the noise's seed all follow from the
answer's position in `ANSWERS`, so the same list always gives the same samples; the mixed clips are cached
next to the plain ones (`cache_dir()/answers`).

The set is split once and for all: `TUNING` is what recognition context may be tuned on, `HELD_BACK` is
only ever measured (benchmarks/stt_context.py reports on it). Odd positions are held back, so both halves
cover every phase, voice, speed and noise level.

`NOISES` are 20 clips with no speech at all (digital silence, hiss, hum, rumble, clicks), for the
echo guard: prompted Whisper may "hear" its own prompt in them.
"""

from __future__ import annotations

import hashlib
import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.audio import cache_dir, cached_clip, read_wav

SAMPLE_RATE = 16000
VOICES = ("de", "de+f3", "de+m3", "de+f2", "de+m7")
RATES_WPM = (140, 150, 160, 170, 180, 190)
SNRS_DB = (10.0, 12.5, 15.0, 17.5, 20.0)
NOISE_COLOURS = ("white", "pink", "brown")


@dataclass(frozen=True)
class Answer:
    """One spoken answer: the phase whose question it answers, the text, and the domain words in it.

    `words` are the words (as written in `text`) that carry the answer: the place, the size, the duration
    (unit and number), the change. A transcript must contain each of them for the answer to count as heard.
    """

    phase: str
    text: str
    words: tuple[str, ...]


def _answers(phase: str, *rows: tuple[str, tuple[str, ...]]) -> list[Answer]:
    return [Answer(phase, text, words) for text, words in rows]


ANSWERS: tuple[Answer, ...] = tuple(
    _answers(
        "step_location",
        ("Er sitzt am Hals, neben dem Kehlkopf.", ("Hals", "Kehlkopf")),
        ("In der linken Achsel.", ("Achsel",)),
        ("Ich habe ihn in der rechten Brust ertastet.", ("Brust",)),
        ("In der Leiste, auf der rechten Seite.", ("Leiste",)),
        ("Am Hals, direkt unter dem Kiefer.", ("Hals", "Kiefer")),
        ("Er ist in der Achsel, ziemlich weit oben.", ("Achsel",)),
        ("Links in der Brust, oberhalb der Brustwarze.", ("Brust", "Brustwarze")),
        ("Unten in der Leiste.", ("Leiste",)),
        ("Seitlich am Hals.", ("Hals",)),
        ("Knapp über dem Schlüsselbein.", ("Schlüsselbein",)),
        ("Vorne am Hals, gleich neben dem Kehlkopf.", ("Hals", "Kehlkopf")),
        ("In der rechten Achsel, ganz tief drin.", ("Achsel",)),
        ("In der Brust, eher außen.", ("Brust",)),
        ("In der linken Leiste.", ("Leiste",)),
        ("Im Nacken, am Haaransatz.", ("Nacken",)),
        ("Hinten am Hals, im Nacken.", ("Hals", "Nacken")),
        ("Unter der Achsel, fast schon an der Brust.", ("Achsel", "Brust")),
        ("Ich glaube in der Leiste, nahe am Oberschenkel.", ("Leiste", "Oberschenkel")),
        ("Am Kehlkopf, etwas darunter.", ("Kehlkopf",)),
        ("Oben in der rechten Brust.", ("Brust",)),
    )
    + _answers(
        "step_size",
        ("Ungefähr so groß wie eine Kirsche.", ("Kirsche",)),
        ("Wie eine Erbse.", ("Erbse",)),
        ("Etwa so groß wie eine Walnuss.", ("Walnuss",)),
        ("Kleiner als eine Erbse, eher wie eine Linse.", ("Erbse", "Linse")),
        ("Ich würde sagen, wie eine kleine Kirsche.", ("Kirsche",)),
        ("So groß wie eine Walnuss, vielleicht etwas kleiner.", ("Walnuss",)),
        ("Ungefähr wie eine Haselnuss.", ("Haselnuss",)),
        ("Er ist etwa einen Zentimeter groß.", ("Zentimeter",)),
        ("Zwischen Erbse und Kirsche.", ("Erbse", "Kirsche")),
        ("Größer als eine Kirsche.", ("Kirsche",)),
        ("Eher klein, wie eine Erbse.", ("Erbse",)),
        ("Fast so groß wie eine Walnuss.", ("Walnuss",)),
        ("Wie eine Kirsche, würde ich sagen.", ("Kirsche",)),
        ("Etwa zwei Zentimeter.", ("zwei", "Zentimeter")),
        ("Ganz klein, wie eine Linse.", ("Linse",)),
        ("Wie eine große Erbse.", ("Erbse",)),
        ("Ungefähr wie eine Walnuss, er ist ziemlich groß.", ("Walnuss",)),
        ("So groß wie eine Haselnuss.", ("Haselnuss",)),
        ("Vielleicht wie eine Kirsche oder etwas kleiner.", ("Kirsche",)),
        ("Etwas größer als eine Erbse.", ("Erbse",)),
    )
    + _answers(
        "step_since",
        ("Seit ungefähr drei Wochen.", ("drei", "Wochen")),
        ("Seit ein paar Tagen.", ("Tagen",)),
        ("Seit zwei Monaten.", ("zwei", "Monaten")),
        ("Ich habe ihn vor einer Woche bemerkt.", ("Woche",)),
        ("Seit etwa vier Wochen.", ("vier", "Wochen")),
        ("Seit gestern.", ("gestern",)),
        ("Schon seit einigen Monaten.", ("Monaten",)),
        ("Vor drei Tagen habe ich ihn zum ersten Mal gespürt.", ("drei", "Tagen")),
        ("Seit einem halben Jahr.", ("Jahr",)),
        ("Seit zwei Wochen ungefähr.", ("zwei", "Wochen")),
        ("Erst seit heute Morgen.", ("heute",)),
        ("Seit fünf Tagen.", ("fünf", "Tagen")),
        ("Seit ungefähr sechs Monaten.", ("sechs", "Monaten")),
        ("Seit letzter Woche.", ("Woche",)),
        ("Seit einem Monat.", ("Monat",)),
        ("Das ist schon länger, bestimmt ein Jahr.", ("Jahr",)),
        ("Seit etwa zehn Tagen.", ("zehn", "Tagen")),
        ("Vor ungefähr drei Monaten.", ("drei", "Monaten")),
        ("Seit einer Woche.", ("Woche",)),
        ("Seit vielen Wochen schon.", ("Wochen",)),
    )
    + _answers(
        "step_changes",
        ("Ja, er ist gewachsen.", ("gewachsen",)),
        ("Nein, er ist gleich geblieben.", ("gleich", "geblieben")),
        ("Er schmerzt manchmal beim Drücken.", ("schmerzt",)),
        ("Die Haut darüber ist gerötet.", ("gerötet",)),
        ("Er ist etwas gewachsen und schmerzt.", ("gewachsen", "schmerzt")),
        ("Nein, keine Veränderung.", ("Veränderung",)),
        ("Er ist kleiner geworden.", ("kleiner",)),
        ("Die Haut ist gerötet und warm.", ("gerötet",)),
        ("Er schmerzt nicht, ist aber gewachsen.", ("schmerzt", "gewachsen")),
        ("Er ist härter geworden.", ("härter",)),
        ("Nein, er hat sich nicht verändert.", ("verändert",)),
        ("Er ist deutlich gewachsen.", ("gewachsen",)),
        ("Seit gestern schmerzt er.", ("schmerzt",)),
        ("Ein bisschen gerötet vielleicht.", ("gerötet",)),
        ("Er ist genauso groß wie am Anfang.", ("genauso",)),
        ("Er tut weh, wenn ich darauf drücke.", ("weh",)),
        ("Er ist gewachsen, aber die Haut ist normal.", ("gewachsen",)),
        ("Nichts hat sich verändert.", ("verändert",)),
        ("Er schmerzt und ist gerötet.", ("schmerzt", "gerötet")),
        ("Er ist weicher geworden.", ("weicher",)),
    )
)

TUNING: tuple[Answer, ...] = ANSWERS[0::2]
HELD_BACK: tuple[Answer, ...] = ANSWERS[1::2]


@dataclass(frozen=True)
class Rendering:
    """How an answer is spoken and spoiled: espeak-ng voice and speed, noise colour and level."""

    voice: str
    rate_wpm: int
    noise: str
    snr_db: float
    seed: int


def rendering(answer: Answer) -> Rendering:
    """The fixed rendering of `answer` (from its position, so neighbours differ in every respect)."""
    i = ANSWERS.index(answer)
    return Rendering(VOICES[i % len(VOICES)], RATES_WPM[(i * 7 + i // 6) % len(RATES_WPM)],
                     NOISE_COLOURS[(i // 2) % len(NOISE_COLOURS)], SNRS_DB[(i * 3 + i // 5) % len(SNRS_DB)],
                     seed=i)


def noise(colour: str, samples: int, seed: int) -> np.ndarray:
    """Unit-RMS noise of `colour` (white, pink, brown), the same for the same arguments."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(samples)
    if colour == "white":
        shaped = white
    elif colour in ("pink", "brown"):
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(samples, 1 / SAMPLE_RATE)
        freqs[0] = freqs[1] if samples > 1 else 1.0
        spectrum /= np.sqrt(freqs) if colour == "pink" else freqs  # 1/f power, or 1/f²
        shaped = np.fft.irfft(spectrum, n=samples)
    else:
        raise ValueError(f"unknown noise colour {colour!r}")
    return shaped / (np.sqrt(np.mean(shaped**2)) or 1.0)


def mix_at_snr(speech: np.ndarray, noise_samples: np.ndarray, snr_db: float) -> np.ndarray:
    """`speech` (int16) plus `noise_samples` scaled so speech power / noise power is `snr_db`, as int16.

    The speech power is measured where the speech is (samples above 1 % of full scale), not over the
    leading and trailing silence, so the SNR is the one a listener hears during the words.
    """
    speech = speech.astype(np.float64)
    voiced = speech[np.abs(speech) > 327] if np.any(np.abs(speech) > 327) else speech
    speech_rms = np.sqrt(np.mean(voiced**2))
    mixed = speech + noise_samples * speech_rms / (10 ** (snr_db / 20))
    return np.clip(np.round(mixed), -32768, 32767).astype(np.int16)


def answer_samples(answer: Answer, *, noisy: bool = True) -> np.ndarray:
    """The answer spoken and mixed with its noise (`noisy`, else without), as 16 kHz mono int16 (made on
    first use, then cached)."""
    r = rendering(answer)
    key = hashlib.sha256(f"v1|{r}|{answer.text}".encode()).hexdigest()[:16]
    path = cache_dir() / "answers" / f"{key}{'' if noisy else '-clean'}.wav"
    if not path.exists():
        speech, _ = read_wav(cached_clip(answer.text, voice=r.voice, rate=r.rate_wpm, sample_rate=SAMPLE_RATE))
        # 0.3 s of silence either side, as the VAD would cut it; the noise runs through it.
        speech = np.concatenate([np.zeros(SAMPLE_RATE * 3 // 10, np.int16), speech,
                                 np.zeros(SAMPLE_RATE * 3 // 10, np.int16)])
        if noisy:
            speech = mix_at_snr(speech, noise(r.noise, speech.size, r.seed), r.snr_db)
        _write_cached(path, speech)
    return read_wav(path)[0]


def answer_pcm(answer: Answer, *, noisy: bool = True) -> np.ndarray:
    """`answer_samples` as Whisper's input: float32 in [-1, 1]."""
    return answer_samples(answer, noisy=noisy).astype(np.float32) / 32768


@dataclass(frozen=True)
class NoiseClip:
    """A clip with no speech: what it is, how long, how loud (dBFS RMS; None = digital silence)."""

    name: str
    kind: str  # silence | white | pink | brown | hum | clicks
    seconds: float
    level_dbfs: float | None


NOISES: tuple[NoiseClip, ...] = (
    NoiseClip("silence-1s", "silence", 1.0, None),
    NoiseClip("silence-3s", "silence", 3.0, None),
    NoiseClip("silence-8s", "silence", 8.0, None),
    NoiseClip("dither-2s", "white", 2.0, -70.0),
    NoiseClip("white-quiet-2s", "white", 2.0, -50.0),
    NoiseClip("white-2s", "white", 2.0, -35.0),
    NoiseClip("white-loud-4s", "white", 4.0, -20.0),
    NoiseClip("pink-quiet-3s", "pink", 3.0, -50.0),
    NoiseClip("pink-2s", "pink", 2.0, -35.0),
    NoiseClip("pink-loud-5s", "pink", 5.0, -22.0),
    NoiseClip("brown-3s", "brown", 3.0, -40.0),
    NoiseClip("brown-loud-2s", "brown", 2.0, -25.0),
    NoiseClip("hum50-3s", "hum", 3.0, -40.0),
    NoiseClip("hum50-loud-2s", "hum", 2.0, -25.0),
    NoiseClip("hum60-4s", "hum", 4.0, -35.0),
    NoiseClip("clicks-2s", "clicks", 2.0, -40.0),
    NoiseClip("clicks-loud-3s", "clicks", 3.0, -25.0),
    NoiseClip("white-1s", "white", 1.0, -30.0),
    NoiseClip("pink-6s", "pink", 6.0, -30.0),
    NoiseClip("brown-quiet-1s", "brown", 1.5, -55.0),
)


def noise_pcm(clip: NoiseClip) -> np.ndarray:
    """The clip as Whisper's input (16 kHz mono float32); computed, the same every time."""
    n = int(clip.seconds * SAMPLE_RATE)
    seed = int(hashlib.sha256(clip.name.encode()).hexdigest()[:8], 16)
    if clip.kind == "silence" or clip.level_dbfs is None:
        return np.zeros(n, np.float32)
    if clip.kind in NOISE_COLOURS:
        shaped = noise(clip.kind, n, seed)
    elif clip.kind == "hum":
        base = 60.0 if clip.name.startswith("hum60") else 50.0
        t = np.arange(n) / SAMPLE_RATE
        shaped = sum(np.sin(2 * np.pi * base * k * t) / k for k in (1, 2, 3, 5))
        shaped = shaped + 0.05 * noise("white", n, seed)
    elif clip.kind == "clicks":
        shaped = np.zeros(n)
        rng = np.random.default_rng(seed)
        for at in rng.integers(0, max(1, n - 80), size=max(1, int(clip.seconds * 4))):
            shaped[at:at + 80] += rng.standard_normal(80) * np.hanning(80)
        shaped = shaped + 0.02 * noise("white", n, seed + 1)
    else:
        raise ValueError(f"unknown noise kind {clip.kind!r}")
    shaped = shaped / (np.sqrt(np.mean(shaped**2)) or 1.0)
    scaled = shaped * 10 ** (clip.level_dbfs / 20)
    return np.clip(scaled, -1.0, 1.0).astype(np.float32)


def _write_cached(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.wav")
    with wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(samples.tobytes())
    tmp.replace(path)


if __name__ == "__main__":  # make every clip and print the set's shape
    for a in ANSWERS:
        s = answer_samples(a)
        r = rendering(a)
        half = "held-back" if a in HELD_BACK else "tuning"
        print(f"{half:<9} {a.phase:<13} {r.voice:<6} {r.rate_wpm} {r.noise:<5} {r.snr_db:4.1f} dB "
              f"{s.size / SAMPLE_RATE:4.1f} s  {a.text}")
    print(f"{len(ANSWERS)} answers ({len(TUNING)} tuning, {len(HELD_BACK)} held back), {len(NOISES)} noise clips")
