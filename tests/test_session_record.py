"""What sessions.jsonl says about a session, decided by the product (``KnotencheckSession``), not by the test:
the outcome when the caller leaves ("completed" once the check reached its end, else "disconnected"), and
whether the transcript and the caller's answers are kept (``session.record_transcripts``, off by default).

Each session is the product's, on typed input with the offline scripted LLM; the caller leaves the way
livekit's RoomIO reports it (``CloseReason.PARTICIPANT_DISCONNECTED``), and the record is read back from the
sessions journal the daemon writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from livekit.agents.voice.events import CloseReason

from knotd.agent import register_plugins
from knotd.agent.session import AgentResources, KnotencheckSession
from knotd.bootstrap import session_observers
from knotd.config import Settings, SttSettings
from knotd.journal import read_records
from knotd.speech.models import load_models
from knotd.state import DaemonState

pytestmark = pytest.mark.models

# The caller's answers to the whole Knotencheck: consent, location, size, since when, changes.
WHOLE_CHECK = ("Ja, ich bin einverstanden.", "Er sitzt am Hals, neben dem Kehlkopf.", "So groß wie eine Kirsche.",
               "Seit ungefähr drei Wochen.", "Nein, keine Veränderung.")


@pytest.fixture(scope="module")
def models(model_dir):
    register_plugins()
    return load_models(Settings(stt=SttSettings(model=str(model_dir))))


@pytest.fixture
async def open_session(models, model_dir, tmp_path):
    """Start a product session with the given ``[session]`` settings; closes every one at teardown."""
    opened: list[KnotencheckSession] = []

    async def start(**session_changes) -> KnotencheckSession:
        settings = Settings(stt=SttSettings(model=str(model_dir)))
        settings = dataclasses.replace(settings, session=dataclasses.replace(
            settings.session, state_dir=str(tmp_path / "state"), **session_changes))
        state = DaemonState()
        state.bind_loop(asyncio.get_running_loop())
        session = KnotencheckSession(AgentResources.load(settings, models), session_observers(settings, state),
                                     f"record-{len(opened)}", "room-record")
        opened.append(session)
        await session.start()
        return session

    yield start
    for session in opened:
        await session.aclose("error")  # a no-op for the record once the session has finished itself


async def answer(conversation: KnotencheckSession, *texts: str) -> None:
    for text in texts:
        await conversation.session.run(user_input=text)


async def caller_leaves(conversation: KnotencheckSession, tmp_path) -> dict:
    """The caller leaves the room (as livekit's RoomIO reports it); the one record the session wrote."""
    conversation.session._close_soon(reason=CloseReason.PARTICIPANT_DISCONNECTED)
    await asyncio.wait_for(conversation.wait_closed(), 30)
    records = read_records(tmp_path / "state")
    assert len(records) == 1, records
    return records[0]


async def test_a_caller_who_leaves_after_the_whole_check_is_completed(open_session, tmp_path):
    conversation = await open_session()
    await answer(conversation, *WHOLE_CHECK)
    assert conversation.machine.current == "goodbye"

    record = await caller_leaves(conversation, tmp_path)
    assert record["outcome"] == "completed"
    assert record["final_phase"] == "goodbye"


async def test_a_caller_who_leaves_in_the_middle_of_the_check_is_disconnected(open_session, tmp_path):
    conversation = await open_session()
    await answer(conversation, *WHOLE_CHECK[:2])
    assert conversation.machine.current == "step_size"

    record = await caller_leaves(conversation, tmp_path)
    assert record["outcome"] == "disconnected"
    assert record["final_phase"] == "step_size"


async def test_by_default_the_record_keeps_neither_the_transcript_nor_the_answers(open_session, tmp_path):
    """The privacy default: whether each step was understood, never what the caller said."""
    conversation = await open_session()  # record_transcripts is off unless configured
    await answer(conversation, *WHOLE_CHECK)

    record = await caller_leaves(conversation, tmp_path)
    line = json.dumps(record, ensure_ascii=False)
    assert "transcript" not in record
    assert record["answers"] == {"location": {"understood": True}, "size": {"understood": True},
                                 "since": {"understood": True}, "changes": {"understood": True}}
    for said in ("Hals", "Kehlkopf", "Kirsche", "Wochen", "Veränderung", "einverstanden"):
        assert said not in line


async def test_with_record_transcripts_the_record_keeps_the_transcript_and_the_answers(open_session, tmp_path):
    conversation = await open_session(record_transcripts=True)
    await answer(conversation, *WHOLE_CHECK)

    record = await caller_leaves(conversation, tmp_path)
    user_lines = [line["text"] for line in record["transcript"] if line["role"] == "user"]
    assert user_lines == list(WHOLE_CHECK)
    assert any(line["role"] == "assistant" for line in record["transcript"])
    assert record["answers"]["location"] == {"understood": True, "answer": "Hals, Kehlkopf"}
    assert record["answers"]["since"] == {"understood": True, "answer": "3 Wochen"}
