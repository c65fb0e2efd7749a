"""A LiveKit agent worker in one of two shapes, for `benchmarks/voice.py` (not meant to be run by hand).

    python -m benchmarks.workers.voice_worker --shape knotd|stock --url ws://… --model-dir DIR --state-dir DIR

(from the repository root, with LIVEKIT_API_KEY / LIVEKIT_API_SECRET in the environment).

- ``knotd``: knotd as built — Whisper and Silero loaded once in this process (``load_models``, with its
  self-test warm-up), default ``[stt]`` settings (sized window; speculative transcription if the default
  config turns it on), ``knotd.worker.build_server`` (THREAD executor: one thread and event loop per job).
- ``stock``: the shape the original system had — livekit-agents' default PROCESS executor (forkserver,
  default preload, prod default ``num_idle_processes``), Whisper (faster-whisper defaults: 1 worker, default
  threads, no warm-up) and Silero loaded in every job process by a module-level ``setup_fnc``, and the
  stock 30 s window without speculative transcription (``stt.max_window_s = 5`` turns sized windows off).

Both run the same Knotencheck session code (``KnotencheckSession`` via ``knotd.agent.local_session.converse``) on
local audio IO inside the real job (thread or process), so only the shape differs. A job's metadata says
what to do: ``{"kind": "converse", "clips": [wav, …], "out": path}`` runs one conversation and writes its
per-turn latencies to ``out``; ``{"kind": "probe", "out": path}`` only builds a session and writes when.

Stdout carries one JSON line per milestone (``started``, ``imports_done``, ``models_loaded``,
``worker_started``, ``registered``) with wall-clock ``at``.
"""

from __future__ import annotations

import time

STARTED_AT = time.time()  # before any heavy import

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

AGENT_NAME = "knotencheck"
ENV_MODEL_DIR = "KNOTD_BENCH_MODEL_DIR"
ENV_STATE_DIR = "KNOTD_BENCH_STATE_DIR"
# The original system's job processes: more than livekit's default 10 s, so a Whisper load on a busy
# 2-core machine is not killed and retried forever.
STOCK_INITIALIZE_TIMEOUT_S = 30.0


def quiet_logs() -> None:
    """knotd's logging, warnings only, on stderr (stdout carries the milestones)."""
    from knotd import logs

    logs.configure(level="warning", fmt="json")


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "at": time.time(), **fields}), flush=True)


def bench_settings(shape: str, model_dir: str, state_dir: str, url: str = "") -> Any:
    """knotd's default Settings with the model and state dir; for ``stock``, sized windows and speculation off."""
    from knotd.config import LiveKitSettings, Secret, SessionSettings, Settings, SttSettings

    stt = SttSettings(model=model_dir)
    if shape == "stock":
        changes: dict[str, Any] = {"max_window_s": 5.0}  # under the smallest bucket: always the 30 s path
        if "speculative" in {f.name for f in dataclasses.fields(SttSettings)}:
            changes["speculative"] = False
        stt = dataclasses.replace(stt, **changes)
    livekit = LiveKitSettings(url=url, agent_name=AGENT_NAME,
                              api_key=Secret(os.environ.get("LIVEKIT_API_KEY", "")),
                              api_secret=Secret(os.environ.get("LIVEKIT_API_SECRET", "")))
    return Settings(livekit=livekit, stt=stt, session=SessionSettings(state_dir=state_dir))


# -- the job (both shapes) --------------------------------------------------------------------------
async def run_job(ctx: Any, resources: Any, observer: Any, entered_at: float) -> None:
    """Do what the job's metadata asks, write the result file, end the job."""
    from knotd.agent.local_io import read_wav
    from knotd.agent.local_session import converse
    from knotd.agent.session import KnotencheckSession

    order = json.loads(ctx.job.metadata or "{}")
    result: dict[str, Any] = {"job_id": ctx.job.id, "entered_at": entered_at, "pid": os.getpid()}
    try:
        if order.get("kind") == "probe":
            conversation = KnotencheckSession(resources, observer, ctx.job.id, ctx.job.room.name)
            result["built_at"] = time.time()
            await conversation.aclose("completed")
        else:
            clips = [read_wav(Path(p)) for p in order["clips"]]
            done = await converse(resources, observer, clips, session_id=ctx.job.id, realtime_playout=False)
            result["turns"] = done.conversation.turns.turns
            result["started_at"] = done.record.started_at
            result["user_texts"] = [item.text_content or "" for item in done.conversation.session.history.items
                                    if getattr(item, "role", None) == "user"]
    except Exception as err:  # noqa: BLE001 - any failure is reported to the benchmark, which prints it
        result["error"] = f"{type(err).__name__}: {err}"
    _write_json(Path(order["out"]), result)
    ctx.shutdown(reason="benchmark job done")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


# -- stock shape: module level, so the PROCESS executor can pickle them ------------------------------
def stock_prewarm(proc: Any) -> None:
    """setup_fnc of every job process: load Whisper and Silero into this process, as the original system did."""
    from faster_whisper import WhisperModel

    from knotd.agent import register_plugins

    register_plugins()
    quiet_logs()
    from livekit.plugins import silero

    # What the original system's agent module imported at its top, before any job.
    import knotd.agent.local_session
    import knotd.agent.session  # noqa: F401

    model_dir = os.environ[ENV_MODEL_DIR]
    proc.userdata["settings"] = bench_settings("stock", model_dir, os.environ[ENV_STATE_DIR])
    proc.userdata["whisper"] = WhisperModel(model_dir, device="cpu", compute_type="int8", local_files_only=True)
    proc.userdata["vad"] = silero.VAD.load()


async def stock_entrypoint(ctx: Any) -> None:
    entered_at = time.time()
    from knotd import metrics
    from knotd.agent.session import AgentResources
    from knotd.bootstrap import session_observers
    from knotd.speech.models import SharedModels
    from knotd.speech.whisper import WhisperTranscriber
    from knotd.state import DaemonState

    data = ctx.proc.userdata
    settings = data["settings"]
    models = SharedModels(whisper=data["whisper"], vad=data["vad"],
                          transcriber=WhisperTranscriber(data["whisper"], settings.stt))
    metrics.initialise(1)
    resources = AgentResources.load(settings, models)
    state = DaemonState(agent_name=AGENT_NAME, max_sessions=1)
    state.bind_loop(asyncio.get_running_loop())
    await run_job(ctx, resources, session_observers(settings, state), entered_at)


def build_stock_server(settings: Any) -> Any:
    from livekit.agents import AgentServer

    server = AgentServer(
        setup_fnc=stock_prewarm,
        # Harness setting: the default CPU load with its 0.7 threshold refuses jobs on a busy 2-core machine,
        # and the stand-in does not retry. Everything else is livekit's default (PROCESS, forkserver, preload).
        load_threshold=math.inf,
        initialize_process_timeout=STOCK_INITIALIZE_TIMEOUT_S,
        ws_url=settings.livekit.url,
        api_key=settings.livekit.api_key.reveal(),
        api_secret=settings.livekit.api_secret.reveal(),
        host="127.0.0.1",
        port=0,
    )
    server.rtc_session(stock_entrypoint, agent_name=AGENT_NAME)
    return server


# -- knotd shape -------------------------------------------------------------------------------------
def build_knotd_server(settings: Any) -> Any:
    from knotd import metrics
    from knotd.agent import register_plugins
    from knotd.agent.session import AgentResources
    from knotd.bootstrap import session_observers
    from knotd.speech.models import load_models
    from knotd.state import DaemonState
    from knotd.worker import build_server

    register_plugins()
    resources = AgentResources.load(settings, load_models(settings))
    emit("models_loaded")
    metrics.initialise(settings.worker.max_sessions)
    state = DaemonState(agent_name=AGENT_NAME, max_sessions=settings.worker.max_sessions)
    state.bind_loop(asyncio.get_running_loop())

    observer = session_observers(settings, state)

    async def entrypoint(ctx: Any) -> None:
        await run_job(ctx, resources, observer, time.time())

    def load() -> float:
        return min(len(state.sessions) / settings.worker.max_sessions, 1.0)

    return build_server(settings, entrypoint, load)


async def serve(shape: str, settings: Any) -> None:
    import livekit.agents  # noqa: F401  (timed as the import stage)

    emit("imports_done")
    server = build_knotd_server(settings) if shape == "knotd" else build_stock_server(settings)
    server.on("worker_started", lambda: emit("worker_started"))
    server.on("worker_registered", lambda worker_id, info=None: emit("registered", worker_id=worker_id))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    run_task = asyncio.create_task(server.run())
    await asyncio.wait({run_task, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    await server.aclose()
    await asyncio.gather(run_task, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("knotd", "stock"), required=True)
    parser.add_argument("--url", required=True, help="the LiveKit (stand-in) URL")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--state-dir", required=True)
    args = parser.parse_args()
    emit("started", at_start=STARTED_AT)
    os.environ[ENV_MODEL_DIR] = args.model_dir
    os.environ[ENV_STATE_DIR] = args.state_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_logs()
    asyncio.run(serve(args.shape, bench_settings(args.shape, args.model_dir, args.state_dir, args.url)))


if __name__ == "__main__":
    main()
