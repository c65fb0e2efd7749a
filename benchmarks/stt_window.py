"""Whisper's stock 30 s encoder window against knotd's window sized to the utterance, on German speech.

Run from the repository root (needs the [models] extra, espeak-ng and sox):

    python benchmarks/stt_window.py [--runs 5] [--beam 1] [--workers 1] [--threads 0] [--concurrent 1,2,4]

For each clip (tests/audio.py: CLIPS, 1-10 s, plus LONG_CLIPS, 13 s) it transcribes the same 16 kHz
audio both ways, interleaved, after one warm-up of each, and prints median [min-max] seconds and the word
error rate against the text espeak-ng spoke. With --concurrent it instead starts K threads at once on the
one shared model (as K sessions would), each transcribing the same 3 s clip, and prints the wall time
until all K are done. Timings are wall clock inside the process; the machine is in
the header line. This is a measurement, not a test: nothing here fails on a slow machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests.audio` when run as a script

import numpy as np

from benchmarks._machine import describe as describe_machine
from knotd.agent.stt import STOCK_WINDOW_S, WhisperTranscriber
from knotd.config import SttSettings
from tests.audio import CLIPS, LONG_CLIPS, load_clip, whisper_base_dir, word_error_rate


def machine() -> str:
    return describe_machine()


def timed(transcriber: WhisperTranscriber, pcm: np.ndarray, window_s: int | None) -> tuple[float, str, int]:
    start = time.perf_counter()
    result = transcriber.transcribe_pcm(pcm, window_s=window_s)
    return time.perf_counter() - start, result.text, result.window_s


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per clip and window (default 5)")
    parser.add_argument("--beam", type=int, default=1, help="beam size (default 1, knotd's default)")
    parser.add_argument("--workers", type=int, default=1, help="CTranslate2 num_workers (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="CTranslate2 cpu_threads (default 0: all)")
    parser.add_argument("--concurrent", default="", help="e.g. 1,2,4: time K simultaneous transcriptions")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from faster_whisper import WhisperModel

    model_dir = whisper_base_dir()
    settings = SttSettings(model=str(model_dir), beam_size=args.beam, num_workers=args.workers,
                           cpu_threads=args.threads)
    model = WhisperModel(str(model_dir), device="cpu", compute_type=settings.compute_type,
                         num_workers=args.workers, cpu_threads=args.threads, local_files_only=True)
    transcriber = WhisperTranscriber(model, settings)

    print(f"# stt_window: Whisper base {settings.compute_type}, beam {args.beam}, temperature 0, language "
          f"{settings.language}, hotwords {settings.hotwords!r}, num_workers {args.workers}, cpu_threads "
          f"{args.threads}; median [min-max] of {args.runs} runs")
    print(f"# machine: {machine()}")
    if args.concurrent:
        compare_concurrency(transcriber, [int(k) for k in args.concurrent.split(",")], args.runs)
        return
    header = f"{'clip':<9} {'audio s':>7} {'win':>3}  {'30 s window':>18} {'sized window':>18} {'speed-up':>8} " \
             f"{'WER 30':>6} {'WER sized':>9}"
    print(header)
    print("-" * len(header))
    rows, texts = [], []
    for clip in CLIPS + LONG_CLIPS:
        pcm = load_clip(clip).astype(np.float32) / 32768
        timed(transcriber, pcm, STOCK_WINDOW_S)  # warm both shapes
        timed(transcriber, pcm, None)
        stock_t, sized_t = [], []
        for _ in range(args.runs):
            t, stock_text, _ = timed(transcriber, pcm, STOCK_WINDOW_S)
            stock_t.append(t)
            t, sized_text, window = timed(transcriber, pcm, None)
            sized_t.append(t)
        wer_stock, wer_sized = word_error_rate(clip.text, stock_text), word_error_rate(clip.text, sized_text)
        rows.append((clip.name, statistics.median(stock_t), statistics.median(sized_t), wer_stock, wer_sized))
        texts.append((clip, stock_text, sized_text))
        print(f"{clip.name:<9} {pcm.size / 16000:7.2f} {window:>3}  {spread(stock_t):>18} {spread(sized_t):>18} "
              f"{statistics.median(stock_t) / statistics.median(sized_t):7.1f}x {wer_stock:6.2f} {wer_sized:9.2f}",
              flush=True)
    print("-" * len(header))
    print(f"{'mean':<9} {'':>7} {'':>3}  {statistics.mean(r[1] for r in rows):>18.2f} "
          f"{statistics.mean(r[2] for r in rows):>18.2f} {'':>8} {statistics.mean(r[3] for r in rows):6.2f} "
          f"{statistics.mean(r[4] for r in rows):9.2f}")
    print("\n# transcripts (reference / 30 s / sized)")
    for clip, stock_text, sized_text in texts:
        print(f"{clip.name}:\n  ref   {clip.text}\n  30 s  {stock_text}\n  sized {sized_text}")


def _call_after(barrier: threading.Barrier, transcriber: WhisperTranscriber, pcm: np.ndarray,
                window: int | None) -> float:
    barrier.wait()
    return timed(transcriber, pcm, window)[0]


def compare_concurrency(transcriber: WhisperTranscriber, counts: list[int], runs: int) -> None:
    pcm = load_clip(next(c for c in CLIPS if c.name == "start")).astype(np.float32) / 32768
    print(f"{'sessions':>8} {'window':>6} {'all done (s)':>18} {'per call (s)':>18}")
    for window in (None, STOCK_WINDOW_S):
        for k in counts:
            walls, calls = [], []
            with ThreadPoolExecutor(max_workers=k) as pool:
                for run in range(runs + 1):
                    barrier = threading.Barrier(k)
                    start = time.perf_counter()
                    futures = [pool.submit(_call_after, barrier, transcriber, pcm, window) for _ in range(k)]
                    durations = [f.result() for f in futures]
                    if run:  # the first round warms the threads
                        walls.append(time.perf_counter() - start)
                        calls.extend(durations)
            label = "sized" if window is None else f"{window} s"
            print(f"{k:>8} {label:>6} {spread(walls):>18} {spread(calls):>18}", flush=True)


if __name__ == "__main__":
    main()
