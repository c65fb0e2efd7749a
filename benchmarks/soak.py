"""Soak: Knotencheck calls back to back through a real LiveKit server, 1 and then N at a time.

    python benchmarks/soak.py [--minutes 30] [--max-sessions 200] [--concurrency 1 4]

Run from the repository root after `./dev.sh test` (livekit-server and the Whisper model built). It starts a
real livekit-server on loopback (tests/livekit_server.py) and `knotd run` as a subprocess, then callers
(tests/room_caller.py: real WebRTC, espeak-ng answers in real time) run whole calls back to back, keeping
--concurrency calls going, for --minutes or --max-sessions calls per phase. Every 10 s it samples the
daemon: RSS, PSS, open fds, threads, `knotd_handler_tasks_inflight`. At the end of each phase it prints:

- RSS growth after warm-up (the first fifth of the phase), MB per 10 minutes, from a least-squares line;
- open fds and threads at the end of warm-up and at the end;
- calls made vs summary records in sessions.jsonl (each call exactly one record) and outcomes;
- handler tasks in flight at the end (must be 0);
- voice-to-voice p95 (the caller's measure) of the first and the last third (10 minutes in a 30-minute run).

The goals (issue 12): RSS growth ≤ 1 MB / 10 min, fds and threads flat, one record per call, nothing in
flight, the last p95 within 10 % of the first. Prints tables; asserts nothing; the unit's MemoryHigh=/MemoryMax=
are set from its peak numbers. Timing numbers depend on the machine's load: the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._machine import describe  # noqa: E402
from benchmarks.room import AGENT, ANSWERS, load_average, pss_mb, speech  # noqa: E402
from knotd.journal import read_records  # noqa: E402
from tests.audio import whisper_base_dir  # noqa: E402
from tests.conftest import API_KEY, API_SECRET, NotifySocket, free_port, write_config  # noqa: E402
from tests.livekit_server import LiveKitServer  # noqa: E402
from tests.room_caller import Caller  # noqa: E402

SAMPLE_S = 10.0


@dataclass
class Sample:
    at: float
    rss_mb: float
    pss_mb: float
    fds: int
    threads: int
    inflight: float


@dataclass
class Phase:
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    turns: list[tuple[float, float]] = field(default_factory=list)  # (when, voice-to-voice s)
    calls: int = 0
    failed_calls: int = 0
    started: float = 0.0
    ended: float = 0.0


def proc_status(pid: int) -> tuple[float, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", text).group(1))
    return rss, threads


def inflight(status_url: str) -> float:
    with urllib.request.urlopen(f"{status_url}/metrics", timeout=60) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^knotd_handler_tasks_inflight\{[^}]*\} (\S+)$", text, re.M))


def active_sessions(status_url: str) -> int:
    with urllib.request.urlopen(f"{status_url}/api/status", timeout=60) as r:
        return len(json.loads(r.read())["sessions"])


async def free_slot(status_url: str, max_sessions: int) -> None:
    """Wait until knotd has a free slot and LiveKit has heard of it: a room opened while the worker still
    reports itself full gets no agent, and LiveKit does not offer it again (its load reaches LiveKit with the
    worker's next status update, every 2.5 s)."""
    while await asyncio.to_thread(active_sessions, status_url) >= max_sessions:
        await asyncio.sleep(0.5)
    await asyncio.sleep(3.0)


def sample(pid: int, status_url: str) -> Sample:
    rss, threads = proc_status(pid)
    return Sample(time.monotonic(), rss, pss_mb(pid), len(os.listdir(f"/proc/{pid}/fd")), threads,
                  inflight(status_url))


async def one_call(server: LiveKitServer, room: str, phase: Phase) -> None:
    caller = Caller(f"soak-{room}")
    try:
        await caller.join(server.url, server.token(caller.identity, room, agent_name=AGENT))
        await caller.wait_until(lambda: caller.first_audible_after(0.0), 60, "greeting")
        await caller.wait_until(lambda: caller.quiet_since(1.0), 60, "end of greeting")
        for text in ANSWERS:
            ended = await caller.say(*speech(text))
            await caller.wait_until(lambda e=ended: caller.first_audible_after(e), 30, "reply")
            phase.turns.append((time.monotonic(), caller.first_audible_after(ended) - ended))
            await caller.wait_until(lambda: caller.quiet_since(1.0), 60, "end of reply")
        phase.calls += 1
    except Exception as err:  # noqa: BLE001 - a failed call is counted and reported, the soak goes on
        phase.failed_calls += 1
        print(f"# call {room} failed: {type(err).__name__}: {err}", file=sys.stderr)
    finally:
        await caller.leave()


async def run_phase(server: LiveKitServer, daemon: subprocess.Popen, status_url: str, concurrency: int,
                    minutes: float, max_calls: int) -> Phase:
    phase = Phase(concurrency, started=time.monotonic())
    deadline = phase.started + minutes * 60
    counter = iter(range(10**9))

    async def lane(n: int) -> None:
        while time.monotonic() < deadline and phase.calls + phase.failed_calls < max_calls:
            await free_slot(status_url, concurrency)
            await one_call(server, f"c{concurrency}-{n}-{next(counter)}", phase)

    async def sampler() -> None:
        while True:
            try:
                phase.samples.append(await asyncio.to_thread(sample, daemon.pid, status_url))
            except OSError as err:  # a starved machine can make /metrics late: skip the sample, say so
                print(f"# sample skipped: {type(err).__name__}", file=sys.stderr)
            await asyncio.sleep(SAMPLE_S)

    sampling = asyncio.create_task(sampler())
    await asyncio.gather(*(lane(n) for n in range(concurrency)))
    # let the last sessions finish and write their records
    await asyncio.sleep(5)
    sampling.cancel()
    phase.samples.append(await asyncio.to_thread(sample, daemon.pid, status_url))
    phase.ended = time.monotonic()
    return phase


def growth_mb_per_10min(samples: list[Sample]) -> float:
    if len(samples) < 3:
        return float("nan")
    t = np.array([s.at for s in samples]) / 600.0
    rss = np.array([s.rss_mb for s in samples])
    return float(np.polyfit(t, rss, 1)[0])


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


def report(phase: Phase, records: list[dict]) -> None:
    span = phase.ended - phase.started
    warm = [s for s in phase.samples if s.at >= phase.started + span / 5]
    first_warm = warm[0] if warm else phase.samples[0]
    window = min(600.0, span / 3)
    early = [v for at, v in phase.turns if at < phase.started + window]
    late = [v for at, v in phase.turns if at >= phase.ended - window]
    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    last = phase.samples[-1]
    print(f"\n## {phase.concurrency} call(s) at a time, {span / 60:.1f} min")
    print(f"{'measure':<44}{'value':>22}{'goal':>16}")
    rows = [
        ("RSS growth after warm-up (MB / 10 min)", f"{growth_mb_per_10min(warm):+.2f}", "≤ 1"),
        ("RSS after warm-up → end (MB)", f"{first_warm.rss_mb:.0f} → {last.rss_mb:.0f}", ""),
        ("RSS / PSS peak (MB)", f"{max(s.rss_mb for s in phase.samples):.0f} / "
                                f"{max(s.pss_mb for s in phase.samples):.0f}", ""),
        ("open fds after warm-up → end", f"{first_warm.fds} → {last.fds}", "flat"),
        ("threads after warm-up → end", f"{first_warm.threads} → {last.threads}", "flat"),
        ("calls finished / failed", f"{phase.calls} / {phase.failed_calls}", ""),
        ("summary records (outcomes)", f"{len(records)} {json.dumps(outcomes)}", "1 per call"),
        ("handler tasks in flight at the end", f"{last.inflight:g}", "0"),
        (f"voice-to-voice p95, first {window / 60:.0f} min (s)", f"{p95(early):.2f} (n={len(early)})", ""),
        (f"voice-to-voice p95, last {window / 60:.0f} min (s)", f"{p95(late):.2f} (n={len(late)})",
         "within 10 %"),
    ]
    for name, value, goal in rows:
        print(f"{name:<44}{value:>22}{goal:>16}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of each phase (default 30)")
    parser.add_argument("--max-sessions", type=int, default=200, help="calls per phase at most (default 200)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="calls at a time per phase")
    args = parser.parse_args()
    print(f"# soak: real livekit-server on loopback, `knotd run`, {len(ANSWERS)} answers per call; "
          f"phases {args.concurrency}, {args.minutes:g} min or {args.max_sessions} calls each")
    print(f"# machine: {describe()}; load average before: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="knotd-soak-") as tmp:
        work = Path(tmp)
        server = LiveKitServer(API_KEY, API_SECRET, work / "livekit-server.log")
        await server.start()
        notify = NotifySocket(work / "notify.sock")
        port = free_port()
        config = write_config(work, server.url, whisper_base_dir(), port,
                              worker=f"max_sessions = {max(args.concurrency)}")
        env = {"PATH": os.environ["PATH"], "HOME": str(work), "HF_HUB_OFFLINE": "1", "NOTIFY_SOCKET": notify.path,
               "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET}
        with open(work / "knotd.log", "wb") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "knotd", "run", "--config", str(config)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        try:
            await notify.wait_for("READY", timeout=180)
            status_url = f"http://127.0.0.1:{port}"
            seen = 0
            for concurrency in args.concurrency:
                phase = await run_phase(server, daemon, status_url, concurrency, args.minutes, args.max_sessions)
                records = read_records(work / "state")
                report(phase, records[seen:])
                seen = len(records)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=120)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            notify.close()
            await server.stop()
    print(f"\n# load average after: {load_average()}")


if __name__ == "__main__":
    asyncio.run(main())
