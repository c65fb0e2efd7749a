"""knotd in a real LiveKit room, measured by the caller, beside the same turns on local audio IO.

    python benchmarks/room.py [--rooms 4] [--skip-local]

Run from the repository root after `./dev.sh test` or `./dev.sh bench` has built livekit-server and the
Whisper model (about 4 minutes). It starts a real livekit-server on loopback (tests/livekit_server.py) and
`knotd run` as a subprocess (max_sessions = --rooms), then callers join with the livekit rtc SDK (real
WebRTC, Opus, loopback UDP) and answer the Knotencheck with espeak-ng speech in real time: first one room,
then --rooms rooms at once. From the caller's side it measures:

- greeting: room join → first audible agent frame received;
- voice-to-voice: the caller's last speech frame captured → the first audible agent frame received, per
  turn, p50/p95 (this includes the VAD's end-of-turn silence, Whisper, guards, LLM, TTS, Opus both ways);
- CPU (cores, from the daemon's /proc/<pid>/stat over the concurrent phase) and the daemon's Σ PSS peak;
- beside it the same answers on local audio IO (benchmarks/turn_latency.py --json, `heard_e2e`, in a
  process of its own before the room runs): the difference is what WebRTC, Opus and resampling add.

Prints tables; asserts nothing. The load average before and after is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._machine import describe  # noqa: E402
from tests.audio import cached_clip, whisper_base_dir  # noqa: E402
from tests.conftest import API_KEY, API_SECRET, NotifySocket, free_port, write_config  # noqa: E402
from tests.livekit_server import LiveKitServer  # noqa: E402
from tests.room_caller import Caller  # noqa: E402

AGENT = "knotencheck"
# The Knotencheck answers, in the order the phases ask for them.
ANSWERS = (
    "Ja, ich bin einverstanden.",
    "Er sitzt am Hals, neben dem Kehlkopf.",
    "Ungefähr so groß wie eine Kirsche.",
    "Seit ungefähr drei Wochen.",
    "Nein, er ist gleich geblieben und tut nicht weh.",
)


def pct(values: list[float], q: float) -> str:
    return f"{float(np.percentile(values, q)):.2f}" if values else "–"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def speech(text: str) -> tuple[np.ndarray, int]:
    with wave.open(str(cached_clip(text)), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16), wav.getframerate()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_call(server: LiveKitServer, room: str) -> tuple[float, list[float]]:
    """One caller through the whole check; (greeting latency, voice-to-voice per answer)."""
    caller = Caller(f"bench-{room}")
    try:
        await caller.join(server.url, server.token(caller.identity, room, agent_name=AGENT))
        await caller.wait_until(lambda: caller.first_audible_after(0.0), 60, "greeting")
        greeting = caller.first_audible_after(0.0) - caller.joined_at
        await caller.wait_until(lambda: caller.quiet_since(1.0), 60, "end of greeting")
        turns = []
        for text in ANSWERS:
            ended = await caller.say(*speech(text))
            await caller.wait_until(lambda e=ended: caller.first_audible_after(e), 30, "reply")
            turns.append(caller.first_audible_after(ended) - ended)
            await caller.wait_until(lambda: caller.quiet_since(1.0), 60, "end of reply")
        return greeting, turns
    finally:
        await caller.leave()


async def in_room(rooms: int, work: Path) -> dict:
    server = LiveKitServer(API_KEY, API_SECRET, work / "livekit-server.log")
    await server.start()
    notify = NotifySocket(work / "notify.sock")
    port = free_port()
    config = write_config(work, server.url, whisper_base_dir(), port, worker=f"max_sessions = {rooms}")
    env = {"PATH": os.environ["PATH"], "HOME": str(work), "HF_HUB_OFFLINE": "1", "NOTIFY_SOCKET": notify.path,
           "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET}
    with open(work / "knotd.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "knotd", "run", "--config", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    try:
        await notify.wait_for("READY", timeout=120)
        greeting, single = await one_call(server, "bench-single")
        peak = 0.0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, pss_mb(daemon.pid))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        cpu_before, began = cpu_seconds(daemon.pid), time.monotonic()
        results = await asyncio.gather(*(one_call(server, f"bench-{i}") for i in range(rooms)))
        cores = (cpu_seconds(daemon.pid) - cpu_before) / (time.monotonic() - began)
        sampling = False
        await sampler
        return {"greeting": [greeting] + [g for g, _ in results], "single": single,
                "concurrent": [t for _, turns in results for t in turns], "cores": cores, "pss_mb": peak}
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a session still draining: the numbers are taken already
            daemon.kill()
            daemon.wait()
        notify.close()
        await server.stop()


def local_io(rooms: int) -> dict[str, list[float]]:
    """heard_e2e per turn on local audio IO: 1 session, then `rooms` at once (benchmarks/turn_latency.py)."""
    out = {}
    for label, count in (("single", 1), ("concurrent", rooms)):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "turn_latency.py"), "--rounds", "1",
                               "--concurrent", str(count), "--detection", "model", "--json"],
                              capture_output=True, text=True, check=True)
        columns = json.loads(proc.stdout.strip().splitlines()[-1])
        turns = next(iter(columns.values()))  # the speculative column with knotd's default settings
        out[label] = [t["heard_e2e"] for t in turns if "heard_e2e" in t]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rooms", type=int, default=4, help="rooms at once in the concurrent phase (default 4)")
    parser.add_argument("--skip-local", action="store_true", help="do not run the local-IO baseline")
    args = parser.parse_args()
    print(f"# room: real livekit-server on loopback, `knotd run`, {len(ANSWERS)} answers per caller; "
          f"1 room, then {args.rooms} at once")
    print(f"# machine: {describe()}; load average before: {load_average()}")
    local = {} if args.skip_local else local_io(args.rooms)
    with tempfile.TemporaryDirectory(prefix="knotd-room-bench-") as tmp:
        room = await in_room(args.rooms, Path(tmp))

    print()
    print(f"{'p50 / p95 (s)':<28}{'real room':>14}{'local IO':>14}{'room − local':>14}")
    for label, key in (("voice-to-voice, 1 room", "single"), (f"voice-to-voice, {args.rooms} rooms", "concurrent")):
        r, loc = room[key], local.get(key, [])
        diff = (f"{np.percentile(r, 50) - np.percentile(loc, 50):+.2f}" if r and loc else "–")
        print(f"{label:<28}{pct(r, 50) + ' / ' + pct(r, 95):>14}{pct(loc, 50) + ' / ' + pct(loc, 95):>14}"
              f"{diff:>14}")
    print(f"{'greeting (join → audio)':<28}{pct(room['greeting'], 50) + ' / ' + pct(room['greeting'], 95):>14}")
    print(f"{'turns (1 room / N rooms)':<28}{len(room['single']):>7} / {len(room['concurrent']):<5}")
    print(f"# at {args.rooms} rooms: daemon CPU {room['cores']:.2f} cores, Σ PSS peak {room['pss_mb']:.0f} MB")
    print(f"# load average after: {load_average()}")


if __name__ == "__main__":
    asyncio.run(main())
