"""One conversation on local audio instead of a LiveKit room (``knotd demo``, tests, benchmarks).

The same session code as a LiveKit job (``KnotencheckSession``): a scripted microphone says the clips after
the agent's greeting, a recording speaker keeps the agent's voice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from livekit import rtc

from knotd.agent.local_io import RecordingAudioOutput, ScriptedAudioInput
from knotd.agent.observer import SessionObserver
from knotd.agent.session import AgentResources, KnotencheckSession
from knotd.conversation.summary import SessionSummary
from knotd.errors import KnotdError
from knotd.stages import stage

REPLY_TIMEOUT_S = 60.0
LOCAL_ROOM = "demo (local audio)"


class NoReplyError(KnotdError):
    """The agent did not answer in time."""


@dataclass
class LocalConversation:
    conversation: KnotencheckSession
    speaker: RecordingAudioOutput
    record: SessionSummary
    first_reply_segment: int

    @property
    def reply_frames(self) -> list[rtc.AudioFrame]:
        """The agent's audio after its greeting: its answers to the clips."""
        return [f for seg in self.speaker.segments[self.first_reply_segment:] for f in seg.frames]


async def converse(
    shared: AgentResources,
    observer: SessionObserver,
    clips: Sequence[rtc.AudioFrame],
    *,
    session_id: str = "demo-1",
    realtime_playout: bool = True,
    tts: Any = None,
) -> LocalConversation:
    """One conversation on local audio: wait for the greeting, say each clip, wait for each answer, close.

    Args:
        shared: the ``AgentResources`` (models, rules, script).
        observer: told what happens (``knotd.bootstrap.session_observers``).
        realtime_playout: play the agent's audio out in real time (the demo) or instantly (tests).
        tts: the session's voice (``KnotencheckSession``); None builds the configured one.
    """
    mic = ScriptedAudioInput()
    speaker = RecordingAudioOutput(sample_rate=shared.settings.tts.sample_rate, realtime=realtime_playout)
    async with stage("session_start"):
        conversation = KnotencheckSession(shared, observer, session_id, LOCAL_ROOM, tts=tts)
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

    def __init__(self, conversation: KnotencheckSession) -> None:
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
                raise NoReplyError(f"the agent did not answer within {REPLY_TIMEOUT_S:.0f} s (reply {n})")
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
