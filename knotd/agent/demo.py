"""``knotd demo``: one real Knotencheck session in-process, without a LiveKit server.

The same session code as a LiveKit job (``KnotencheckSession``), with local audio IO instead of a room: a
scripted microphone says the request WAV(s) after the agent's greeting, a recording speaker keeps the
agent's voice. The status server runs meanwhile, so the page and ``/metrics`` show the session live.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import structlog
from livekit import rtc

from knotd import metrics, stages
from knotd.agent.local_io import RecordingAudioOutput, ScriptedAudioInput, read_wav, write_wav
from knotd.config import Settings
from knotd.errors import KnotdError
from knotd.stages import stage
from knotd.state import DaemonState, Lifecycle
from knotd.status.app import start_status_server

log = structlog.get_logger(__name__)

REPLY_TIMEOUT_S = 60.0


def bundled_requests() -> list[Path]:
    """The demo's German answers (espeak-ng): consent, then where the knot is."""
    data = importlib_resources.files("knotd").joinpath("data")
    return [Path(str(data.joinpath(name))) for name in ("demo_de_1.wav", "demo_de_2.wav")]


class DemoError(KnotdError):
    pass


async def run_demo(
    settings: Settings,
    *,
    audio: Sequence[Path] | Path | None = None,
    out: Path = Path("reply.wav"),
    serve: bool = False,
    printer: Any = print,
) -> int:
    """Run the demo session; returns the exit code. Prints the transcript, stage and turn latencies."""
    from knotd.agent import register_plugins
    from knotd.agent.session import AgentResources, describe_models
    from knotd.speech.models import load_models

    register_plugins()

    clips_paths = [audio] if isinstance(audio, Path) else list(audio or []) or bundled_requests()
    clips = []
    for path in clips_paths:
        try:
            clips.append(read_wav(path))
        except (OSError, ValueError, EOFError) as err:
            raise DemoError(f"cannot read {path}: {err}") from None

    state = DaemonState(livekit_url="(demo: no LiveKit)", agent_name=settings.livekit.agent_name, max_sessions=1)
    state.bind_loop(asyncio.get_running_loop())
    metrics.initialise(1)
    state.set_lifecycle(Lifecycle.LOADING_MODELS, "loading models")
    runner = await start_status_server(state, settings.status.listen)
    url = f"http://{settings.status.listen}/"
    printer(f"status page: {url}")
    try:
        with stage("model_load"):
            models = await asyncio.to_thread(load_models, settings)
        state.model = describe_models(models)
        shared = AgentResources.load(settings, models)
        state.set_lifecycle(Lifecycle.READY, "demo session")

        result = await converse(shared, state, clips)
        record, conversation = result.record, result.conversation
        duration = write_wav(out, result.reply_frames)
        _print_report(printer, conversation, record, out, duration)
        state.set_lifecycle(Lifecycle.READY, "demo finished")
        if serve:
            printer(f"status page stays open at {url} — press Ctrl-C to stop")
            await _wait_for_signal()
        return 0
    finally:
        await runner.cleanup()


@dataclass
class LocalConversation:
    conversation: Any  # KnotencheckSession
    speaker: RecordingAudioOutput
    record: dict[str, Any]
    first_reply_segment: int

    @property
    def reply_frames(self) -> list[rtc.AudioFrame]:
        """The agent's audio after its greeting: its answers to the clips."""
        return [f for seg in self.speaker.segments[self.first_reply_segment:] for f in seg.frames]


async def converse(
    shared: Any,
    state: DaemonState,
    clips: Sequence[rtc.AudioFrame],
    *,
    session_id: str = "demo-1",
    realtime_playout: bool = True,
) -> LocalConversation:
    """One conversation on local audio: wait for the greeting, say each clip, wait for each answer, close.

    Args:
        shared: the ``AgentResources`` (models, rules, script).
        realtime_playout: play the agent's audio out in real time (the demo) or instantly (tests).
    """
    from knotd.agent.session import KnotencheckSession

    mic = ScriptedAudioInput()
    speaker = RecordingAudioOutput(sample_rate=shared.settings.tts.sample_rate, realtime=realtime_playout)
    async with stage("session_start"):
        conversation = KnotencheckSession(shared, state, session_id, "demo (local audio)")
        await conversation.start(audio_input=mic, audio_output=speaker)
    try:
        replies = _ReplyWatch(conversation)
        await replies.wait(1)  # the greeting
        first_reply_segment = len(speaker.segments)
        for i, clip in enumerate(clips, start=2):
            played = mic.play(clip)
            await played.wait()
            await replies.wait(i)
        await asyncio.sleep(0.2)
    except BaseException:
        await conversation.aclose("error")
        raise
    finally:
        mic.close()
    record = await conversation.aclose("completed")
    return LocalConversation(conversation, speaker, record, first_reply_segment)


class _ReplyWatch:
    """Waits until the agent has finished speaking its n-th reply (greeting = 1)."""

    def __init__(self, conversation: Any) -> None:
        self._count = 0
        self._changed = asyncio.Event()
        conversation.session.on("agent_state_changed", self._on_state)

    def _on_state(self, event: Any) -> None:
        if event.old_state == "speaking" and event.new_state != "speaking":
            self._count += 1
            self._changed.set()

    async def wait(self, n: int) -> None:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while self._count < n:
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoError(f"the agent did not answer within {REPLY_TIMEOUT_S:.0f} s (reply {n})")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue


def _print_report(printer: Any, conversation: Any, record: dict[str, Any], out: Path, duration: float) -> None:
    printer("")
    printer("transcript:")
    for item in conversation.session.history.items:
        role = getattr(item, "role", None)
        if role in ("user", "assistant"):
            who = "user " if role == "user" else "agent"
            printer(f"  {who}: {item.text_content}")
    printer("")
    printer("stages (ms):")
    for s in stages.recent(100):
        printer(f"  {s.name:<16} {s.status:<6} {s.latency_ms:>9.1f}")
    if conversation.turns.turns:
        printer("")
        printer("turns (s):   " + "  ".join(f"{c:>8}" for c in ("eou", "stt", "llm_ttft", "tts_ttfb", "e2e")))
        for n, turn in enumerate(conversation.turns.turns, 1):
            cells = "  ".join(f"{turn[c]:>8.3f}" if c in turn else f"{'-':>8}"
                              for c in ("eou", "stt", "llm_ttft", "tts_ttfb", "e2e"))
            printer(f"  turn {n:<6} {cells}")
    printer("")
    printer(f"phases: {' → '.join(record['phases_reached'])}")
    printer(f"reply written to {out} ({duration:.1f} s of audio)")


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(file=sys.stderr)
