"""The agent's LLMs in a real livekit AgentSession (text mode): the scripted default and an OpenAI-compatible
endpoint (tests/openai_standin.py) with its failures answered by the fallback line."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
from livekit.agents import Agent, AgentSession, llm
from livekit.agents.metrics import LLMMetrics
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from knotd.agent.llm import FallbackOnError, ScriptedLLM, build_llm
from knotd.config import LlmSettings, Secret
from knotd.conversation.phases import PhaseMachine, PhaseScript
from tests.openai_standin import OpenAIStandin

ENDPOINT_REPLY = "Gern. Wo genau haben Sie den Knoten ertastet?"
FALLBACK = LlmSettings().fallback_line
API_KEY = "sk-knotd-test-4b1d9e"


@pytest.fixture(scope="module")
def script() -> PhaseScript:
    return PhaseScript.load()


@pytest.fixture
def machine(script) -> PhaseMachine:
    return PhaseMachine(script)


@pytest.fixture
async def endpoint() -> AsyncIterator[OpenAIStandin]:
    async with OpenAIStandin(model="smollm2", reply=ENDPOINT_REPLY) as standin:
        yield standin


def endpoint_settings(base_url: str, **overrides) -> LlmSettings:
    values = {"base_url": base_url, "model": "smollm2", "api_key": Secret(API_KEY), "max_tokens": 64,
              "timeout_s": 2.0, **overrides}
    return LlmSettings(**values)


@contextlib.asynccontextmanager
async def text_session(agent_llm: llm.LLM, instructions: str) -> AsyncIterator[AgentSession]:
    """A real AgentSession with no room, audio, VAD or turn detector: text in, text out."""
    async with AgentSession(llm=agent_llm, vad=None, turn_handling={"turn_detection": None}) as session:
        await session.start(Agent(instructions=instructions))
        yield session


async def reply_to(session: AgentSession, text: str) -> llm.ChatMessage:
    """Run one user turn and return the agent's reply message."""
    result = await session.run(user_input=text)
    return result.expect.next_event().is_message(role="assistant").event().item


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("knotd_llm_failures_total", {"reason": reason}) or 0.0


# --- scripted ------------------------------------------------------------------------------------------------


async def test_scripted_llm_walks_greeting_consent_and_steps_in_an_agent_session(script, machine):
    """1. The user opens; 2. agrees; 3.-6. answers the steps.
    Result: each reply is the script's line for the next phase, ending in the summary and goodbye."""
    async with text_session(ScriptedLLM(machine), script.instructions) as session:
        opening = await reply_to(session, "Hallo, ich möchte einen Knotencheck machen.")
        assert opening.text_content == f"{script.phase('greeting').say} {script.phase('consent').say}"
        assert machine.current == "consent"

        assert (await reply_to(session, "Ja, ich bin einverstanden.")).text_content == script.phase(
            "step_location").say
        assert (await reply_to(session, "Am Hals.")).text_content == script.phase("step_size").say
        assert (await reply_to(session, "Etwa erbsengroß.")).text_content == script.phase("step_since").say
        assert (await reply_to(session, "Seit zwei Wochen.")).text_content == script.phase("step_changes").say
        last = await reply_to(session, "Nein, keine Veränderungen.")
        assert "Ort: Am Hals. Größe: Etwa erbsengroß." in last.text_content
        assert last.text_content.endswith(script.phase("goodbye").say)
    assert machine.reached()[-3:] == ["step_changes", "summary", "goodbye"]


async def test_scripted_llm_reports_time_to_first_token(script, machine):
    """livekit measures the scripted stream like a real LLM: LLMMetrics.ttft and the turn's llm_node_ttft."""
    scripted = ScriptedLLM(machine)
    seen: list[LLMMetrics] = []
    scripted.on("metrics_collected", seen.append)
    async with text_session(scripted, script.instructions) as session:
        message = await reply_to(session, "Hallo")
    assert len(seen) == 1 and seen[0].ttft >= 0 and seen[0].label.endswith("ScriptedLLM")
    assert message.metrics.get("llm_node_ttft", -1) >= 0


async def test_scripted_llm_streams_a_reply_in_several_chunks(script, machine):
    """The line arrives in word chunks that add up to the whole line."""
    stream = ScriptedLLM(machine, words_per_chunk=3).chat(chat_ctx=llm.ChatContext.empty())
    async with stream:
        pieces = [chunk.delta.content async for chunk in stream if chunk.delta]
    assert len(pieces) > 5
    assert "".join(pieces) == f"{script.phase('greeting').say} {script.phase('consent').say}"


def test_build_llm_without_base_url_is_the_scripted_llm(machine):
    """No endpoint configured: the offline scripted LLM."""
    assert isinstance(build_llm(LlmSettings(), machine), ScriptedLLM)


# --- OpenAI-compatible endpoint ------------------------------------------------------------------------------


async def test_endpoint_reply_is_streamed_with_model_max_tokens_and_phase_guidance(script, machine, endpoint):
    """The endpoint's streamed reply is the agent's reply; the request names the model, caps the tokens both
    ways (llama.cpp reads only max_tokens) and carries the scripted line as guidance."""
    agent_llm = build_llm(endpoint_settings(endpoint.base_url), machine)
    assert isinstance(agent_llm, FallbackOnError)
    async with text_session(agent_llm, script.instructions) as session:
        message = await reply_to(session, "Hallo")
    assert message.text_content == ENDPOINT_REPLY
    body = endpoint.requests[-1]
    assert body["model"] == "smollm2" and body["stream"] is True
    assert body["max_tokens"] == 64 and body["max_completion_tokens"] == 64
    assert body["messages"][0] == {"role": "system", "content": script.instructions}
    assert body["messages"][-1]["role"] == "system"
    assert script.phase("consent").say in body["messages"][-1]["content"]
    assert endpoint.authorization[-1] == f"Bearer {API_KEY}"
    assert machine.current == "consent"


async def test_endpoint_http_500_speaks_fallback_counts_it_and_next_turn_works(script, machine, endpoint):
    """1. The endpoint answers 500 (also on livekit's one retry). 2. It recovers.
    Result: the agent says the fallback line, the failure is counted as http_error, the phase waits;
    the next turn gets the endpoint's reply and the phase moves on."""
    before = failures("http_error")
    async with text_session(build_llm(endpoint_settings(endpoint.base_url), machine), "x") as session:
        endpoint.mode = "http_500"
        assert (await reply_to(session, "Hallo")).text_content == FALLBACK
        assert failures("http_error") == before + 1
        assert len(endpoint.requests) == 2  # one retry, then the fallback
        assert machine.current == "greeting" and not machine.is_started

        endpoint.mode = "normal"
        assert (await reply_to(session, "Hallo?")).text_content == ENDPOINT_REPLY
    assert machine.current == "consent"


async def test_endpoint_stall_falls_back_after_the_timeout(machine, endpoint):
    """An endpoint that accepts the request and never answers is cut off at timeout_s."""
    endpoint.mode = "stall"
    before = failures("timeout")
    async with text_session(build_llm(endpoint_settings(endpoint.base_url, timeout_s=0.5), machine), "x") as s:
        assert (await reply_to(s, "Hallo")).text_content == FALLBACK
        assert failures("timeout") == before + 1
        endpoint.mode = "normal"
        assert (await reply_to(s, "Hallo")).text_content == ENDPOINT_REPLY


async def test_first_token_later_than_the_timeout_falls_back(machine, endpoint):
    """Headers arrive at once but the first token does not within timeout_s: a stall all the same."""
    endpoint.mode, endpoint.first_token_delay_s = "slow_first_token", 30.0
    before = failures("timeout")
    async with text_session(build_llm(endpoint_settings(endpoint.base_url, timeout_s=0.5), machine), "x") as s:
        assert (await reply_to(s, "Hallo")).text_content == FALLBACK
    assert failures("timeout") == before + 1


async def test_keepalives_without_text_do_not_extend_the_time_to_first_token(machine, endpoint):
    """A server that keeps the stream alive but never sends text resets every HTTP read timeout; the bound
    on time to first text still ends the wait at timeout_s."""
    endpoint.mode = "keepalive"
    before = failures("timeout")
    async with text_session(build_llm(endpoint_settings(endpoint.base_url, timeout_s=0.5), machine), "x") as s:
        assert (await reply_to(s, "Hallo")).text_content == FALLBACK
    assert failures("timeout") == before + 1


async def test_connection_dropped_mid_reply_ends_with_the_fallback_line(machine, endpoint):
    """The endpoint sends a first chunk and hangs up: the partial text is followed by the fallback line."""
    endpoint.mode = "drop"
    before = failures("connection")
    async with text_session(build_llm(endpoint_settings(endpoint.base_url), machine), "x") as session:
        text = (await reply_to(session, "Hallo")).text_content
    first_chunk = " ".join(ENDPOINT_REPLY.split(" ")[:endpoint.words_per_chunk])
    assert text.startswith(first_chunk) and text.endswith(f"… {FALLBACK}")
    assert failures("connection") == before + 1


async def test_connection_refused_falls_back_without_logging_the_key(machine):
    """Nothing listens at base_url: fallback line, reason connection, and the API key appears in no log."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # bound, never listening: refused
        before = failures("connection")
        with capture_logs() as logs:
            async with text_session(build_llm(endpoint_settings(url), machine), "x") as session:
                assert (await reply_to(session, "Hallo")).text_content == FALLBACK
    assert failures("connection") == before + 1
    assert [e for e in logs if e["event"] == "llm_failed"]
    assert API_KEY not in repr(logs)
