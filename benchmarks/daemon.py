"""Daemon numbers: `knotd run` start → READY=1, bridge overhead per event, /metrics render time.

    .venv/bin/python benchmarks/daemon.py [--runs 5]

Start → READY runs the real daemon as a subprocess against the LiveKit protocol stand-in (in this process),
with a real NOTIFY_SOCKET, and times from `exec` to the READY=1 datagram. It needs the Whisper model
(`./dev.sh bench` prepares it in .cache/models). Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import API_KEY, API_SECRET, NotifySocket, free_port, write_config  # noqa: E402
from tests.livekit_standin import LiveKitStandIn  # noqa: E402


async def start_to_ready(model_dir: Path, runs: int) -> list[dict[str, float]]:
    results = []
    standin = LiveKitStandIn(API_KEY, API_SECRET)
    await standin.start()
    try:
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                tmp_path = Path(tmp)
                notify = NotifySocket(tmp_path / "notify.sock")
                config = write_config(tmp_path, standin.url, model_dir, free_port())
                env = {**os.environ, "NOTIFY_SOCKET": notify.path, "LIVEKIT_API_KEY": API_KEY,
                       "LIVEKIT_API_SECRET": API_SECRET, "HF_HUB_OFFLINE": "1"}
                began = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "knotd", "run", "--config", str(config),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env)
                ready = await notify.wait_for("READY", timeout=120)
                statuses = {}
                for m in notify.messages:
                    text = m.fields.get("STATUS", "")
                    statuses.setdefault(text.split(":")[0].split(" ")[0], m.at - began)
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
                notify.close()
                results.append({
                    "ready_s": ready.at - began,
                    "config_s": statuses.get("config", float("nan")),
                    "models_s": statuses.get("connecting", float("nan")),
                })
    finally:
        await standin.stop()
    return results


async def bridge_overhead(events: int = 20000) -> tuple[float, float]:
    """µs per event: emit → bridged coroutine done, against calling the coroutine directly."""
    from livekit import rtc

    from knotd.bridge import TaskBridge

    emitter = rtc.EventEmitter()
    bridge = TaskBridge("bench")
    done = 0

    async def handler(_: int) -> None:
        nonlocal done
        done += 1

    bridge.on(emitter, "e", handler, name="bench")
    began = time.perf_counter()
    for i in range(events):
        emitter.emit("e", i)
    await bridge.drain(30)
    bridged = (time.perf_counter() - began) / events * 1e6

    # The pattern the bridge replaces: a sync callback doing a bare create_task (and keeping nothing).
    bare_emitter = rtc.EventEmitter()
    tasks: list[asyncio.Task[None]] = []
    bare_emitter.on("e", lambda i: tasks.append(asyncio.create_task(handler(i))))
    began = time.perf_counter()
    for i in range(events):
        bare_emitter.emit("e", i)
    await asyncio.gather(*tasks)
    bare = (time.perf_counter() - began) / events * 1e6
    return bridged, bare


def metrics_render(sessions: int = 50, rounds: int = 20) -> tuple[float, int]:
    """ms to render /metrics after `sessions` sessions' worth of series; and the body size."""
    import random

    from knotd import metrics

    metrics.initialise(sessions)
    rng = random.Random(1)
    for _ in range(sessions):
        for stage in ("session_start", "stt_init", "llm_init", "tts_init", "input_guard", "output_guard"):
            metrics.STAGE_DURATION.labels(stage=stage, status="ok").observe(rng.random())
        for _ in range(10):
            for component in metrics.TURN_COMPONENTS:
                metrics.TURN_LATENCY.labels(component=component).observe(rng.random() * 2)
        for rule in ("emergency", "prompt_injection", "no_diagnosis", "no_medication_advice", "off_topic"):
            metrics.GUARDRAIL_CHECKS.labels(direction="input", rule=rule).inc(10)
        for handler in ("participant_connected", "close", "speech_created", "user_input_transcribed"):
            metrics.HANDLER_TASKS.labels(handler=handler, outcome="ok").inc()
        metrics.SESSIONS.labels(outcome="completed").inc()
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        body, _ = metrics.render()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), len(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "models" / "whisper-base")
    args = parser.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    runs = asyncio.run(start_to_ready(args.model_dir, args.runs))
    ready = [r["ready_s"] for r in runs]
    print(f"knotd run → READY=1 (n={len(ready)}): median {statistics.median(ready):.2f} s, "
          f"min {min(ready):.2f} s, max {max(ready):.2f} s")
    print(f"  of which until models loaded (STATUS=connecting): median "
          f"{statistics.median(r['models_s'] for r in runs):.2f} s")
    bridged, bare = asyncio.run(bridge_overhead())
    print(f"bridge: {bridged:.1f} µs per event (emit → task done), sync callback + bare create_task {bare:.1f} µs, "
          f"overhead {bridged - bare:.1f} µs")
    ms, size = metrics_render()
    print(f"/metrics render with 50 sessions' series: {ms:.2f} ms median, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
