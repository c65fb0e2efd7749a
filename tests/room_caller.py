"""A caller in a real LiveKit room: the livekit Python rtc SDK (a real WebRTC client), as a phone or browser is.

`Caller` joins a room with a token, keeps a microphone track publishing in real time (silence between
utterances, as a real microphone sends), records every audio frame the agent sends with the wall-clock time it
arrived, and collects what the agent publishes besides audio: `knotd.phase` data messages, the agent's
participant attributes and the transcription text streams (`lk.transcription`).

`say()` queues speech on the microphone and returns when its last frame has been captured, with the time
that happened: the end of the caller's speech, from which voice-to-voice latency is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from livekit import rtc

FRAME_MS = 20
# A received frame whose loudest sample is above this counts as audible (espeak-ng speaks far above it;
# Opus coding noise on silence stays far below).
AUDIBLE = 500
PHASE_TOPIC = "knotd.phase"


@dataclass
class Received:
    at: float
    peak: int
    samples: int
    sample_rate: int


@dataclass
class Transcript:
    identity: str
    text: str
    final: bool
    track_id: str


@dataclass
class Caller:
    """One participant. `await join(url, token)`, talk, then `await leave()`."""

    identity: str
    sample_rate: int = 48000
    channels: int = 1
    room: rtc.Room = field(default_factory=rtc.Room)
    frames: list[Received] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)
    transcripts: list[Transcript] = field(default_factory=list)
    agent_identity: str | None = None

    def __post_init__(self) -> None:
        self._pending: list[np.ndarray] = []
        self._spoken = asyncio.Event()
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._mic: rtc.AudioSource | None = None
        self.mic_track_sid = ""
        self.joined_at = 0.0

    # -- joining ------------------------------------------------------------------------------------
    async def join(self, url: str, token: str, *, microphone: bool = True) -> None:
        room = self.room
        room.on("track_subscribed", self._on_track)
        room.on("data_received", self._on_data)
        room.on("participant_connected", self._on_participant)
        room.on("participant_attributes_changed", lambda changed, p: self._touch())
        room.on("disconnected", lambda *_: self._touch())
        room.register_text_stream_handler("lk.transcription", self._on_text_stream)
        self.joined_at = time.time()
        await room.connect(url, token, options=rtc.RoomOptions(auto_subscribe=True))
        for participant in room.remote_participants.values():
            self._on_participant(participant)
        if microphone:
            self._mic = rtc.AudioSource(self.sample_rate, self.channels)
            track = rtc.LocalAudioTrack.create_audio_track("microphone", self._mic)
            options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
            publication = await room.local_participant.publish_track(track, options)
            self.mic_track_sid = publication.sid
            self._spawn(self._pump_microphone())

    async def leave(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.room.disconnect()
        if self._mic is not None:
            with contextlib.suppress(Exception):
                await self._mic.aclose()

    # -- speaking -----------------------------------------------------------------------------------
    async def say(self, pcm: np.ndarray, sample_rate: int) -> float:
        """Speak int16 mono `pcm` (any rate; resampled, duplicated to the track's channels) in real time.

        Returns the wall-clock time the last frame of it was captured: the end of the caller's speech.
        """
        samples = _resample(pcm, sample_rate, self.sample_rate)
        self._spoken.clear()
        self._pending.append(samples)
        await self._spoken.wait()
        return self._spoken_at

    async def _pump_microphone(self) -> None:
        assert self._mic is not None
        per_frame = self.sample_rate * FRAME_MS // 1000
        silence = np.zeros(per_frame, dtype=np.int16)
        started = time.monotonic()
        sent = 0
        current: np.ndarray | None = None
        offset = 0
        while True:
            if current is None and self._pending:
                current, offset = self._pending.pop(0), 0
            if current is not None:
                chunk = current[offset:offset + per_frame]
                offset += per_frame
                if chunk.size < per_frame:
                    chunk = np.concatenate([chunk, silence[: per_frame - chunk.size]])
            else:
                chunk = silence
            data = np.repeat(chunk, self.channels) if self.channels > 1 else chunk
            await self._mic.capture_frame(rtc.AudioFrame(data.tobytes(), self.sample_rate, self.channels, per_frame))
            if current is not None and offset >= current.size:
                current = None
                self._spoken_at = time.time()
                self._spoken.set()
            sent += 1
            # Real time: the source's own queue would let a burst through; pace to the wall clock.
            delay = started + sent * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def send_chat(self, text: str) -> None:
        """Type `text` into the room chat (the text stream agents read)."""
        await self.room.local_participant.send_text(text, topic="lk.chat")

    # -- what arrives -------------------------------------------------------------------------------
    def _on_participant(self, participant: rtc.RemoteParticipant) -> None:
        if participant.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            self.agent_identity = participant.identity
        self._touch()

    def _on_track(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                  participant: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO and participant.identity == self.agent_identity:
            self._spawn(self._record(track))

    async def _record(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=48000, num_channels=1)
        try:
            async for event in stream:
                frame = event.frame
                samples = np.frombuffer(bytes(frame.data), dtype=np.int16)
                peak = int(np.abs(samples).max()) if samples.size else 0
                self.frames.append(Received(time.time(), peak, frame.samples_per_channel, frame.sample_rate))
                if peak > AUDIBLE:
                    self._touch()
        finally:
            await stream.aclose()

    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.topic == PHASE_TOPIC:
            self.phases.append(json.loads(packet.data.decode("utf-8")))
            self._touch()

    def _on_text_stream(self, reader: rtc.TextStreamReader, identity: str) -> None:
        self._spawn(self._read_text(reader, identity))

    async def _read_text(self, reader: rtc.TextStreamReader, identity: str) -> None:
        text = await reader.read_all()
        attributes = reader.info.attributes or {}
        self.transcripts.append(Transcript(identity, text, attributes.get("lk.transcription_final") == "true",
                                           attributes.get("lk.transcribed_track_id", "")))
        self._touch()

    # -- waiting ------------------------------------------------------------------------------------
    def _touch(self) -> None:
        self._changed.set()

    async def wait_until(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        """Wait for `condition()` to hold, woken by whatever arrives; AssertionError naming `what` otherwise."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.identity}: no {what} within {timeout:.0f} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    def audible_after(self, since: float) -> list[Received]:
        return [f for f in self.frames if f.at >= since and f.peak > AUDIBLE]

    def first_audible_after(self, since: float) -> float | None:
        audible = self.audible_after(since)
        return audible[0].at if audible else None

    def audible_seconds(self, since: float = 0.0) -> float:
        return sum(f.samples / f.sample_rate for f in self.audible_after(since))

    def quiet_since(self, seconds: float) -> bool:
        """True when the agent has sent no audible frame for `seconds` (it has finished speaking)."""
        audible = self.audible_after(0.0)
        return bool(audible) and time.time() - audible[-1].at >= seconds

    def user_transcripts(self) -> list[str]:
        return [t.text for t in self.transcripts if t.final and t.track_id == self.mic_track_sid and t.text]

    def agent_attributes(self) -> dict[str, str]:
        for participant in self.room.remote_participants.values():
            if participant.identity == self.agent_identity:
                return dict(participant.attributes)
        return {}

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _resample(pcm: np.ndarray, rate: int, to_rate: int) -> np.ndarray:
    if rate == to_rate:
        return pcm.astype(np.int16)
    positions = np.arange(0, pcm.size * to_rate / rate) * rate / to_rate
    return np.interp(positions, np.arange(pcm.size), pcm.astype(np.float32)).astype(np.int16)
