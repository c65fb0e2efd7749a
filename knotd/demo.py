"""``knotd demo``: one real Knotencheck session in-process, without a LiveKit server.

The same start-up as ``knotd run`` (``Bootstrap``: models → resources → status server) and the same session
code as a LiveKit job, with local audio instead of a room (``knotd.agent.local_session``): a scripted
microphone says the request WAV(s) after the agent's greeting, a recording speaker keeps the agent's voice.
The status server runs meanwhile, so the page and ``/metrics`` show the session live, and the page says it
is a demo.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

from knotd import stages
from knotd.bootstrap import Bootstrap
from knotd.config import Settings
from knotd.conversation.summary import SessionSummary
from knotd.errors import KnotdError
from knotd.lifecycle import Facts


def bundled_requests() -> list[Path]:
    """The demo's German answers (espeak-ng): consent, then where the knot is, its size, since when, changes."""
    data = importlib_resources.files("knotd").joinpath("data")
    return [Path(str(data.joinpath(f"demo_de_{n}.wav"))) for n in range(1, 6)]


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
    from knotd.agent.local_io import read_wav, write_wav
    from knotd.agent.local_session import converse

    boot = Bootstrap(settings, demo=True)
    clips_paths = [audio] if isinstance(audio, Path) else list(audio or []) or bundled_requests()
    clips = []
    for path in clips_paths:
        try:
            clips.append(read_wav(path))
        except (OSError, ValueError, EOFError) as err:
            raise DemoError(f"cannot read {path}: {err}") from None

    facts = Facts(demo=True)
    boot.apply(facts)
    runner = await boot.start_status_server()
    url = f"http://{settings.status.listen}/"
    printer(f"status page: {url}")
    try:
        resources = await boot.load_resources()
        facts.models_loaded = True
        boot.apply(facts)

        result = await converse(resources, boot.observers, clips)
        duration = write_wav(out, result.reply_frames)
        _print_report(printer, result.conversation, result.record, out, duration)
        if serve:
            printer(f"status page stays open at {url} — press Ctrl-C to stop")
            await _wait_for_signal()
        return 0
    finally:
        await boot.close()
        await runner.cleanup()


def _print_report(printer: Any, conversation: Any, record: SessionSummary, out: Path, duration: float) -> None:
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
    if record.answers:
        printer("answers (session summary):")
        for field, answer in record.answers.items():
            shown = answer.answer if answer.kept and answer.understood else None
            printer(f"  {field:<9} {shown or ('understood' if answer.understood else 'not understood')}")
        printer("")
    printer(f"phases: {' → '.join(record.phases_reached)}")
    printer(f"reply written to {out} ({duration:.1f} s of audio)")


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(file=sys.stderr)
