"""Voice-to-voice side by side: knotd as built against the stock shape the original system had.

    python benchmarks/voice.py [--quick]

Run from the repository root (needs the [models] extra, espeak-ng and sox; about 8 minutes, --quick about 3).
Everything runs against the LiveKit protocol stand-in (tests/livekit_standin.py) in this process:

- start → READY: knotd = `knotd run` as a subprocess, exec → READY=1 on a real NOTIFY_SOCKET; stock = a
  livekit-agents worker in the original shape (benchmarks/workers/voice_worker.py --shape stock: PROCESS executor,
  Whisper loaded per job process in setup_fnc), exec → `worker_registered`, which comes after its idle
  processes are ready.
- job accepted → session built: the stand-in dispatches a job; from the worker's AvailabilityResponse to a
  built KnotencheckSession. knotd: the real `knotd run`, read from /api/status (the session_start stage
  begins once the session is built; its room connection then fails, nothing answers it); stock: written by
  the job process.
- per-turn eou, stt, llm_ttft, tts_ttfb, e2e: real conversations (Silero → Whisper → guards → scripted LLM →
  espeak-ng) on local audio IO inside real jobs of each shape's worker (a job thread for knotd, a job
  process for stock), with the German espeak-ng clips of tests/audio.py (1–10 s), 1 session and then 4 at
  once. e2e is livekit's: end of user speech → first agent audio frame.
- memory: Σ PSS (/proc/<pid>/smaps_rollup) of the worker and all its descendants (stock: main, forkserver,
  resource tracker, job processes), idle and at the peak while 1 and 4 sessions run.

Prints tables with the targets of issue 6 next to the numbers; asserts nothing. The machine is shared:
the load average before and after is printed with the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._machine import cpu_model
from tests.audio import CLIPS, cached_clip, read_wav, whisper_base_dir, word_error_rate
from tests.conftest import API_KEY, API_SECRET, NotifySocket, free_port, write_config
from tests.livekit_standin import LiveKitStandIn

COMPONENTS = ("eou", "stt", "llm_ttft", "tts_ttfb", "e2e")
SHAPES = ("knotd", "stock")
CONCURRENT = 4
# A room URL where nothing listens: the knotd job's room connection fails at once, after the session is built.
DEAD_ROOM_URL = "ws://127.0.0.1:9"
JOB_TIMEOUT_S = 420.0
TARGETS = {
    "ready": "≤ 3 s",
    "e2e_p50": "≤ 0.8 s",
    "e2e_p95": "≤ 1.2 s",
    "e2e_p95_concurrent": "≤ 2 s",
    "extra_per_session": "≤ 60 MB",
}


# -- the machine and its processes ------------------------------------------------------------------------
def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree.extend(frontier)
    return tree


def tree_pss_mb(root: int) -> tuple[float, int]:
    """Σ PSS in MB over `root` and its descendants, and how many processes that was."""
    total_kb, count = 0, 0
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    count += 1
                    break
    return total_kb / 1024, count


class PssSampler:
    """Samples `tree_pss_mb(root)` every half second in the background; keeps the peak."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_mb, self.peak_procs = 0.0, 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            mb, procs = await asyncio.to_thread(tree_pss_mb, self.root)
            if mb > self.peak_mb:
                self.peak_mb, self.peak_procs = mb, procs
            await asyncio.sleep(0.5)

    def __enter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


# -- statistics --------------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.2f} s [{min(values):.2f}–{max(values):.2f}], n={len(values)}"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def fmt_s(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


# -- results ---------------------------------------------------------------------------------------------
@dataclass
class ShapeResults:
    ready_s: list[float] = field(default_factory=list)
    ready_breakdown: list[dict[str, float]] = field(default_factory=list)
    dispatch_s: list[float] = field(default_factory=list)
    idle_pss: list[tuple[float, int]] = field(default_factory=list)  # the READY runs' worker at rest
    conv_idle: tuple[float, int] = (float("nan"), 0)
    peak_1: tuple[float, int] = (float("nan"), 0)
    peak_4: tuple[float, int] = (float("nan"), 0)
    turns_1: list[dict[str, float]] = field(default_factory=list)
    turns_4: list[dict[str, float]] = field(default_factory=list)
    wer_1: list[float] = field(default_factory=list)
    wer_4: list[float] = field(default_factory=list)
    entry_4_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# -- processes ---------------------------------------------------------------------------------------------
def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET, "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT), **(extra or {})}


def open_log(path: Path) -> Any:
    """A file for a child's output (the child keeps its own descriptor; close ours after spawning)."""
    return open(path, "ab")


async def stop_process(proc: asyncio.subprocess.Process, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL to the process group this benchmark started for it."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


class ShapeWorker:
    """benchmarks/workers/voice_worker.py as a subprocess; its stdout milestones land in `events` (wall clock)."""

    def __init__(self, shape: str, url: str, model_dir: Path, tmp: Path) -> None:
        self.shape, self.url, self.model_dir, self.tmp = shape, url, model_dir, tmp
        self.events: dict[str, dict[str, Any]] = {}
        self.spawned_at = 0.0
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        state_dir = self.tmp / f"state-{self.shape}"
        log = open_log(self.tmp / f"worker-{self.shape}-{time.time():.0f}.log")
        self.spawned_at = time.time()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.workers.voice_worker", "--shape", self.shape, "--url", self.url,
            "--model-dir", str(self.model_dir), "--state-dir", str(state_dir),
            stdout=asyncio.subprocess.PIPE, stderr=log, env=worker_env(), cwd=str(ROOT), start_new_session=True)
        log.close()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith('{"event": '):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    self.events.setdefault(event["event"], event)
                    self._changed.set()

    async def wait(self, event: str, timeout: float = 120.0) -> float:
        """Seconds from spawn to `event`."""
        deadline = time.monotonic() + timeout
        while event not in self.events:
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"{self.shape} worker exited ({self.proc.returncode}) before {event}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.shape} worker: no {event} in {timeout:.0f} s")
        return self.events[event]["at"] - self.spawned_at

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)
        if self._reader is not None:
            self._reader.cancel()


def accepted_at(standin: LiveKitStandIn, job_id: str) -> float:
    """When the worker's AvailabilityResponse for `job_id` arrived at the stand-in (wall clock)."""
    return next(r.at for r in standin.messages
                if r.kind == "availability" and r.message.availability.job_id == job_id)


async def wait_file(path: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no result in {path} after {timeout:.0f} s")
        await asyncio.sleep(0.2)
    return json.loads(path.read_text())


# -- start → READY and dispatch ------------------------------------------------------------------------------
async def knotd_ready_run(standin: LiveKitStandIn, model_dir: Path, probes: int, res: ShapeResults) -> None:
    """One `knotd run`: exec → READY=1, idle PSS, then `probes` jobs: accepted → session built."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        notify = NotifySocket(tmp / "notify.sock")
        port = free_port()
        config = write_config(tmp, standin.url, model_dir, port)
        log = open_log(tmp / "knotd.log")
        began = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "knotd", "run", "--config", str(config), stdout=log, stderr=log,
            env=worker_env({"NOTIFY_SOCKET": notify.path}), start_new_session=True)
        log.close()
        try:
            ready = await notify.wait_for("READY", timeout=120)
            res.ready_s.append(ready.at - began)
            await asyncio.sleep(1.5)
            res.idle_pss.append(tree_pss_mb(proc.pid))
            async with aiohttp.ClientSession() as http:
                for _ in range(probes):
                    handle = await standin.dispatch_job("bench-probe", url=DEAD_ROOM_URL)
                    accepted = accepted_at(standin, handle.job_id)
                    built = await _session_built_at(http, f"http://127.0.0.1:{port}/api/status", accepted)
                    res.dispatch_s.append(built - accepted)
                    await asyncio.sleep(0.5)
        except (TimeoutError, RuntimeError) as err:
            res.errors.append(f"knotd run: {err}")
        finally:
            await stop_process(proc)
            notify.close()


async def _session_built_at(http: aiohttp.ClientSession, url: str, after: float, timeout: float = 30.0) -> float:
    """The start of the first session_start stage that ended after `after` (= the session was built)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with http.get(url) as resp:
            status = await resp.json()
        for s in status.get("stages", []):
            if s["name"] == "session_start" and s["at"] > after:
                return s["at"] - s["latency_ms"] / 1000
        await asyncio.sleep(0.05)
    raise TimeoutError("knotd run: no session_start stage after the dispatch")


async def stock_ready_run(standin: LiveKitStandIn, model_dir: Path, probes: int, res: ShapeResults) -> None:
    """One stock worker: exec → worker_registered (idle processes ready), idle PSS, then `probes` jobs."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        worker = ShapeWorker("stock", standin.url, model_dir, tmp)
        await worker.start()
        try:
            ready = await worker.wait("registered")
            res.ready_s.append(ready)
            res.ready_breakdown.append({"imports": await worker.wait("imports_done"),
                                        "idle processes ready": await worker.wait("worker_started")})
            await asyncio.sleep(1.5)
            assert worker.proc is not None
            res.idle_pss.append(tree_pss_mb(worker.proc.pid))
            for i in range(probes):
                out = tmp / f"probe-{i}.json"
                handle = await standin.dispatch_job("bench-probe", metadata=json.dumps({"kind": "probe",
                                                                                         "out": str(out)}))
                result = await wait_file(out, 60)
                if "error" in result:
                    res.errors.append(f"stock probe: {result['error']}")
                    continue
                res.dispatch_s.append(result["built_at"] - accepted_at(standin, handle.job_id))
                await asyncio.sleep(3.0)  # the pool replaces the used process (and loads Whisper again)
        except (TimeoutError, RuntimeError) as err:
            res.errors.append(f"stock worker: {err}")
        finally:
            await worker.stop()


# -- conversations -------------------------------------------------------------------------------------------
async def conversations(shape: str, standin: LiveKitStandIn, model_dir: Path, clips: list[Path],
                        texts: list[str], concurrent_clips: int, res: ShapeResults) -> None:
    """Idle PSS, then one conversation over all `clips`, then CONCURRENT at once over `concurrent_clips` each."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        worker = ShapeWorker(shape, standin.url, model_dir, tmp)
        await worker.start()
        try:
            await worker.wait("registered", timeout=180)
            assert worker.proc is not None
            await asyncio.sleep(2.0)
            res.conv_idle = await asyncio.to_thread(tree_pss_mb, worker.proc.pid)

            with PssSampler(worker.proc.pid) as sampler:
                [one] = await _run_sessions(standin, tmp, [clips], "single")
            res.peak_1 = (sampler.peak_mb, sampler.peak_procs)
            _collect(one, texts, res.turns_1, res.wer_1, res.errors)

            await asyncio.sleep(3.0)
            sets, set_texts = [], []
            for k in range(CONCURRENT):  # each session starts at a different clip, so lengths overlap
                order = [(k * 3 + i) % len(clips) for i in range(concurrent_clips)]
                sets.append([clips[i] for i in order])
                set_texts.append([texts[i] for i in order])
            with PssSampler(worker.proc.pid) as sampler:
                many = await _run_sessions(standin, tmp, sets, "concurrent")
            res.peak_4 = (sampler.peak_mb, sampler.peak_procs)
            for result, t in zip(many, set_texts, strict=True):
                _collect(result, t, res.turns_4, res.wer_4, res.errors)
                if "entered_at" in result:
                    res.entry_4_s.append(result["entered_at"] - result["accepted_at"])
        except (TimeoutError, RuntimeError) as err:
            res.errors.append(f"{shape} conversations: {err}")
        finally:
            await worker.stop()


async def _run_sessions(standin: LiveKitStandIn, tmp: Path, clip_sets: list[list[Path]], tag: str) -> list[dict]:
    outs = [tmp / f"{tag}-{k}.json" for k in range(len(clip_sets))]
    handles = await asyncio.gather(*(
        standin.dispatch_job(f"bench-{tag}-{k}", metadata=json.dumps(
            {"kind": "converse", "clips": [str(p) for p in clip_set], "out": str(out)}))
        for k, (clip_set, out) in enumerate(zip(clip_sets, outs, strict=True))))
    results = await asyncio.gather(*(wait_file(out, JOB_TIMEOUT_S) for out in outs))
    for handle, result in zip(handles, results, strict=True):
        result["accepted_at"] = accepted_at(standin, handle.job_id)
    return list(results)


def _collect(result: dict, texts: list[str], turns: list, wers: list, errors: list) -> None:
    if "error" in result:
        errors.append(f"conversation {result.get('job_id')}: {result['error']}")
    # The greeting has no user part; only answers to the user are turns here.
    turns.extend(t for t in result.get("turns", []) if "eou" in t or "stt" in t)
    if result.get("user_texts"):
        wers.append(word_error_rate(" ".join(texts), " ".join(result["user_texts"])))


# -- report ---------------------------------------------------------------------------------------------------
def print_report(res: dict[str, ShapeResults], clip_durations: list[float], args: argparse.Namespace,
                 load_before: str) -> None:
    knotd, stock = res["knotd"], res["stock"]
    print()
    print(f"# voice benchmark: knotd as built vs the stock shape{' (--quick)' if args.quick else ''}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}")
    print(f"load average (1/5/15 min): before {load_before}, after {load_average()} "
          "(the machine is shared with other jobs)")
    print(f"clips: {len(clip_durations)} German espeak-ng clips, {min(clip_durations):.1f}–"
          f"{max(clip_durations):.1f} s of speech; Whisper base int8, scripted LLM, espeak-ng TTS")
    print("knotd: one process, THREAD executor, one shared Whisper (2 workers) + Silero, sized window, "
          "default [stt]")
    print(f"stock: PROCESS executor (forkserver, default preload, {os.cpu_count()} idle processes = livekit's "
          "default), Whisper + Silero loaded per job process in setup_fnc, 30 s window, no speculation; "
          f"{CONCURRENT} concurrent sessions = {CONCURRENT} job processes")

    print()
    print("## start and dispatch (median [min–max])")
    print("| measure | knotd | stock | target |")
    print("|---|---|---|---|")
    print(f"| start → READY | {spread(knotd.ready_s)} | {spread(stock.ready_s)} | {TARGETS['ready']} |")
    print(f"| job accepted → session built | {_ms(knotd.dispatch_s)} | {_ms(stock.dispatch_s)} | – |")
    print(f"| {CONCURRENT} jobs at once: accepted → entrypoint running, slowest | {_ms(_max(knotd.entry_4_s))} "
          f"| {_ms(_max(stock.entry_4_s))} | – |")
    if stock.ready_breakdown:
        parts = {k: statistics.median(b[k] for b in stock.ready_breakdown) for k in stock.ready_breakdown[0]}
        print("stock start, medians from exec: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
              + ", registered " + f"{statistics.median(stock.ready_s):.2f} s")

    for title, attr, wer_attr, targets in (
        ("1 session", "turns_1", "wer_1", (TARGETS["e2e_p50"], TARGETS["e2e_p95"])),
        (f"{CONCURRENT} concurrent sessions", "turns_4", "wer_4", ("", TARGETS["e2e_p95_concurrent"])),
    ):
        print()
        print(f"## per-turn latency, {title} (seconds; n = turns knotd/stock)")
        print("| component | knotd p50 | knotd p95 | stock p50 | stock p95 | target p50 | target p95 |")
        print("|---|---|---|---|---|---|---|")
        for c in COMPONENTS:
            k = [t[c] for t in getattr(knotd, attr) if c in t]
            s = [t[c] for t in getattr(stock, attr) if c in t]
            target = targets if c == "e2e" else ("", "")
            print(f"| {c} (n={len(k)}/{len(s)}) | {fmt_s(pct(k, 50))} | {fmt_s(pct(k, 95))} | "
                  f"{fmt_s(pct(s, 50))} | {fmt_s(pct(s, 95))} | {target[0]} | {target[1]} |")
        kw, sw = getattr(knotd, wer_attr), getattr(stock, wer_attr)
        print(f"| WER of the user transcripts | {_mean(kw)} | | {_mean(sw)} | | | |")
    print("eou and stt count from the end of speech as the VAD dates it (its 0.55 s of silence included); the turn")
    print("ends when the transcript is in, so eou ≈ stt, and e2e ≈ eou + llm_ttft + tts_ttfb (first audio frame out).")

    print()
    print("## memory: Σ PSS of the worker and all its descendants, MB (peaks sampled every 0.5 s)")
    print("| state | knotd | stock | target |")
    print("|---|---|---|---|")
    print(f"| idle, 0 sessions | {_mb(knotd.conv_idle)} | {_mb(stock.conv_idle)} | |")
    print(f"| peak, 1 session | {_mb(knotd.peak_1)} | {_mb(stock.peak_1)} | |")
    print(f"| peak, {CONCURRENT} sessions | {_mb(knotd.peak_4)} | {_mb(stock.peak_4)} | |")
    print(f"| extra for 1 session | {_extra(knotd.peak_1, knotd.conv_idle, 1)} | "
          f"{_extra(stock.peak_1, stock.conv_idle, 1)} | {TARGETS['extra_per_session']} |")
    print(f"| extra per session at {CONCURRENT} | {_extra(knotd.peak_4, knotd.conv_idle, CONCURRENT)} | "
          f"{_extra(stock.peak_4, stock.conv_idle, CONCURRENT)} | {TARGETS['extra_per_session']} |")
    print(f"| idle right after READY (the start runs; knotd = `knotd run`) | {_median_mb(knotd.idle_pss)} | "
          f"{_median_mb(stock.idle_pss)} | |")

    errors = knotd.errors + stock.errors
    if errors:
        print()
        print("errors:")
        for e in errors:
            print(f"  {e}")


def _max(values: list[float]) -> list[float]:
    return [max(values)] if values else []


def _ms(values: list[float]) -> str:
    if not values:
        return "–"
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} ms [{min(ms):.0f}–{max(ms):.0f}], n={len(ms)}"


def _mb(sample: tuple[float, int]) -> str:
    mb, procs = sample
    return "–" if math.isnan(mb) else f"{mb:.0f} ({procs} proc{'s' if procs != 1 else ''})"


def _median_mb(samples: list[tuple[float, int]]) -> str:
    if not samples:
        return "–"
    return _mb((statistics.median(m for m, _ in samples), max(n for _, n in samples)))


def _extra(peak: tuple[float, int], idle: tuple[float, int], sessions: int) -> str:
    value = (peak[0] - idle[0]) / sessions
    return "–" if math.isnan(value) else f"{value:.0f}"


def _mean(values: list[float]) -> str:
    return "–" if not values else f"{statistics.mean(values):.2f}"


# -- main ------------------------------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> None:
    load_before = load_average()
    model_dir = args.model_dir or whisper_base_dir()
    clips = [cached_clip(c.text) for c in CLIPS][: args.clips]
    texts = [c.text for c in CLIPS][: args.clips]
    durations = []
    for path in clips:
        samples, rate = read_wav(path)
        durations.append(samples.size / rate)
    res = {shape: ShapeResults() for shape in SHAPES}
    standin = LiveKitStandIn(API_KEY, API_SECRET)
    await standin.start()
    try:
        for i in range(args.ready_runs):
            print(f"start → READY, run {i + 1}/{args.ready_runs} …", file=sys.stderr, flush=True)
            await knotd_ready_run(standin, model_dir, args.probes, res["knotd"])
            await stock_ready_run(standin, model_dir, args.probes, res["stock"])
        for shape in SHAPES:
            print(f"{shape}: conversations (1 session, then {CONCURRENT}) …", file=sys.stderr, flush=True)
            await conversations(shape, standin, model_dir, clips, texts, args.concurrent_clips, res[shape])
    finally:
        await standin.stop()
    print_report(res, durations, args, load_before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run: 1 start, 4 clips, 2 per concurrent session")
    parser.add_argument("--model-dir", type=Path, default=None, help="Whisper base (default: tests/audio.py's)")
    args = parser.parse_args()
    args.ready_runs, args.probes, args.clips, args.concurrent_clips = (1, 2, 4, 2) if args.quick else (3, 2, 12, 5)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
