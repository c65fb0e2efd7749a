"""Speech to text with faster-whisper behind livekit's STT ABC, transcribing speculatively.

`WhisperSTT` wraps the daemon's shared WhisperModel; `knotd.speech.whisper` turns each utterance into text
with an encoder window sized to it. How utterances are cut depends on `stt.speculative`:

- speculative (default): `WhisperSTT` is a streaming STT. Its `SpeculativeStream` runs its own Silero
  stream (on the session VAD's model) with a short silence threshold (`stt.speculative_silence_s`) and
  starts transcribing as soon as that sees the user pause, while the session's VAD is still waiting for
  its longer silence before it ends the turn. If the user stays silent, the transcript is already there
  (or nearly) when the turn ends; if they go on speaking, the early transcript is dropped and the whole
  utterance is transcribed at the next pause. `knotd_stt_speculative_total{result}` counts both.
- not speculative: a non-streaming STT; livekit wraps it in its StreamAdapter, which starts transcribing
  only when the session's VAD reports the end of speech.

The turn ends when the session's VAD has seen its silence and a final transcript is there. livekit (VAD
turn detection) asks the stream for that transcript with a flush at the VAD's end of speech
(`capabilities.manual_flush`); the stream also hands it over by itself once its own VAD has seen as much
silence as the session's, for turn modes that never flush.

Recognition context: the session passes a `prompt` function; every transcription (the speculative ones too)
calls it on the event loop when it starts and hands what it returns to Whisper with that one call: the
prompt string, or a `Context` with the prompt and the phase's near-miss correction, which rewrites the
decoded text before anyone sees it (the guardrails, the phase machine, the summary). The model is shared by
all sessions, the context never is: it is an argument, not state. A prompted transcript that is an echo of
its prompt, or no speech, comes back empty (`knotd.speech.whisper`) and is counted in
`knotd_stt_dropped_total{reason}`.

This module does not load models (see `knotd.speech.models`) and does not decide when a turn ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import structlog
from faster_whisper import WhisperModel
from livekit import rtc
from livekit.agents import APIError, stt, utils
from livekit.agents import vad as lk_vad
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, APIConnectOptions, NotGivenOr

from knotd import metrics
from knotd.config import SttSettings
from knotd.speech.whisper import (
    STOCK_WINDOW_S,
    WHISPER_SAMPLE_RATE,
    WINDOW_BUCKETS_S,
    Context,
    Transcript,
    WhisperTranscriber,
)

__all__ = ["STOCK_WINDOW_S", "WINDOW_BUCKETS_S", "Context", "SpeculativeStream", "Transcript", "WhisperSTT",
           "WhisperTranscriber", "frame_to_whisper_input", "speculative_vad"]

log = structlog.get_logger(__name__)

# Transcriptions run here, not in the loop's default executor, so a stream can see when a thread is really
# done (an asyncio task cancelled mid-transcription is done at once; its thread is not).
_EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="knotd_stt")

# Silero's inference window at 16 kHz; a flush is due once the VAD has run over all but this much audio.
_VAD_WINDOW_S = 512 / 16000


def frame_to_whisper_input(frame: rtc.AudioFrame) -> np.ndarray:
    """One audio frame (any rate, any channel count, s16) as 16 kHz mono float32 in [-1, 1]."""
    samples = np.frombuffer(frame.data, dtype=np.int16)
    if frame.num_channels > 1:
        samples = samples.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
    if frame.sample_rate != WHISPER_SAMPLE_RATE and samples.size:
        resampler = rtc.AudioResampler(frame.sample_rate, WHISPER_SAMPLE_RATE, num_channels=1,
                                       quality=rtc.AudioResamplerQuality.HIGH)
        out = resampler.push(bytearray(samples.tobytes())) + resampler.flush()
        samples = np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in out]) if out else samples[:0]
    return samples.astype(np.float32) / 32768.0


def speculative_vad(session_vad: lk_vad.VAD, min_silence_s: float) -> lk_vad.VAD:
    """A Silero VAD like `session_vad` (same loaded model, same thresholds) that ends speech after `min_silence_s`.

    Raises:
        TypeError: `session_vad` is not livekit's Silero VAD.
    """
    from livekit.plugins import silero  # registered on the main thread by knotd.agent.register_plugins()

    if not isinstance(session_vad, silero.VAD):
        raise TypeError(f"speculative transcription needs the Silero VAD, not {type(session_vad).__name__}")
    # The plugin has no public way to derive a VAD; its constructor takes the loaded ONNX session, so the
    # model is shared (every stream keeps its own state), as livekit shares it between sessions.
    opts = dataclasses.replace(session_vad._opts, min_silence_duration=min_silence_s)
    return silero.VAD(session=session_vad._onnx_session, opts=opts)


class WhisperSTT(stt.STT):
    """livekit STT around a shared WhisperModel: streaming and speculative when given a VAD, else not."""

    def __init__(self, model: WhisperModel, settings: SttSettings, *, vad: lk_vad.VAD | None = None,
                 model_name: str | None = None, prompt: Callable[[], str | Context | None] | None = None,
                 release_silence_s: float | None = None) -> None:
        """Cheap: builds views on the already loaded `model`.

        Args:
            vad: the session's VAD; with it and `settings.speculative`, transcription is speculative
                (see the module docstring). Without it livekit cuts utterances with the session's VAD.
            model_name: reported in livekit's STT metrics; defaults to the model directory's name.
            prompt: the session's recognition context for the next utterance (called on the event loop
                as each transcription starts): a prompt, or a `Context` (prompt and correction); None: none.
            release_silence_s: hand a held transcript over unasked after this much silence; default: the
                session VAD's silence. With the end-of-turn model livekit flushes when the model decides.
        """
        self._prompt = prompt
        self._spec_vad: lk_vad.VAD | None = None
        self._release_silence_s = 0.0
        if vad is not None and settings.speculative:
            self._spec_vad = speculative_vad(vad, settings.speculative_silence_s)
            # Hand a held transcript over unasked once the user was as long silent as the session's VAD needs.
            self._release_silence_s = release_silence_s or float(getattr(vad, "min_silence_duration", None) or 0.55)
        super().__init__(capabilities=stt.STTCapabilities(
            streaming=self._spec_vad is not None, interim_results=False,
            manual_flush=self._spec_vad is not None,
        ))
        self._transcriber = WhisperTranscriber(model, settings)
        self._max_utterance_s = settings.max_utterance_s
        self._capped = 0  # utterances cut at max_utterance_s since take_capped() last asked
        self._model_name = model_name or settings.model.rstrip("/").rsplit("/", 1)[-1]

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return "faster-whisper"

    @property
    def transcriber(self) -> WhisperTranscriber:
        return self._transcriber

    @property
    def speculative(self) -> bool:
        """Whether `stream()` transcribes speculatively (else livekit's StreamAdapter cuts utterances)."""
        return self._spec_vad is not None

    def take_capped(self) -> bool:
        """Whether an utterance was cut at `stt.max_utterance_s` since the last call (the agent says so)."""
        capped, self._capped = self._capped, 0
        return capped > 0

    def transcribe_pcm(self, pcm: np.ndarray, *, language: str | None = None,
                       prompt: str | None = None) -> Transcript:
        """Transcribe 16 kHz mono float32 audio (blocking); see `WhisperTranscriber.transcribe_pcm`."""
        return self._transcriber.transcribe_pcm(pcm, language=language, prompt=prompt)

    def current_context(self) -> Context:
        """The session's recognition context now (call on the session's event loop)."""
        context = self._prompt() if self._prompt is not None else None
        return context if isinstance(context, Context) else Context(context)

    def stream(self, *, language: NotGivenOr[str] = NOT_GIVEN,
               conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS) -> stt.RecognizeStream:
        if self._spec_vad is None:
            return super().stream(language=language, conn_options=conn_options)  # raises NotImplementedError
        return SpeculativeStream(self, self._spec_vad, release_silence_s=self._release_silence_s,
                                 max_utterance_s=self._max_utterance_s,
                                 language=language if utils.is_given(language) else None,
                                 conn_options=conn_options)

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.SpeechEvent:
        frames = buffer if isinstance(buffer, list) else [buffer]
        result = await self.transcribe_frames(frames, language if utils.is_given(language) else None,
                                              self.current_context())
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid("stt_"),
            alternatives=[stt.SpeechData(language=result.language, text=result.text)],
        )

    async def transcribe_frames(self, frames: list[rtc.AudioFrame], language: str | None,
                                context: Context, *,
                                submitted: Callable[[Future[Transcript]], None] | None = None) -> Transcript:
        """Transcribe audio frames off the event loop with the recognition `context` (`current_context()`).

        Args:
            submitted: given the thread's future once the work is queued (cancelling this coroutine cancels
                it only if it has not started).

        Raises:
            APIError: CTranslate2 or numpy failed (not retryable).
        """
        if not frames:
            return Transcript("", language or self._transcriber.settings.language, 0, context.prompt)
        work = _EXECUTOR.submit(self._recognize_blocking, rtc.combine_audio_frames(frames), language, context)
        if submitted is not None:
            submitted(work)
        try:
            result = await asyncio.wrap_future(work)
        except (RuntimeError, ValueError) as err:  # CTranslate2 and numpy failures
            raise APIError(f"whisper transcription failed: {type(err).__name__}: {err}",
                           retryable=False) from err
        if result.dropped:
            metrics.STT_DROPPED.labels(reason=result.dropped).inc()
            log.debug("stt_transcript_dropped", reason=result.dropped, no_speech_prob=round(result.no_speech_prob, 2))
        return result

    def _recognize_blocking(self, frame: rtc.AudioFrame, language: str | None, context: Context) -> Transcript:
        return self._transcriber.transcribe_pcm(frame_to_whisper_input(frame), language=language,
                                                prompt=context.prompt, correct=context.correct)


@dataclass
class _Transcription:
    """One utterance being transcribed: the session gets it once released, in release order."""

    task: asyncio.Task[Transcript]
    audio_s: float
    speech_end_time: float  # wall clock
    speculative: bool  # started at a pause of our VAD (not because the session asked mid-speech)


class SpeculativeStream(stt.RecognizeStream):
    """Cuts utterances with its own short-silence VAD stream and transcribes each at the first pause.

    Events, in livekit's order for a streaming STT: START_OF_SPEECH when an utterance opens; END_OF_SPEECH,
    FINAL_TRANSCRIPT (possibly empty) and RECOGNITION_USAGE when its transcript is handed over.

    An utterance is handed over (released) when the session flushes (its VAD saw the end of speech), or
    when our VAD has seen `release_silence_s` of silence. Until then a transcript started at a pause is
    held; if the user speaks again first it is dropped and the utterance goes on. A flush while our VAD
    still hears speech (a manual commit) transcribes what there is at once.

    One caller cannot exhaust the machine: an utterance that reaches `max_utterance_s` is transcribed and
    handed over as it is, and the rest of that stretch of speech is not heard (the agent says so); at most one
    speculative transcription runs at a time (a pause while a dropped one still runs starts none), and a
    dropped one is cancelled if it has not reached the model yet.
    """

    def __init__(self, owner: WhisperSTT, spec_vad: lk_vad.VAD, *, release_silence_s: float,
                 max_utterance_s: float, language: str | None, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=owner, conn_options=conn_options)
        self._owner = owner
        self._vad = spec_vad
        self._release_silence_s = release_silence_s
        self._max_utterance_s = max_utterance_s
        self._language = language
        self._reset()

    def _reset(self) -> None:
        self._utterance: list[rtc.AudioFrame] | None = None  # the open utterance's audio
        self._speaking = False  # our VAD's view
        self._held: _Transcription | None = None  # started at our VAD's end of speech, not released
        self._released: asyncio.Queue[_Transcription | None] = asyncio.Queue()
        self._pushed = 0  # input samples given to our VAD
        self._processed = 0  # input samples our VAD has run over
        self._flushes: deque[int] = deque()  # self._pushed at each flush, waiting for the VAD to catch up
        self._flush_slack = 0
        self._utterance_s = 0.0
        self._capped = False  # the utterance passed max_utterance_s: nothing is transcribed until the turn ends
        self._spec_threads = 0  # speculative transcriptions whose thread has not finished
        self._waiting_end: float | None = None  # a pause that waits for the running speculative thread
        self._silence_s = 0.0  # our VAD's silence so far, as of its last inference

    async def _run(self) -> None:
        self._reset()
        vad_stream = self._vad.stream()
        tasks = [
            asyncio.create_task(self._feed(vad_stream), name="knotd_stt_feed"),
            asyncio.create_task(self._follow(vad_stream), name="knotd_stt_follow"),
            asyncio.create_task(self._hand_over(), name="knotd_stt_hand_over"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            await utils.aio.cancel_and_wait(*tasks)
            await vad_stream.aclose()
            leftovers = [self._held] if self._held is not None else []
            while not self._released.empty():
                leftovers.append(self._released.get_nowait())
            for transcription in leftovers:
                if transcription is not None:
                    _forget(transcription)

    async def _feed(self, vad_stream: lk_vad.VADStream) -> None:
        async for item in self._input_ch:
            if isinstance(item, self._FlushSentinel):
                # Flushes come in audio order: act once our VAD has heard the audio before this one.
                self._flushes.append(self._pushed)
                self._check_flushes()
                continue
            if not self._flush_slack:
                self._flush_slack = 2 * int(_VAD_WINDOW_S * item.sample_rate)
            vad_stream.push_frame(item)
            self._pushed += item.samples_per_channel
        vad_stream.end_input()

    async def _follow(self, vad_stream: lk_vad.VADStream) -> None:
        async for ev in vad_stream:
            if ev.type == lk_vad.VADEventType.INFERENCE_DONE:
                self._on_inference(ev)
            elif ev.type == lk_vad.VADEventType.START_OF_SPEECH:
                self._on_speech_started(ev)
            elif ev.type == lk_vad.VADEventType.END_OF_SPEECH:
                self._on_speech_ended(ev)
        # The input ended: whatever was said goes to the session.
        if self._held is None and self._utterance:
            self._held = self._transcribe(self._utterance, time.time(), speculative=False)
        if self._held is not None:
            self._release()
        self._released.put_nowait(None)

    def _on_inference(self, ev: lk_vad.VADEvent) -> None:
        if self._utterance is not None and not self._capped:
            self._utterance.extend(ev.frames)
            self._utterance_s += sum(f.duration for f in ev.frames)
            if self._utterance_s >= self._max_utterance_s and self._speaking:
                self._cap()
        self._processed += sum(f.samples_per_channel for f in ev.frames)
        self._silence_s = ev.raw_accumulated_silence
        if self._capped and self._silence_s >= self._release_silence_s:
            self._capped = False  # the turn is over: the caller is heard again
        if self._held is not None and ev.raw_accumulated_silence >= self._release_silence_s:
            self._release()
        self._check_flushes()

    def _on_speech_started(self, ev: lk_vad.VADEvent) -> None:
        self._speaking = True
        self._waiting_end = None  # that pause is over
        if self._capped:
            return
        if self._utterance is None:
            self._utterance = list(ev.frames)  # Silero's prefix padding and the speech so far
            self._utterance_s = sum(f.duration for f in ev.frames)
            self._event_ch.send_nowait(stt.SpeechEvent(type=stt.SpeechEventType.START_OF_SPEECH))
        elif self._held is not None:
            # The user went on before the session's VAD ended the turn: the early transcript would miss
            # the rest. The utterance's audio (with the pause) keeps growing and is transcribed whole.
            self._held.task.cancel()  # frees the thread if it has not started; a running one finishes unread
            _forget(self._held)
            self._held = None
            metrics.STT_SPECULATIVE.labels(result="discarded").inc()

    def _cap(self) -> None:
        """The utterance is as long as allowed: hand over what there is; the rest of the turn is not transcribed
    (until the session ends the turn or a pause as long as its VAD needs)."""
        log.warning("stt_utterance_capped", max_utterance_s=self._max_utterance_s)
        self._owner._capped += 1
        if self._held is None and self._utterance:
            # Without the prompt: on a full 30 s window prompted Whisper reports a no-speech
            # probability near 0.9 for real speech, and the echo guard would drop the whole monologue.
            self._held = self._transcribe(self._utterance, time.time(), speculative=False, prompted=False)
        if self._held is not None:
            self._release()
        self._capped = True
        self._utterance = None

    def _on_speech_ended(self, ev: lk_vad.VADEvent) -> None:
        self._speaking = False
        speech_end = time.time() - ev.silence_duration - ev.inference_duration
        if self._spec_threads:
            # One speculative run at a time: this pause's starts when the running one's thread is done.
            metrics.STT_SPECULATIVE.labels(result="skipped").inc()
            self._waiting_end = speech_end
            return
        self._start_speculative(speech_end)

    def _start_speculative(self, speech_end: float) -> None:
        self._waiting_end = None
        if self._utterance and self._held is None and not self._speaking:
            self._held = self._transcribe(list(self._utterance), speech_end, speculative=True)
            if self._silence_s >= self._release_silence_s:  # started late: the pause is long enough already
                self._release()

    def _speculative_thread_done(self) -> None:
        self._spec_threads -= 1
        if not self._spec_threads and self._waiting_end is not None:
            self._start_speculative(self._waiting_end)

    def _check_flushes(self) -> None:
        while self._flushes and self._processed + self._flush_slack >= self._flushes[0]:
            self._flushes.popleft()
            self._capped = False  # the session ended the turn
            if self._held is None and self._utterance:
                self._held = self._transcribe(list(self._utterance), time.time(), speculative=False)
            if self._held is not None:
                self._release()

    def _release(self) -> None:
        held, self._held = self._held, None
        assert held is not None
        if held.speculative:
            metrics.STT_SPECULATIVE.labels(result="used").inc()
        # Still speaking (a flush mid-speech): what follows is a new utterance.
        self._waiting_end = None
        self._utterance = [] if self._speaking else None
        self._utterance_s = 0.0
        self._released.put_nowait(held)

    def _transcribe(self, frames: list[rtc.AudioFrame], speech_end_time: float, *,
                    speculative: bool, prompted: bool = True) -> _Transcription:
        submitted = None
        if speculative:
            loop = asyncio.get_running_loop()

            def submitted(work: Future[Transcript]) -> None:
                self._spec_threads += 1
                work.add_done_callback(lambda _w: _call_soon(loop, self._speculative_thread_done))

        context = self._owner.current_context()
        if not prompted:
            context = context._replace(prompt=None)  # the phase's corrections still apply
        task = asyncio.create_task(self._owner.transcribe_frames(frames, self._language, context, submitted=submitted),
                                   name="knotd_stt_transcribe")
        return _Transcription(task, sum(f.duration for f in frames), speech_end_time, speculative)

    async def _hand_over(self) -> None:
        while (item := await self._released.get()) is not None:
            result = await item.task  # an APIError ends the stream; livekit then opens a new one
            request_id = utils.shortuuid("stt_")
            self._event_ch.send_nowait(stt.SpeechEvent(
                type=stt.SpeechEventType.END_OF_SPEECH, request_id=request_id,
                speech_end_time=item.speech_end_time))
            self._event_ch.send_nowait(stt.SpeechEvent(
                type=stt.SpeechEventType.FINAL_TRANSCRIPT, request_id=request_id,
                alternatives=[stt.SpeechData(language=result.language, text=result.text)],
                speech_end_time=item.speech_end_time))
            self._event_ch.send_nowait(stt.SpeechEvent(
                type=stt.SpeechEventType.RECOGNITION_USAGE, request_id=request_id,
                recognition_usage=stt.RecognitionUsage(audio_duration=item.audio_s)))


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass  # the session's loop is closed: nobody is waiting any more


def _forget(transcription: _Transcription) -> None:
    """Drop a transcription whose result nobody will read (the thread runs on; its error is not news)."""
    transcription.task.add_done_callback(lambda t: t.cancelled() or t.exception())
