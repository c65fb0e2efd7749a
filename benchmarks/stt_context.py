"""Phase-aware recognition: Whisper with and without the phase's context, on labelled German answers.

Run from the repository root (needs the [models] extra, espeak-ng and sox; about 5 minutes for one half):

    python benchmarks/stt_context.py [--set held-back|tuning|all] [--runs 2] [--no-noise] [--show]

The clips are tests/phase_answers.py: answers to the four check questions (location, size, since when,
changes), espeak-ng in five voices at 140–190 wpm with noise at 10–20 dB SNR, split once into a tuning
half and a held-back half (the default here; report on it, tune on the other). Each clip is transcribed
by the product's `WhisperTranscriber` two ways, interleaved, `--runs` times each:

- without context: what knotd did before (hotwords only);
- with context: what the session does now: the prompt it builds (`Recognition.prompt`: the phase's
  question as the agent said it, then the phase's words from phases.toml), the echo guard, and the phase's
  near-miss correction of the decoded text (`Recognition.correct`);
- prompt only: the same decode before the correction (`Transcript.heard`), to show what each step adds.

Printed side by side: word error rate (over all words; digits read as German number words), domain-word
accuracy (the labelled place/size/duration/change words found in the transcript, exact word), answers
understood (`Recognition.normalise` found a term), per phase; then the latency the context adds per
utterance (p50/p95 over clips of the median paired difference, and of the difference between each side's
fastest run, which other load on the machine disturbs least; and of the correction alone), and the 20
silence/noise clips
transcribed with every phase's context: how many gave text, how many of those echo the prompt, how many
the guard dropped. The machine is shared: timings move with its load (printed). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.*` when run as a script

import numpy as np

from benchmarks._machine import describe as describe_machine
from knotd.config import SttSettings
from knotd.conversation.phases import PhaseScript
from knotd.speech.whisper import Transcript, WhisperTranscriber, is_prompt_echo
from tests.audio import edit_distance, normalize_words, whisper_base_dir
from tests.phase_answers import ANSWERS, HELD_BACK, NOISES, TUNING, Answer, answer_pcm, noise_pcm, rendering

SETS = {"held-back": HELD_BACK, "tuning": TUNING, "all": ANSWERS}
TARGETS = {"domain": "≥ 95 %", "wer": "≤ 0.15", "added_p95": "≤ 20 ms", "echo": "0 of 20"}
DIGITS = {str(i): w for i, w in enumerate(
    "null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf".split())}


def words(text: str) -> list[str]:
    """Lowercase words, digits as German number words (Whisper writes "3 Wochen" for "drei Wochen")."""
    return [DIGITS.get(w, w) for w in normalize_words(text)]


class Side:
    """What one way of transcribing got over the clips."""

    def __init__(self) -> None:
        self.errors = self.ref_words = self.found = self.labelled = self.understood = 0
        self.by_phase: dict[str, list[int]] = {}  # phase: [found, labelled]
        self.dropped: list[str] = []
        self.times: dict[Answer, list[float]] = {}

    def add(self, answer: Answer, result: Transcript, understood: bool) -> None:
        ref, hyp = words(answer.text), words(result.text)
        self.errors += edit_distance(ref, hyp)
        self.ref_words += len(ref)
        hit = sum(w in hyp for w in words(" ".join(answer.words)))
        self.found += hit
        self.labelled += len(answer.words)
        phase = self.by_phase.setdefault(answer.phase, [0, 0])
        phase[0] += hit
        phase[1] += len(answer.words)
        self.understood += understood
        if result.dropped:
            self.dropped.append(f"{answer.text} -> {result.dropped}: {result.heard}")

    @property
    def wer(self) -> float:
        return self.errors / max(1, self.ref_words)

    @property
    def domain(self) -> float:
        return self.found / max(1, self.labelled)


def timed(transcriber: WhisperTranscriber, pcm: np.ndarray, prompt: str | None,
          correct: Callable[[str], str] | None = None) -> tuple[float, Transcript]:
    start = time.perf_counter()
    result = transcriber.transcribe_pcm(pcm, prompt=prompt, correct=correct)
    return time.perf_counter() - start, result


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=sorted(SETS), default="held-back", help="which clips (default held-back)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per clip and side (default 2)")
    parser.add_argument("--show", action="store_true", help="print every transcript")
    parser.add_argument("--no-noise", action="store_true",
                        help="the same voices and speeds without the added noise (to see what the noise costs)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from faster_whisper import WhisperModel

    model_dir = whisper_base_dir()
    settings = SttSettings(model=str(model_dir))
    model = WhisperModel(str(model_dir), device="cpu", compute_type=settings.compute_type, num_workers=1,
                         local_files_only=True)
    transcriber = WhisperTranscriber(model, settings)
    script = PhaseScript.load()
    answers = SETS[args.set]
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())

    print(f"# stt_context: Whisper base {settings.compute_type}, beam {settings.beam_size}, hotwords "
          f"{settings.hotwords!r}, no_speech_threshold {settings.no_speech_threshold}; {len(answers)} answers "
          f"({args.set}{', without noise' if args.no_noise else ''}), {args.runs} timed runs per side")
    print(f"# machine: {describe_machine()}; load average before {load_before}")

    base, ctx, uncorrected = Side(), Side(), Side()
    correction_s: list[float] = []
    rows = []
    noisy = not args.no_noise
    warm = answer_pcm(answers[0], noisy=noisy)
    timed(transcriber, warm, None)
    for i, answer in enumerate(answers):
        phase = script.phase(answer.phase)
        assert phase.recognition is not None, f"{answer.phase} has no recognition context"
        prompt = phase.recognition.prompt(phase.say)
        correct = phase.recognition.correct
        pcm = answer_pcm(answer, noisy=noisy)
        if i == 0:
            timed(transcriber, pcm, prompt, correct)
        results: dict[str, Transcript] = {}
        for run in range(args.runs):
            order = (("base", None), ("ctx", prompt)) if run % 2 == 0 else (("ctx", prompt), ("base", None))
            for side, side_prompt in order:
                t, result = timed(transcriber, pcm, side_prompt, correct if side == "ctx" else None)
                (base if side == "base" else ctx).times.setdefault(answer, []).append(t)
                results.setdefault(side, result)
        base.add(answer, results["base"], phase.recognition.understood(results["base"].text))
        ctx.add(answer, results["ctx"], phase.recognition.understood(results["ctx"].text))
        prompted = results["ctx"]._replace(text="" if results["ctx"].dropped else results["ctx"].heard)
        uncorrected.add(answer, prompted, phase.recognition.understood(prompted.text))
        start = time.perf_counter()
        correct(prompted.text)
        correction_s.append(time.perf_counter() - start)
        rows.append((answer, results["base"].text, prompted.text, results["ctx"].text))
        print(f"  {i + 1}/{len(answers)}", end="\r", file=sys.stderr, flush=True)

    added = [statistics.median(c - b for b, c in zip(base.times[a], ctx.times[a], strict=True)) for a in answers]
    # The fastest of the runs is the least disturbed by other load on the machine.
    added_min = [min(ctx.times[a]) - min(base.times[a]) for a in answers]
    base_t = [statistics.median(base.times[a]) for a in answers]
    ctx_t = [statistics.median(ctx.times[a]) for a in answers]

    # Silence and noise, with every phase's context (and without, for comparison).
    noise_rows = []
    echoes = texts = caught = base_texts = 0
    phases = sorted({a.phase for a in ANSWERS})
    for clip in NOISES:
        pcm = noise_pcm(clip)
        base_texts += bool(transcriber.transcribe_pcm(pcm).text)
        for name in phases:
            phase = script.phase(name)
            assert phase.recognition is not None
            prompt = phase.recognition.prompt(phase.say)
            result = transcriber.transcribe_pcm(pcm, prompt=prompt, correct=phase.recognition.correct)
            texts += bool(result.text)
            echoes += bool(result.text) and _overlaps(result.text, prompt)
            caught += result.dropped is not None
            if result.text or result.dropped:
                noise_rows.append((clip.name, name, result))

    load_after = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print()
    sides = (base, uncorrected, ctx)

    def row(label: str, cells: list[str], target: str = "") -> None:
        print(f"{label:<34} {cells[0]:>16} {cells[1]:>14} {cells[2]:>14}   {target}".rstrip())

    header = f"{'':<34} {'without context':>16} {'prompt only':>14} {'with context':>14}   target"
    print(header)
    print("-" * len(header))
    row("domain-word accuracy", [f"{s.domain:.1%}" for s in sides], TARGETS["domain"])
    row("  (words found / labelled)", [f"{s.found}/{s.labelled}" for s in sides])
    for name in phases:
        row("  " + name, [f"{p[0]}/{p[1]}" for p in (s.by_phase.get(name, [0, 0]) for s in sides)])
    row("word error rate", [f"{s.wer:.3f}" for s in sides], TARGETS["wer"])
    row("answers understood (normalised)", [f"{s.understood}/{len(answers)}" for s in sides])
    row("answers dropped by the echo guard", ["–", str(len(ctx.dropped)), str(len(ctx.dropped))], "0")
    row("time per utterance p50 / p95 (s)", [f"{pct(base_t, 50):.3f} / {pct(base_t, 95):.3f}", "",
                                             f"{pct(ctx_t, 50):.3f} / {pct(ctx_t, 95):.3f}"])
    row("latency added p50 / p95 (ms)", ["", "", f"{pct(added, 50) * 1000:.0f} / {pct(added, 95) * 1000:.0f}"],
        TARGETS["added_p95"])
    row("  fastest run vs fastest run (ms)", ["", "", f"{pct(added_min, 50) * 1000:.0f} / "
                                              f"{pct(added_min, 95) * 1000:.0f}"])
    row("  of it the correction (ms)", ["", "", f"{pct(correction_s, 50) * 1000:.1f} / "
                                        f"{pct(correction_s, 95) * 1000:.1f}"])
    n_noise = len(NOISES)
    row("no-speech clips giving text", [f"{base_texts}/{n_noise}", "", f"{texts}/{n_noise * len(phases)}"],
        f"(with context: every clip × {len(phases)} phases)")
    row("  of which echo the prompt", ["", "", str(echoes)], TARGETS["echo"])
    row("  dropped by the echo guard", ["", "", str(caught)])
    print(f"# load average after {load_after}")
    for line in ctx.dropped:
        print(f"  dropped answer: {line}")
    for clip_name, phase_name, result in noise_rows:
        state = f"dropped ({result.dropped})" if result.dropped else "KEPT"
        print(f"  noise {clip_name:<16} {phase_name:<13} {state:<18} {result.heard!r} "
              f"no_speech {result.no_speech_prob:.2f}")
    if args.show:
        print("\n# transcripts (reference / without context / prompt only / with context)")
        for answer, without, prompt_only, with_ctx in rows:
            r = rendering(answer)
            print(f"{answer.phase} [{r.voice} {r.rate_wpm} wpm, {r.noise} {r.snr_db} dB]\n  ref  {answer.text}\n"
                  f"  none {without}\n  ctx  {prompt_only}\n  corr {with_ctx}")


def _overlaps(text: str, prompt: str) -> bool:
    """Whether `text` contains a run of three or more prompt words, or is one prompt word alone."""
    said = words(text)
    if len(said) <= 2:
        return is_prompt_echo(text, prompt)
    return any(is_prompt_echo(" ".join(said[i:i + 3]), prompt) for i in range(len(said) - 2))


if __name__ == "__main__":
    main()
