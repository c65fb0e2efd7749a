"""One Knotencheck conversation: the single place an ``AgentSession`` is built and wired.

``AgentResources`` holds what every session shares (loaded models, guardrail rules, the phase script).
``KnotencheckSession`` is one conversation, in a LiveKit room (``make_entrypoint``) or with local audio IO
(``knotd demo``): it builds the session (STT → input guard → LLM → output guard → TTS), keeps the phase
machine and publishes it, and reports what happens (phases, turns, guard verdicts, failures, the summary)
to its ``SessionObserver``; it never reaches into the daemon.

Every async reaction to a livekit event goes through the session's ``TaskBridge``; no handler registered
with ``.on()`` is a coroutine function.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from livekit import rtc
from livekit.agents import NOT_GIVEN, Agent, AgentSession, JobContext, StopResponse, llm
from livekit.agents.voice import io as voice_io

from knotd import stages
from knotd.agent.llm import latest_user_message
from knotd.agent.observer import SessionObserver
from knotd.agent.stt import Context, WhisperSTT, speculative_vad
from knotd.agent.turn_detector import MODEL_VAD_SILENCE_S, EndOfTurnDetector
from knotd.bridge import Signal, TaskBridge
from knotd.config import Settings
from knotd.conversation.guardrails import Guardrail, SessionGuard, Verdict, guard_llm_output
from knotd.conversation.phases import WIRE_TOPIC, PhaseChange, PhaseMachine, PhaseScript
from knotd.conversation.summary import SessionSummary, TranscriptLine, latency_summary
from knotd.conversation.turns import CutoffWatch, TurnObserver
from knotd.speech.models import SharedModels
from knotd.stages import stage

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
        script = PhaseScript.load(settings.session.phases or None)
        return cls(settings, models, guardrail, script)


# Said before the answer when the caller spoke longer than stt.max_utterance_s without a pause.
UTTERANCE_CAPPED_LINE = "Das war sehr lang, ich habe nur den Anfang verstanden. Bitte sagen Sie es kürzer."


class KnotencheckAgent(Agent):
    """The agent: input guard before the LLM sees a transcript, output guard before TTS and transcript.

    Args:
        instructions: the LLM's instructions (the phase script's).
        guard: the session's guardrail; it tallies every check.
        machine: the phase machine; an input rule that redirects moves it.
        on_hit: called as ``on_hit(direction, verdict)`` once for every hit.
    """

    def __init__(self, instructions: str, guard: SessionGuard, machine: PhaseMachine, *,
                 on_hit: Callable[[str, Verdict], None] | None = None,
                 utterance_capped: Callable[[], bool] = lambda: False) -> None:
        super().__init__(instructions=instructions)
        self.guard, self.machine = guard, machine
        self._on_hit = on_hit
        self._utterance_capped = utterance_capped
        self._input_checked: set[str] = set()
        self._blocked: set[str] = set()

    async def on_enter(self) -> None:
        # The opening line comes from the LLM (scripted by default) so it passes the output guard too.
        self.session.generate_reply()

    async def on_user_turn_completed(self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage) -> None:
        if self._utterance_capped():
            self.session.say(UTTERANCE_CAPPED_LINE, add_to_chat_ctx=False)
        verdict = self.check_input(new_message)
        if verdict.allowed:
            return
        if verdict.reply:
            self.session.say(verdict.reply, add_to_chat_ctx=True)
        raise StopResponse()

    async def llm_node(
        self, chat_ctx: llm.ChatContext, tools: list[Any], model_settings: Any
    ) -> AsyncIterable[llm.ChatChunk | str]:
        # Typed input (room chat, session.run) reaches the LLM without on_user_turn_completed: check it here.
        # A voice turn was checked there already; the message id makes the second check free and uncounted.
        message = latest_user_message(chat_ctx)
        if message is not None:
            verdict = self.check_input(message)
            if not verdict.allowed:
                if verdict.reply:
                    yield verdict.reply
                return
        # livekit keeps a blocked message in the chat context; it must never reach an LLM, now or later.
        chat_ctx = self.without_blocked(chat_ctx)
        guard = self.guard.sentence_guard()
        error: type[BaseException] | None = None
        try:
            async for piece in guard_llm_output(Agent.default.llm_node(self, chat_ctx, tools, model_settings), guard):
                yield piece  # nothing after a hit is spoken; guard_llm_output closes the LLM stream
        except BaseException as err:
            error = type(err)
            raise
        finally:
            stages.record("output_guard", guard.busy_s, error)
            if guard.hit is not None:
                self._hit("output", guard.hit)

    def check_input(self, message: llm.ChatMessage) -> Verdict:
        """Input guard on a final user message (once per message id); a redirect moves the phase."""
        if message.id in self._input_checked:  # a voice turn, checked in on_user_turn_completed already
            return self.guard.check_input(message.text_content or "", key=message.id)
        self._input_checked.add(message.id)
        with stage("input_guard"):
            verdict = self.guard.check_input(message.text_content or "", key=message.id)
        if not verdict.allowed:
            self._blocked.add(message.id)
            self._hit("input", verdict)
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

    def _hit(self, direction: str, verdict: Verdict) -> None:
        if self._on_hit is not None:
            self._on_hit(direction, verdict)


class KnotencheckSession:
    """One conversation. Create, ``await start(...)``, and ``await finish(outcome)`` when it ends.

    Args:
        resources: shared models, rules and script.
        observer: told what happens (the daemon's state, metrics and the sessions journal, as one).
        session_id: the LiveKit job id (or a local id for the demo).
        room_name: shown on the status page; never used as a metric label.
        tts: the voice to speak with; None builds the configured one (``tts.engine``).
    """

    def __init__(self, resources: AgentResources, observer: SessionObserver, session_id: str, room_name: str,
                 *, tts: Any = None) -> None:
        from knotd.agent.llm import build_llm
        from knotd.agent.tts import build_tts

        self.resources = resources
        self.observer = observer
        self.session_id = session_id
        self.room_name = room_name
        self.started_at = time.time()
        settings = resources.settings
        self.bridge = TaskBridge(session_id, on_failure=observer.task_failed)
        self.guard = SessionGuard(resources.guardrail,
                                  on_verdict=lambda direction, v: observer.guard_verdict(session_id, direction, v))
        self.machine = PhaseMachine(resources.script)
        self.machine.add_listener(self._on_phase_change)
        self.turns = TurnObserver(self._on_turn)
        self.transcript: list[TranscriptLine] = []
        self.agent_line = ""  # what the agent said last: the question the caller is answering
        self.speeches: dict[str, int] = {}
        self.room: rtc.Room | None = None
        self._finished: SessionSummary | None = None
        self._closed = asyncio.Event()
        self._finish_lock = asyncio.Lock()
        turn = settings.turn
        models = resources.models
        self.detector: EndOfTurnDetector | None = None
        vad, release_silence_s = models.vad, None
        if turn.detection == "model" and models.turn_model:
            self.detector = EndOfTurnDetector(settings.stt.language, turn.model_threshold)
            # The VAD ends speech early and the model decides; the speculative transcript is handed over when
            # livekit flushes at its decision (never by itself before max_delay).
            vad = speculative_vad(models.vad, MODEL_VAD_SILENCE_S)
            release_silence_s = turn.max_endpointing_delay_s
        self.detection = "model" if self.detector is not None else "vad"
        self.cutoffs = CutoffWatch(lambda: observer.turn_cut_off(session_id, self.detection))
        with stage("stt_init", shared=True):
            stt = WhisperSTT(models.whisper, settings.stt, vad=vad, release_silence_s=release_silence_s,
                             prompt=self.recognition_context if settings.stt.context else None)
        with stage("llm_init"):
            self.llm = build_llm(settings.llm, self.machine)
        self.tts = tts if tts is not None else build_tts(settings.tts)  # times itself as the tts_init stage
        self.session: AgentSession = AgentSession(
            stt=stt,
            vad=vad,
            llm=self.llm,
            tts=self.tts,
            turn_handling={
                "turn_detection": self.detector if self.detector is not None else "vad",
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
        self.agent = KnotencheckAgent(resources.script.instructions, self.guard, self.machine, on_hit=self._log_hit,
                                      utterance_capped=stt.take_capped)
        observer.session_started(session_id, room_name, self.machine.current)
        self._register_handlers()

    # -- wiring -------------------------------------------------------------------------------------
    def _register_handlers(self) -> None:
        b, s = self.bridge, self.session
        s.on("conversation_item_added", self._on_item_added)  # sync bookkeeping only
        s.on("agent_state_changed", self._on_agent_state)
        s.on("user_state_changed", self._on_user_state)
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
        if role == "user":
            ending = self.detector.decision().ending if self.detector is not None else "vad"
            self.observer.turn_ended(self.session_id, ending)
        self.turns.on_message(role, getattr(item, "metrics", None))
        if role == "assistant" and item.text_content:
            self.agent_line = item.text_content
        if self.resources.settings.session.record_transcripts and role in ("user", "assistant"):
            self.transcript.append(TranscriptLine(role, item.text_content or "", time.time()))

    def _on_agent_state(self, event: Any) -> None:
        if event.new_state == "speaking":
            self.cutoffs.agent_speaking(event.created_at)

    def _on_user_state(self, event: Any) -> None:
        if event.new_state == "speaking":
            self.cutoffs.user_speaking(event.created_at)

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
        elif reason in ("job_shutdown", "user_initiated"):
            # The job is ending under the session (the worker's drain bound, a closed room): livekit closes the
            # primary session itself ("user_initiated") before the shutdown callbacks run; knotd's own close
            # comes only after finish().
            outcome = self._shutdown_outcome()
        elif self.machine.is_finished:
            outcome = "completed"
        else:
            outcome = "disconnected"
        await self.finish(outcome)

    def _on_turn(self, turn: dict[str, float]) -> None:
        self.observer.turn_completed(self.session_id, turn)

    def _on_phase_change(self, change: PhaseChange) -> None:
        self.observer.phase_changed(self.session_id, change.phase)
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

    def recognition_context(self) -> Context:
        """Whisper's context for the caller's next words: the agent's last line and the phase's expected words
        as its prompt, and the phase's near-miss correction of what it decodes."""
        recognition = self.machine.phase.recognition
        if recognition is not None:
            return Context(recognition.prompt(self.agent_line or self.machine.line()), recognition.correct)
        return Context(self.agent_line or None)

    def _log_hit(self, direction: str, verdict: Verdict) -> None:
        log.info("guardrail_hit", session_id=self.session_id, direction=direction, rule=verdict.rule,
                 layer=verdict.layer, score=None if verdict.score is None else round(verdict.score, 3))

    # -- the end ------------------------------------------------------------------------------------
    def _shutdown_outcome(self) -> str:
        return "drained" if self.observer.is_draining else "interrupted"

    async def finish(self, outcome: str) -> SessionSummary:
        """Close the guard and report the summary to the observer (once). Idempotent."""
        async with self._finish_lock:
            if self._finished is not None:
                return self._finished
            record_transcripts = self.resources.settings.session.record_transcripts
            summary = SessionSummary(
                session_id=self.session_id,
                room=self.room_name,
                started_at=self.started_at,
                ended_at=time.time(),
                outcome=outcome,
                phases_reached=tuple(self.machine.reached()),
                final_phase=self.machine.current,
                turns=len(self.turns.turns),
                latency_s=latency_summary(self.turns.turns),
                guardrail=self.guard.close(),
                task_failures=self.bridge.failures,
                agent_speeches=dict(self.speeches),
                transcript=tuple(self.transcript) if record_transcripts else None,
                # Normalised answers are what the caller said: kept only where transcripts may be.
                answers=self.machine.recognised_answers(with_values=record_transcripts),
            )
            self._finished = summary
            # In a thread: the journal fsyncs sessions.jsonl.
            await asyncio.to_thread(self.observer.session_finished, summary)
            self._closed.set()
            return summary

    async def aclose(self, outcome: str) -> SessionSummary:
        """Finish, close the AgentSession and drain the bridge (bounded)."""
        summary = await self.finish(outcome)
        await self.session.aclose()
        await self.llm.aclose()
        await self.bridge.drain(BRIDGE_DRAIN_S)
        return summary


def make_entrypoint(resources: AgentResources, observer: SessionObserver, drain_expired: Signal | None = None) -> Any:
    """The LiveKit job entrypoint; runs in a job thread with its own event loop.

    Args:
        drain_expired: set by the daemon when its drain bound has passed; a session still joining its room
            then gives up at once (outcome ``drained``) instead of holding the stop for the rest of
            ``session.start_timeout_s``.
    """
    cut = drain_expired or Signal()

    async def entrypoint(ctx: JobContext) -> None:
        conversation = KnotencheckSession(resources, observer, ctx.job.id, ctx.job.room.name)

        async def on_shutdown(reason: str = "") -> None:
            await conversation.aclose(conversation._shutdown_outcome())

        async def join_and_start() -> None:
            await ctx.connect()
            await conversation.start(room=ctx.room)

        ctx.add_shutdown_callback(on_shutdown)
        try:
            async with stage("session_start"):
                async with asyncio.timeout(resources.settings.session.start_timeout_s):
                    if not await _unless(cut, join_and_start()):
                        await conversation.aclose("drained")
                        ctx.shutdown(reason="drain bound passed while the session was starting")
                        return
        except Exception as err:
            log.error("session_start_failed", session_id=conversation.session_id, error=type(err).__name__)
            await conversation.aclose("error")
            ctx.shutdown(reason="session start failed")
            return
        # The entrypoint returns once the session runs: livekit's job shutdown waits up to 15 s for a running
        # entrypoint before it closes the session, which would stretch every drain bound by those 15 s.
        conversation.bridge.spawn("job_shutdown", _shutdown_when_closed(conversation, ctx))

    return entrypoint


async def _unless(signal: Signal, work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` unless ``signal`` is set first (then cancel it): whether ``work`` completed."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(signal.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # its error, if any, is the start's
    return True


async def _shutdown_when_closed(conversation: KnotencheckSession, ctx: JobContext) -> None:
    """End the job (leave the room, free the slot) once the conversation has finished."""
    await conversation.wait_closed()
    ctx.shutdown(reason="session closed")


def describe_models(models: SharedModels) -> str:
    """For the status page: which Whisper model, how it runs, and the guardrails' sentence encoder."""
    stt = models.transcriber.settings
    guard = models.guardrail
    encoder = f", guardrails + {guard.semantic.encoder.name}" if guard is not None and guard.semantic else ""
    turns = "end-of-turn model" if models.turn_model else "vad endpointing"
    return (f"whisper {Path(stt.model).name} ({stt.compute_type}, {stt.num_workers} workers), silero vad, "
            f"{turns}{encoder}")
