"""The Knotencheck session end to end on real audio: espeak-ng speech → Silero → Whisper → guards → LLM → TTS.

Each test runs the same session code a LiveKit job runs, on local audio IO (the `knotd demo` path): the agent
greets, a scripted microphone says espeak-ng clips in real time, and the recorded agent audio, the history,
the metrics and the summary record are checked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
from livekit import rtc
from prometheus_client import REGISTRY

from knotd.agent import register_plugins
from knotd.agent.local_io import read_wav
from knotd.agent.local_session import converse
from knotd.agent.session import AgentResources, KnotencheckSession
from knotd.bootstrap import session_observers
from knotd.config import Settings, SttSettings
from knotd.journal import read_records
from knotd.speech.models import load_models
from knotd.state import DaemonState
from tests.audio import cached_clip, contains_words

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def models(model_dir):
    register_plugins()
    settings = Settings(stt=SttSettings(model=str(model_dir)))
    return load_models(settings)


@pytest.fixture
def resources(models, model_dir, tmp_path):
    def build(**llm_changes) -> AgentResources:
        settings = Settings(stt=SttSettings(model=str(model_dir)))
        settings = dataclasses.replace(
            settings,
            session=dataclasses.replace(settings.session, state_dir=str(tmp_path / "state"), record_transcripts=True),
            llm=dataclasses.replace(settings.llm, **llm_changes),
        )
        return AgentResources.load(settings, models)

    return build


def clip(text: str) -> rtc.AudioFrame:
    """An espeak-ng clip with a second of silence after it, so the VAD sees the end of speech."""
    frame = read_wav(cached_clip(text))
    silence = np.zeros(frame.sample_rate, dtype=np.int16)
    pcm = np.concatenate([np.frombuffer(bytes(frame.data), dtype=np.int16), silence])
    return rtc.AudioFrame(pcm.tobytes(), frame.sample_rate, 1, len(pcm))


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def history(result) -> list[tuple[str, str]]:
    return [(item.role, item.text_content or "") for item in result.conversation.session.history.items
            if getattr(item, "role", None) in ("user", "assistant")]


async def test_spoken_answers_walk_the_knotencheck_and_are_recorded(resources, tmp_path):
    shared = resources()
    state = DaemonState()
    state.bind_loop(asyncio.get_running_loop())
    e2e_before = sample("knotd_turn_latency_seconds_count", {"component": "e2e"})
    step_before = sample("knotd_phase_transitions_total", {"phase": "step_location"})

    result = await converse(
        shared, session_observers(shared.settings, state),
        [clip("Ja, ich bin einverstanden."), clip("Er sitzt am Hals, neben dem Kehlkopf.")],
        realtime_playout=False,
    )

    said = history(result)
    user_lines = [text for role, text in said if role == "user"]
    assert len(user_lines) == 2
    assert contains_words(user_lines[0], ("einverstanden",))
    # espeak's "Hals" is hard for Whisper base ("Pals", "Tampals"); any answer moves the location step on.
    assert len(user_lines[1].split()) >= 3
    agent_lines = [text for role, text in said if role == "assistant"]
    assert "einverstanden" in agent_lines[0].lower()  # the greeting asks for consent
    assert "wo genau" in agent_lines[1].lower()  # consent given: the first check step
    assert "wie groß" in agent_lines[2].lower()  # location given: the size step

    reply = np.frombuffer(b"".join(bytes(f.data) for f in result.reply_frames), dtype=np.int16)
    assert reply.size > 0 and np.abs(reply).max() > 1000  # the agent answered with audible speech

    record = read_records(tmp_path / "state")[-1]
    assert record == {**record, "session_id": "demo-1", "outcome": "completed", "turns": 3}
    assert record["phases_reached"][:4] == ["greeting", "consent", "step_location", "step_size"]
    assert record["latency_s"]["e2e"]["n"] == 2 and record["latency_s"]["e2e"]["p50"] > 0
    assert [t["role"] for t in record["transcript"]] == ["assistant", "user", "assistant", "user", "assistant"]
    assert sample("knotd_turn_latency_seconds_count", {"component": "e2e"}) == e2e_before + 2
    assert sample("knotd_phase_transitions_total", {"phase": "step_location"}) == step_before + 1
    assert state.sessions == {}
    assert state.finished[-1].outcome == "completed"


async def test_emergency_words_get_the_urgent_reply_without_asking_the_llm(resources, tmp_path):
    shared = resources()
    state = DaemonState()
    state.bind_loop(asyncio.get_running_loop())
    hits_before = sample("knotd_guardrail_hits_total", {"direction": "input", "rule": "emergency"})

    result = await converse(
        shared, session_observers(shared.settings, state), [clip("Ich habe Schmerzen und bekomme keine Luft.")],
        realtime_playout=False,
    )

    answer = [text for role, text in history(result) if role == "assistant"][-1]
    assert "112" in answer
    assert sample("knotd_guardrail_hits_total", {"direction": "input", "rule": "emergency"}) == hits_before + 1
    record = result.record
    assert record.guardrail.hits == {"input": {"emergency": 1}}
    assert "step_location" not in record.phases_reached


async def test_unsafe_llm_output_never_reaches_the_speaker_or_the_transcript(resources):
    from knotd.agent.tts import EspeakTTS
    from tests.openai_standin import OpenAIStandin

    spoken: list[str] = []

    class RecordingTTS(EspeakTTS):
        """The real espeak-ng TTS, remembering every text it was asked to speak."""

        def synthesize(self, text, **kwargs):
            spoken.append(text)
            return super().synthesize(text, **kwargs)

    unsafe = "Das ist sicher nur eine harmlose Zyste. Nehmen Sie einfach Ibuprofen dagegen."
    async with OpenAIStandin(reply=unsafe) as llm_server:
        shared = resources(base_url=llm_server.base_url, model=llm_server.model, timeout_s=10.0)
        state = DaemonState()
        state.bind_loop(asyncio.get_running_loop())
        result = await converse(shared, session_observers(shared.settings, state), [], realtime_playout=False,
                                tts=RecordingTTS(shared.settings.tts))

    assert llm_server.requests, "the endpoint LLM was asked"
    everything_said = " ".join(spoken) + " " + json.dumps(history(result), ensure_ascii=False)
    assert "Ibuprofen" not in everything_said and "harmlos" not in everything_said
    assert spoken, "the agent still said something: the guardrail's reply"
    assert sum(result.record.guardrail.hits.get("output", {}).values()) == 1


class FakeParticipant:
    def __init__(self, identity: str) -> None:
        self.identity = identity


class FakeLocalParticipant:
    """Records what the session publishes; can be told to fail, like a room losing its connection."""

    def __init__(self) -> None:
        self.attributes: dict[str, str] = {}
        self.published: list[tuple[dict, str, list[str]]] = []
        self.failures_left = 0

    async def set_attributes(self, attributes: dict[str, str]) -> None:
        self.attributes.update(attributes)

    async def publish_data(self, payload: bytes, *, reliable: bool, topic: str, destination_identities: list[str]):
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionError("publish failed")
        self.published.append((json.loads(payload), topic, list(destination_identities)))


class FakeRoom(rtc.EventEmitter):
    """Stands in for rtc.Room's participant events (no LiveKit server can run here)."""

    def __init__(self) -> None:
        super().__init__()
        self.local_participant = FakeLocalParticipant()

    def isconnected(self) -> bool:
        return True


async def wait_until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_phase_is_published_and_rebroadcast_when_a_participant_reconnects(resources):
    state = DaemonState()
    state.bind_loop(asyncio.get_running_loop())
    shared = resources()
    conversation = KnotencheckSession(shared, session_observers(shared.settings, state), "s-phase", "room-1")
    room = FakeRoom()
    conversation.attach_room(room)
    published = room.local_participant.published

    conversation.machine.respond(None)  # the opening: greeting, then straight on to consent
    await wait_until(lambda: len(published) >= 1)
    assert [(m["phase"], m["previous"], topic, to) for m, topic, to in published] == [
        ("consent", "greeting", "knotd.phase", [])]  # to everyone in the room
    assert room.local_participant.attributes == {"knotd.phase": "consent"}

    room.emit("participant_connected", FakeParticipant("caller"))  # the caller's app reconnects
    await wait_until(lambda: len(published) >= 2)
    message, topic, to = published[1]
    assert (message["phase"], topic, to) == ("consent", "knotd.phase", ["caller"])
    assert message["reached"] == ["greeting", "consent"]
    record = await conversation.aclose("disconnected")
    assert record.phases_reached == ("greeting", "consent")


async def test_a_failing_bridged_handler_is_counted_and_the_session_goes_on(resources):
    state = DaemonState()
    state.bind_loop(asyncio.get_running_loop())
    shared = resources()
    conversation = KnotencheckSession(shared, session_observers(shared.settings, state), "s-fail", "room-2")
    room = FakeRoom()
    conversation.attach_room(room)
    failed = {"handler": "participant_connected", "outcome": "failed"}
    before = sample("knotd_handler_tasks_total", failed)

    room.local_participant.failures_left = 1
    room.emit("participant_connected", FakeParticipant("caller"))
    await wait_until(lambda: sample("knotd_handler_tasks_total", failed) == before + 1)
    assert [(f.handler, f.exception) for f in state.failures] == [("participant_connected", "ConnectionError")]
    assert state.sessions["s-fail"].task_failures == 1

    room.emit("participant_connected", FakeParticipant("caller"))  # the next event is handled normally
    await wait_until(lambda: len(room.local_participant.published) == 1)
    record = await conversation.aclose("disconnected")
    assert record.task_failures == 1
