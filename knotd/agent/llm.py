"""The Knotencheck agent's LLMs, all behind livekit's ``llm.LLM`` interface.

- ``ScriptedLLM``: the offline default. It walks the phase script deterministically (the answer is the
  latest user text in the chat context) and streams the scripted German line in word chunks.
- ``PhaseGuidedLLM``: wraps an endpoint LLM so it follows the same script: each request gets the phase's
  line as guidance, and the phase moves on only once the endpoint actually answers.
- ``FallbackOnError``: wraps an endpoint LLM so a failed, stalled or timed-out request is answered with the
  configured fallback line instead of an error; the failure is counted in ``knotd_llm_failures_total``
  and the session carries on.
- ``build_llm()`` picks between them from ``Settings.llm``.

``livekit.plugins.openai`` registers itself at import and livekit only allows that on the main thread:
``knotd.agent.register_plugins(settings)`` imports it there when an endpoint is configured (it costs ≈ 1 s of
start-up on 2 cores, so the scripted default never imports it).

What this module does not do: guardrails (the session's ``Agent.llm_node`` wrapper checks this output),
tool calls (the Knotencheck script has none), or choosing a model.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, ClassVar

import structlog
from livekit.agents import APIConnectionError, APIError, APIStatusError, APITimeoutError, llm, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from knotd import metrics
from knotd.config import LlmSettings
from knotd.conversation.phases import IllegalTransition, PhaseMachine, Reply

log = structlog.get_logger(__name__)

FAILURE_REASONS = ("timeout", "http_error", "connection", "other")
# livekit retries a failed request itself; one retry rides out a blip without stretching a stall.
ENDPOINT_MAX_RETRY = 1
ENDPOINT_RETRY_INTERVAL_S = 0.5

_WORD = re.compile(r"\S+\s*")


def latest_user_message(chat_ctx: llm.ChatContext) -> llm.ChatMessage | None:
    """The newest user message if the agent has not spoken since, else None."""
    for item in reversed(chat_ctx.items):
        if isinstance(item, llm.ChatMessage) and item.role in ("user", "assistant"):
            return item if item.role == "user" else None
    return None


def latest_user_answer(chat_ctx: llm.ChatContext) -> str | None:
    """The user's text since the agent last spoke (several user messages are joined), or None.

    None means there is nothing new to answer: the conversation opens, or a reply is requested again.
    """
    parts: list[str] = []
    for item in reversed(chat_ctx.items):
        if not isinstance(item, llm.ChatMessage):
            continue
        if item.role == "assistant":
            break
        if item.role == "user" and item.text_content:
            parts.append(item.text_content)
    return " ".join(reversed(parts)) or None


def _chunks(text: str, words_per_chunk: int) -> list[str]:
    words = _WORD.findall(text)
    return ["".join(words[i:i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]


# --- scripted -----------------------------------------------------------------------------------------------


class ScriptedLLM(llm.LLM):
    """Answers from the Knotencheck phase script; deterministic, offline, instant.

    Each ``chat()`` advances ``machine`` by the latest user answer (``PhaseMachine.respond``) and streams the
    resulting line. The line is fixed when ``chat()`` is called, so livekit's retries replay the same text.

    Args:
        machine: this session's phase machine.
        words_per_chunk: how many words each streamed chunk carries.
    """

    def __init__(self, machine: PhaseMachine, *, words_per_chunk: int = 4) -> None:
        super().__init__()
        self._machine = machine
        self._words_per_chunk = words_per_chunk

    @property
    def model(self) -> str:
        return "knotencheck-script"

    @property
    def provider(self) -> str:
        return "knotd"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        reply = self._machine.respond(latest_user_answer(chat_ctx))
        return _TextStream(self, text=reply.text, words_per_chunk=self._words_per_chunk, chat_ctx=chat_ctx,
                           tools=tools or [], conn_options=conn_options)


class _TextStream(llm.LLMStream):
    """Streams a fixed text as assistant chunks; livekit's metrics task measures it like any LLM."""

    def __init__(self, llm_: llm.LLM, *, text: str, words_per_chunk: int, chat_ctx: llm.ChatContext,
                 tools: list[llm.Tool], conn_options: APIConnectOptions) -> None:
        super().__init__(llm_, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._text = text
        self._words_per_chunk = words_per_chunk

    async def _run(self) -> None:
        request_id = utils.shortuuid("script_")
        for piece in _chunks(self._text, self._words_per_chunk):
            self._event_ch.send_nowait(
                llm.ChatChunk(id=request_id, delta=llm.ChoiceDelta(role="assistant", content=piece))
            )
            await asyncio.sleep(0)  # let the consumer start on the first words


# --- wrappers around an endpoint LLM ------------------------------------------------------------------------


class _Wrapper(llm.LLM):
    """An LLM that delegates to ``inner``; reports the inner model and provider in metrics."""

    def __init__(self, inner: llm.LLM) -> None:
        super().__init__()
        self.inner = inner

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def provider(self) -> str:
        return self.inner.provider

    def prewarm(self, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.inner.prewarm(loop=loop)

    async def aclose(self) -> None:
        await super().aclose()
        await self.inner.aclose()


class _WrapperStream(llm.LLMStream):
    # Like livekit's FallbackAdapter: the inner stream opens its own request and attempt spans.
    _llm_attempt_span_name: ClassVar[str | None] = None
    _genai_operation_name: ClassVar[str | None] = None

    def __init__(self, llm_: _Wrapper, *, chat_ctx: llm.ChatContext, tools: list[llm.Tool],
                 conn_options: APIConnectOptions, chat_kwargs: dict[str, Any]) -> None:
        # The wrapper itself never retries: retries happen inside the inner stream.
        super().__init__(llm_, chat_ctx=chat_ctx, tools=tools,
                         conn_options=APIConnectOptions(max_retry=0, timeout=conn_options.timeout))
        self._inner_conn_options = conn_options
        self._chat_kwargs = chat_kwargs

    def _open_inner(self, chat_ctx: llm.ChatContext) -> llm.LLMStream:
        wrapper: _Wrapper = self._llm  # type: ignore[assignment]
        return wrapper.inner.chat(chat_ctx=chat_ctx, tools=self._tools, conn_options=self._inner_conn_options,
                                  **self._chat_kwargs)


def _chat_kwargs(parallel_tool_calls: NotGivenOr[bool], tool_choice: NotGivenOr[llm.ToolChoice],
                 extra_kwargs: NotGivenOr[dict[str, Any]]) -> dict[str, Any]:
    return {"parallel_tool_calls": parallel_tool_calls, "tool_choice": tool_choice, "extra_kwargs": extra_kwargs}


class PhaseGuidedLLM(_Wrapper):
    """Makes an endpoint LLM follow the phase script.

    Each request plans the scripted reply for the latest user answer and appends it to a copy of the chat
    context as a system message (the script's ``guidance``), so the model says the step's line in its own
    words. The plan is committed (the phase moves on) when the first text arrives: a request that fails
    leaves the phase where it was, so the user can simply answer again.
    """

    def __init__(self, inner: llm.LLM, machine: PhaseMachine) -> None:
        super().__init__(inner)
        self._machine = machine

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        reply = self._machine.plan(latest_user_answer(chat_ctx))
        guided = chat_ctx.copy()
        guided.add_message(role="system", content=self._machine.guidance(reply))
        return _PhaseGuidedStream(self, machine=self._machine, reply=reply, guided_ctx=guided, chat_ctx=chat_ctx,
                                  tools=tools or [], conn_options=conn_options,
                                  chat_kwargs=_chat_kwargs(parallel_tool_calls, tool_choice, extra_kwargs))


class _PhaseGuidedStream(_WrapperStream):
    def __init__(self, llm_: PhaseGuidedLLM, *, machine: PhaseMachine, reply: Reply, guided_ctx: llm.ChatContext,
                 **kwargs: Any) -> None:
        super().__init__(llm_, **kwargs)
        self._machine = machine
        self._reply = reply
        self._guided_ctx = guided_ctx

    async def _run(self) -> None:
        is_committed = False
        async with self._open_inner(self._guided_ctx) as stream:
            async for chunk in stream:
                if not is_committed and chunk.has_response():
                    is_committed = True
                    self._commit()
                self._event_ch.send_nowait(chunk)

    def _commit(self) -> None:
        try:
            self._machine.commit(self._reply)
        except IllegalTransition:
            # The phase moved while the request ran (e.g. an emergency redirect); that move wins.
            log.warning("phase_plan_stale", phase=self._machine.current, planned=list(self._reply.path))


class FallbackOnError(_Wrapper):
    """Answers with ``fallback_line`` when the inner LLM fails, stalls or times out; the session carries on.

    The first text must arrive within ``timeout_s`` of the request (livekit's retries included), and after
    that no gap between chunks may exceed ``timeout_s``. A failure is logged (reason and exception type only:
    messages can carry URLs or keys), passed to ``on_failure(reason)`` and replaced by the fallback line; if
    part of the reply was already streamed, the line follows it after a pause ("… ").

    Args:
        inner: the endpoint LLM.
        fallback_line: what the agent says instead.
        timeout_s: the bound on time to first text and on gaps between chunks.
        max_retry: livekit retries of the inner request (keep it low: they share ``timeout_s``).
        on_failure: called with the reason (timeout, http_error, connection, other); counts by default.
    """

    def __init__(self, inner: llm.LLM, *, fallback_line: str, timeout_s: float, max_retry: int = ENDPOINT_MAX_RETRY,
                 retry_interval_s: float = ENDPOINT_RETRY_INTERVAL_S,
                 on_failure: Callable[[str], None] | None = None) -> None:
        super().__init__(inner)
        self.fallback_line = fallback_line
        self.timeout_s = timeout_s
        self.inner_conn_options = APIConnectOptions(max_retry=max_retry, retry_interval=retry_interval_s,
                                                    timeout=timeout_s)
        self._on_failure = on_failure or record_llm_failure

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        # The session's conn_options are replaced by ours: the timeout and retries are knotd's policy.
        return _FallbackStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=self.inner_conn_options,
                               chat_kwargs=_chat_kwargs(parallel_tool_calls, tool_choice, extra_kwargs))

    def report_failure(self, reason: str) -> None:
        self._on_failure(reason)


class _FallbackStream(_WrapperStream):
    async def _run(self) -> None:
        wrapper: FallbackOnError = self._llm  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wrapper.timeout_s
        has_content = False
        try:
            async with self._open_inner(self._chat_ctx) as stream:
                while True:
                    budget = wrapper.timeout_s if has_content else max(deadline - loop.time(), 0.0)
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), timeout=budget)
                    except StopAsyncIteration:
                        return
                    has_content = has_content or chunk.has_response()
                    self._event_ch.send_nowait(chunk)
        # livekit's openai plugin turns every transport or parsing failure into an APIError; TimeoutError is
        # our own bound. Anything else is a bug in knotd and should surface, not be spoken over.
        except (APIError, TimeoutError, OSError) as err:
            reason = failure_reason(err)
            log.warning("llm_failed", reason=reason, error=type(err).__name__, cause=_root_type(err),
                        status=_status_code(err),
                        after_text=has_content, timeout_s=wrapper.timeout_s, model=wrapper.model)
            wrapper.report_failure(reason)
            line = f"… {wrapper.fallback_line}" if has_content else wrapper.fallback_line
            self._event_ch.send_nowait(
                llm.ChatChunk(id=utils.shortuuid("fallback_"), delta=llm.ChoiceDelta(role="assistant", content=line))
            )


def _chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def failure_reason(err: BaseException) -> str:
    """Classify a failed request: timeout, http_error (a 4xx/5xx answer), connection, or other."""
    chain = _chain(err)
    if any(isinstance(e, (TimeoutError, APITimeoutError)) for e in chain):
        return "timeout"
    if any(isinstance(e, APIStatusError) for e in chain):
        return "http_error"
    if any(isinstance(e, (APIConnectionError, ConnectionError, OSError)) for e in chain):
        return "connection"
    return "other"


def _status_code(err: BaseException) -> int | None:
    return next((e.status_code for e in _chain(err) if isinstance(e, APIStatusError)), None)


def _root_type(err: BaseException) -> str:
    """The innermost exception type, for the log (CancelledError is how wait_for times out: not a cause)."""
    causes = [e for e in _chain(err) if not isinstance(e, asyncio.CancelledError)]
    return type(causes[-1]).__name__


def record_llm_failure(reason: str) -> None:
    """Count one failed LLM request in ``knotd_llm_failures_total{reason}``."""
    metrics.LLM_FAILURES.labels(reason=reason).inc()


def initialise_metrics() -> None:
    """Create every ``knotd_llm_failures_total`` series at zero."""
    for reason in FAILURE_REASONS:
        metrics.LLM_FAILURES.labels(reason=reason)


# --- factory ------------------------------------------------------------------------------------------------


def build_llm(settings: LlmSettings, machine: PhaseMachine) -> llm.LLM:
    """The session's LLM: scripted when ``settings.base_url`` is empty, else the endpoint, phase-guided and
    wrapped in ``FallbackOnError``. Cheap: call it once per session."""
    if not settings.base_url:
        return ScriptedLLM(machine)
    from livekit.plugins import openai as lk_openai  # registered on the main thread by register_plugins()

    endpoint = lk_openai.LLM(
        model=settings.model,
        base_url=settings.base_url,
        # The OpenAI client insists on a key; local servers (llama.cpp) ignore it.
        api_key=settings.api_key.reveal() or "no-key",
        temperature=settings.temperature,
        max_completion_tokens=settings.max_tokens,
        # llama.cpp's server ignores max_completion_tokens and generates until EOS; it honours max_tokens.
        extra_body={"max_tokens": settings.max_tokens},
    )
    return FallbackOnError(PhaseGuidedLLM(endpoint, machine), fallback_line=settings.fallback_line,
                           timeout_s=settings.timeout_s)
