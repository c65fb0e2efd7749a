"""Audio IO for a session without a room: a scripted microphone and a recording speaker.

``ScriptedAudioInput`` produces 20 ms frames in real time: silence, or the speech clips queued with
``play()``, like a microphone would. ``RecordingAudioOutput`` keeps what the agent says, segment by segment,
and reports playback the way a real speaker does (started at the first frame, finished after the audio's
duration), so livekit's turn timing and ``e2e_latency`` mean the same as in a room.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from livekit import rtc
from livekit.agents.voice import io

FRAME_MS = 20


# A request clip longer than this is a mistake (or a file that is not what it says).
MAX_CLIP_S = 120.0


def read_wav(path: Path) -> rtc.AudioFrame:
    """A mono/stereo 16-bit PCM WAV file of 0.1–120 s as one frame.

    Raises:
        ValueError: not a WAV, not 16-bit PCM, no channels, no or too much audio (a one-line reason).
        OSError: cannot be read (FIFOs and devices are refused, not read).
    """
    with open(path, "rb", opener=_open_regular) as f:
        try:
            with wave.open(f, "rb") as wav:
                width, rate, channels, frames = (wav.getsampwidth(), wav.getframerate(), wav.getnchannels(),
                                                 wav.getnframes())
                if width != 2:
                    raise ValueError(f"expected 16-bit PCM, got {8 * width}-bit")
                if channels < 1 or not 8000 <= rate <= 192000:
                    raise ValueError(f"{channels} channels at {rate} Hz is not audio knotd can use")
                if frames < rate // 10:
                    raise ValueError(f"{frames} frames: less than 0.1 s of audio")
                if frames > MAX_CLIP_S * rate:
                    raise ValueError(f"{frames / rate:.0f} s of audio: longer than {MAX_CLIP_S:.0f} s")
                data = wav.readframes(frames)
        except (wave.Error, EOFError, struct.error) as err:
            raise ValueError(f"not a 16-bit PCM WAV file ({err or type(err).__name__})") from None
    samples = np.frombuffer(data[: len(data) - len(data) % (2 * channels)], dtype=np.int16)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
    if samples.size == 0:
        raise ValueError("the file holds no audio samples")
    return rtc.AudioFrame(samples.tobytes(), rate, 1, len(samples))


def _open_regular(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def check_writable(path: Path) -> None:
    """Raise OSError unless ``path`` can be created or overwritten (checked before a session, not after)."""
    if path.is_dir():
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
    existed = path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.close(fd)
    if not existed:
        path.unlink()


def write_wav(path: Path, frames: list[rtc.AudioFrame]) -> float:
    """Write frames (same rate, mono) to a WAV file; returns its duration in seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = frames[0].sample_rate if frames else 24000
    pcm = b"".join(bytes(f.data) for f in frames)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return len(pcm) / 2 / rate


def split_frames(frame: rtc.AudioFrame, frame_ms: int = FRAME_MS) -> list[rtc.AudioFrame]:
    samples = np.frombuffer(bytes(frame.data), dtype=np.int16)
    step = frame.sample_rate * frame_ms // 1000
    out = []
    for start in range(0, len(samples), step):
        chunk = samples[start : start + step]
        if len(chunk) < step:
            chunk = np.pad(chunk, (0, step - len(chunk)))
        out.append(rtc.AudioFrame(chunk.tobytes(), frame.sample_rate, 1, step))
    return out


class ScriptedAudioInput(io.AudioInput):
    """A microphone that says the queued clips, in real time, and is silent otherwise."""

    def __init__(self, sample_rate: int = 16000) -> None:
        super().__init__(label="knotd scripted microphone")
        self._rate = sample_rate
        self._step = sample_rate * FRAME_MS // 1000
        self._silence = rtc.AudioFrame(bytes(self._step * 2), sample_rate, 1, self._step)
        self._queue: list[rtc.AudioFrame] = []
        self._next_at: float | None = None
        self._finished_playing: asyncio.Event = asyncio.Event()
        self._closed = False

    def play(self, clip: rtc.AudioFrame) -> asyncio.Event:
        """Queue a clip (any rate, mono); the returned event is set once its last frame was delivered."""
        if clip.sample_rate != self._rate:
            resampler = rtc.AudioResampler(clip.sample_rate, self._rate, num_channels=1)
            clip = rtc.combine_audio_frames([*resampler.push(clip), *resampler.flush()])
        self._queue.extend(split_frames(clip))
        self._finished_playing = asyncio.Event()
        return self._finished_playing

    def close(self) -> None:
        self._closed = True

    async def __anext__(self) -> rtc.AudioFrame:
        if self._closed:
            raise StopAsyncIteration
        now = time.monotonic()
        if self._next_at is None:
            self._next_at = now
        if self._next_at > now:
            await asyncio.sleep(self._next_at - now)
        self._next_at += FRAME_MS / 1000
        if self._queue:
            frame = self._queue.pop(0)
            if not self._queue:
                self._finished_playing.set()
            return frame
        return self._silence


@dataclass
class Segment:
    frames: list[rtc.AudioFrame] = field(default_factory=list)
    started_at: float | None = None  # wall clock of the first frame
    interrupted: bool = False

    @property
    def duration(self) -> float:
        return sum(f.duration for f in self.frames)


class RecordingAudioOutput(io.AudioOutput):
    """A speaker that records each reply segment and plays it out in (simulated) real time."""

    def __init__(self, sample_rate: int | None = None, *, realtime: bool = True) -> None:
        super().__init__(
            label="knotd recording speaker",
            capabilities=io.AudioOutputCapabilities(pause=False),
            sample_rate=sample_rate,
        )
        self.segments: list[Segment] = []
        self._current: Segment | None = None
        self._realtime = realtime
        self._playout: asyncio.Task[None] | None = None
        self._interrupt = asyncio.Event()

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._current is None:
            self._current = Segment(started_at=time.time())
            self._interrupt.clear()
            self.on_playback_started(created_at=self._current.started_at)
        self._current.frames.append(frame)

    def flush(self) -> None:
        super().flush()
        segment, self._current = self._current, None
        if segment is None:
            return
        self.segments.append(segment)
        self._playout = asyncio.create_task(self._play_out(segment))

    def clear_buffer(self) -> None:
        self._interrupt.set()

    async def _play_out(self, segment: Segment) -> None:
        duration = segment.duration
        played = duration
        if self._realtime:
            remaining = max(0.0, (segment.started_at or time.time()) + duration - time.time())
            try:
                await asyncio.wait_for(self._interrupt.wait(), remaining)
                played = min(duration, time.time() - (segment.started_at or time.time()))
                segment.interrupted = True
            except TimeoutError:
                pass
        self.on_playback_finished(playback_position=played, interrupted=segment.interrupted)
