"""One Knotencheck conversation: the single place an ``AgentSession`` is built and wired.

``AgentResources`` holds what every session shares (loaded models, guardrail rules, the phase script).
``KnotencheckSession`` is one conversation, in a LiveKit room (``make_entrypoint``) or with local audio IO
(``knotd demo``): it builds the session (STT → input guard → LLM → output guard → TTS), keeps the phase
machine and publishes it, observes per-turn latency as it happens, and writes the summary record once.

Every async reaction to a livekit event goes through the session's ``TaskBridge``; no handler registered
with ``.on()`` is a coroutine function.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from livekit import rtc
from livekit.agents import NOT_GIVEN, Agent, AgentSession, JobContext, StopResponse, llm
from livekit.agents.voice import io as voice_io

from knotd import metrics, stages
from knotd.agent.guardrails import Guardrail, SessionGuard, Verdict, initialise_metrics, record_verdict
from knotd.agent.llm import initialise_metrics as initialise_llm_metrics
from knotd.agent.llm import latest_user_message
from knotd.agent.models import SharedModels
from knotd.agent.phases import WIRE_TOPIC, PhaseChange, PhaseMachine, PhaseScript
from knotd.agent.stt import WhisperSTT
from knotd.agent.summary import append_record, latency_summary
from knotd.agent.turns import TurnObserver
from knotd.bridge import TaskBridge
from knotd.config import Settings
from knotd.stages import stage
from knotd.state import DaemonState

log = structlog.get_logger(__name__)

BRIDGE_DRAIN_S = 5.0


@dataclass(frozen=True)
class AgentResources:
    """Loaded once per daemon and shared by every session."""

    settings: Settings
    models: SharedModels
    guardrail: Guardrail
    script: PhaseScript

    @classmethod
    def load(cls, settings: Settings, models: SharedModels) -> AgentResources:
        """The guardrails ``models`` loaded (or the rules alone) and the phase script (ConfigError for a bad file)."""
        guardrail = models.guardrail or Guardrail.load(settings.guardrails.rules or None,
                                                       max_input_chars=settings.guardrails.max_input_chars)
        initialise_metrics(guardrail)
        initialise_llm_metrics()
        script = PhaseScript.load(settings.session.phases or None)
        for name in script.phases:
            metrics.PHASE_TRANSITIONS.labels(phase=name)
        return cls(settings, models, guardrail, script)


class KnotencheckAgent(Agent):
    """The agent: input guard before the LLM sees a transcript, output guard before TTS and transcript."""

    def __init__(self, conversation: KnotencheckSession) -> None:
        super().__init__(instructions=conversation.resources.script.instructions)
        self._conversation = conversation

    async def on_enter(self) -> None:
        # The opening line comes from the LLM (scripted by default) so it passes the output guard too.
        self.session.generate_reply()

    async def on_user_turn_completed(self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage) -> None:
        verdict = self._conversation.check_input(new_message)
        if verdict.allowed:
            return
        if verdict.reply:
            self.session.say(verdict.reply, add_to_chat_ctx=True)
        raise StopResponse()

    async def llm_node(
        self, chat_ctx: llm.ChatContext, tools: list[Any], model_settings: Any
    ) -> AsyncIterable[llm.ChatChunk | str]:
        conversation = self._conversation
        # Typed input (room chat, session.run) reaches the LLM without on_user_turn_completed: check it here.
        # A voice turn was checked there already; the message id makes the second check free and uncounted.
        message = latest_user_message(chat_ctx)
        if message is not None:
            verdict = conversation.check_input(message)
            if not verdict.allowed:
                if verdict.reply:
                    yield verdict.reply
                return
        # livekit keeps a blocked message in the chat context; it must never reach an LLM, now or later.
        chat_ctx = conversation.without_blocked(chat_ctx)
        guard = conversation.guard.sentence_guard()
        spent = 0.0
        error: type[BaseException] | None = None
        try:
            async with contextlib.aclosing(Agent.default.llm_node(self, chat_ctx, tools, model_settings)) as chunks:
                async for chunk in chunks:
                    text = chunk if isinstance(chunk, str) else _chunk_text(chunk)
                    if text is None:
                        continue
                    started = time.perf_counter()
                    released = guard.feed(text)
                    spent += time.perf_counter() - started
                    for piece in released:
                        yield piece
                    if guard.is_stopped:
                        break  # nothing after a hit is spoken; aclosing() stops the LLM stream
            started = time.perf_counter()
            for piece in guard.flush():
                yield piece
            spent += time.perf_counter() - started
        except BaseException as err:
            error = type(err)
            raise
        finally:
            stages.record("output_guard", spent, error)
            if guard.hit is not None:
                conversation.guard_hit("output", guard.hit)


def _chunk_text(chunk: Any) -> str | None:
    delta = getattr(chunk, "delta", None)
    return getattr(delta, "content", None) if delta is not None else None


class KnotencheckSession:
    """One conversation. Create, ``await start(...)``, and ``await finish(outcome)`` when it ends.

    Args:
        resources: shared models, rules and script.
        state: the daemon state the status page reads (sessions, turns, failures).
        session_id: the LiveKit job id (or a local id for the demo).
        room_name: shown on the status page; never used as a metric label.
    """

    def __init__(self, resources: AgentResources, state: DaemonState, session_id: str, room_name: str) -> None:
        from knotd.agent.llm import build_llm
        from knotd.agent.tts import build_tts  # looked up per session so tests can record what is spoken

        self.resources = resources
        self.state = state
        self.session_id = session_id
        self.room_name = room_name
        self.started_at = time.time()
        settings = resources.settings
        self.bridge = TaskBridge(session_id, on_failure=state.task_failed)
        self.guard = SessionGuard(resources.guardrail, on_verdict=record_verdict)
        self.machine = PhaseMachine(resources.script)
        self.machine.add_listener(self._on_phase_change)
        self.turns = TurnObserver(lambda turn: state.turn_completed(session_id, turn))
        self.transcript: list[dict[str, str]] = []
        self.speeches: dict[str, int] = {}
        self._input_checked: set[str] = set()
        self._blocked: set[str] = set()
        self.room: rtc.Room | None = None
        self._finished: dict[str, Any] | None = None
        self._closed = asyncio.Event()
        self._finish_lock = asyncio.Lock()
        with stage("stt_init", shared=True):
            stt = WhisperSTT(resources.models.whisper, settings.stt, vad=resources.models.vad)
        with stage("llm_init"):
            self.llm = build_llm(settings.llm, self.machine)
        self.tts = build_tts(settings.tts)  # times itself as the tts_init stage
        turn = settings.turn
        self.session: AgentSession = AgentSession(
            stt=stt,
            vad=resources.models.vad,
            llm=self.llm,
            tts=self.tts,
            turn_handling={
                "turn_detection": "vad",
                "endpointing": {
                    "min_delay": turn.min_endpointing_delay_s,
                    "max_delay": turn.max_endpointing_delay_s,
                },
                "interruption": {"mode": "vad"},
                # The input guardrail must see a transcript before the LLM does.
                "preemptive_generation": {"enabled": False},
            },
            aec_warmup_duration=None,
            user_away_timeout=None,
        )
        self.agent = KnotencheckAgent(self)
        state.session_started(session_id, room_name)
        state.session_update(session_id, phase=self.machine.current)
        self._register_handlers()

    # -- wiring -------------------------------------------------------------------------------------
    def _register_handlers(self) -> None:
        b, s = self.bridge, self.session
        s.on("conversation_item_added", self._on_item_added)  # sync bookkeeping only
        b.on(s, "user_input_transcribed", self._on_user_input_transcribed)
        b.on(s, "speech_created", self._on_speech_created)
        b.on(s, "close", self._on_close)

    def attach_room(self, room: rtc.Room) -> None:
        """Publish phases to ``room`` and re-broadcast them to every participant that (re)connects."""
        self.room = room
        self.bridge.on(room, "participant_connected", self._on_participant_connected)

    async def start(
        self,
        *,
        room: rtc.Room | None = None,
        audio_input: voice_io.AudioInput | None = None,
        audio_output: voice_io.AudioOutput | None = None,
    ) -> None:
        """Start the conversation in ``room``, or on the given local audio IO (no room)."""
        if room is not None:
            self.attach_room(room)
        else:
            self.session.input.audio = audio_input
            self.session.output.audio = audio_output
        await self.session.start(self.agent, room=room if room is not None else NOT_GIVEN, record=False)
        if room is not None:
            self.bridge.spawn("phase_publish", self._publish_phase(None))

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- event handlers (async ones run through the bridge) -----------------------------------------
    def _on_item_added(self, event: Any) -> None:
        item = event.item
        role = getattr(item, "role", None)
        if role is None:
            return
        self.turns.on_message(role, getattr(item, "metrics", None))
        if self.resources.settings.session.record_transcripts and role in ("user", "assistant"):
            self.transcript.append({"role": role, "text": item.text_content or "", "at": round(time.time(), 3)})

    async def _on_user_input_transcribed(self, event: Any) -> None:
        if event.is_final:
            log.debug("user_transcript_final", session_id=self.session_id, chars=len(event.transcript),
                      language=event.language)

    async def _on_speech_created(self, event: Any) -> None:
        # Only guardrail replies use say() (it bypasses llm_node, hence the output guard); everything else is
        # generated and guarded. Count what was spoken and what the user cut off, for the summary.
        handle = event.speech_handle
        await handle.wait_for_playout()
        self.speeches[event.source] = self.speeches.get(event.source, 0) + 1
        if handle.interrupted:
            self.speeches["interrupted"] = self.speeches.get("interrupted", 0) + 1

    async def _on_participant_connected(self, participant: rtc.RemoteParticipant) -> None:
        await self._publish_phase([participant.identity])

    async def _on_close(self, event: Any) -> None:
        reason = getattr(getattr(event, "reason", None), "value", str(getattr(event, "reason", "")))
        if getattr(event, "error", None) is not None:
            outcome = "error"
        elif reason == "job_shutdown":
            outcome = self._shutdown_outcome()
        elif self.machine.is_finished:
            outcome = "completed"
        else:
            outcome = "disconnected"
        await self.finish(outcome)

    def _on_phase_change(self, change: PhaseChange) -> None:
        metrics.PHASE_TRANSITIONS.labels(phase=change.phase).inc()
        self.state.session_update(self.session_id, phase=change.phase)
        log.info("phase_changed", session_id=self.session_id, previous=change.previous, phase=change.phase)
        if self.room is not None:
            self.bridge.spawn("phase_publish", self._publish_phase(None))

    async def _publish_phase(self, to: list[str] | None) -> None:
        room = self.room
        if room is None or not room.isconnected():
            return
        payload = json.dumps(self.machine.to_wire(), ensure_ascii=False).encode("utf-8")
        participant = room.local_participant
        await participant.set_attributes(self.machine.wire_attributes())
        await participant.publish_data(payload, reliable=True, topic=WIRE_TOPIC,
                                       destination_identities=to or [])

    def check_input(self, message: llm.ChatMessage) -> Verdict:
        """Input guard on a final user message (once per message id); a redirect moves the phase."""
        if message.id in self._input_checked:  # a voice turn, checked in on_user_turn_completed already
            return self.guard.check_input(message.text_content or "", key=message.id)
        self._input_checked.add(message.id)
        with stage("input_guard"):
            verdict = self.guard.check_input(message.text_content or "", key=message.id)
        if not verdict.allowed:
            self._blocked.add(message.id)
            self.guard_hit("input", verdict)
            if verdict.phase and self.machine.can_advance(verdict.phase):
                self.machine.advance(verdict.phase)
        return verdict

    def without_blocked(self, chat_ctx: llm.ChatContext) -> llm.ChatContext:
        """``chat_ctx`` without the user messages the input guard stopped (a copy when there are any)."""
        if not self._blocked or not any(item.id in self._blocked for item in chat_ctx.items):
            return chat_ctx
        kept = chat_ctx.copy()
        kept.items[:] = [item for item in kept.items if item.id not in self._blocked]
        return kept

    def guard_hit(self, direction: str, verdict: Verdict) -> None:
        self.state.guardrail_hit(self.session_id, direction, verdict.rule or "unknown")
        log.info("guardrail_hit", session_id=self.session_id, direction=direction, rule=verdict.rule,
                 layer=verdict.layer, score=None if verdict.score is None else round(verdict.score, 3))

    # -- the end ------------------------------------------------------------------------------------
    def _shutdown_outcome(self) -> str:
        from knotd.state import Lifecycle

        return "drained" if self.state.lifecycle is Lifecycle.DRAINING else "interrupted"

    async def finish(self, outcome: str) -> dict[str, Any]:
        """Close the guard, write the summary record and leave the daemon's session list. Idempotent."""
        async with self._finish_lock:
            if self._finished is not None:
                return self._finished
            guard_summary = self.guard.close()
            ended = time.time()
            record: dict[str, Any] = {
                "session_id": self.session_id,
                "room": self.room_name,
                "started_at": round(self.started_at, 3),
                "ended_at": round(ended, 3),
                "duration_s": round(ended - self.started_at, 3),
                "outcome": outcome,
                "phases_reached": self.machine.reached(),
                "final_phase": self.machine.current,
                "turns": len(self.turns.turns),
                "latency_s": latency_summary(self.turns.turns),
                "guardrail": guard_summary.to_dict(),
                "task_failures": self.bridge.failures,
                "agent_speeches": dict(self.speeches),
            }
            if self.resources.settings.session.record_transcripts:
                record["transcript"] = list(self.transcript)
            self._finished = record
            metrics.SESSIONS.labels(outcome=outcome).inc()
            try:
                path = await asyncio.to_thread(append_record, self.resources.settings.session.state_dir, record)
                log.info("session_summary", session_id=self.session_id, outcome=outcome, turns=record["turns"],
                         phases=record["phases_reached"], guardrail_hits=guard_summary.total_hits, file=str(path))
            except OSError as err:
                log.error("session_summary_not_written", session_id=self.session_id, error=type(err).__name__,
                          state_dir=self.resources.settings.session.state_dir)
            self.state.session_finished(self.session_id, {k: v for k, v in record.items() if k != "transcript"})
            self._closed.set()
            return record

    async def aclose(self, outcome: str) -> dict[str, Any]:
        """Finish, close the AgentSession and drain the bridge (bounded)."""
        record = await self.finish(outcome)
        await self.session.aclose()
        await self.llm.aclose()
        await self.bridge.drain(BRIDGE_DRAIN_S)
        return record


def make_entrypoint(settings: Settings, models: SharedModels, state: DaemonState) -> Any:
    """The LiveKit job entrypoint; runs in a job thread with its own event loop."""
    resources = AgentResources.load(settings, models)

    async def entrypoint(ctx: JobContext) -> None:
        conversation = KnotencheckSession(resources, state, ctx.job.id, ctx.job.room.name)

        async def on_shutdown(reason: str = "") -> None:
            await conversation.aclose(conversation._shutdown_outcome())

        ctx.add_shutdown_callback(on_shutdown)
        try:
            async with stage("session_start"):
                await ctx.connect()
                await conversation.start(room=ctx.room)
        except Exception as err:
            log.error("session_start_failed", session_id=conversation.session_id, error=type(err).__name__)
            await conversation.aclose("error")
            ctx.shutdown(reason="session start failed")
            return
        await conversation.wait_closed()
        ctx.shutdown(reason="session closed")

    return entrypoint


def describe_models(models: SharedModels) -> str:
    """For the status page: which Whisper model, how it runs, and the guardrails' sentence encoder."""
    stt = models.transcriber.settings
    guard = models.guardrail
    encoder = f", guardrails + {guard.semantic.encoder.name}" if guard is not None and guard.semantic else ""
    return f"whisper {Path(stt.model).name} ({stt.compute_type}, {stt.num_workers} workers), silero vad{encoder}"
