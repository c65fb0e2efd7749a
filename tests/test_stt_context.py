"""Phase-aware recognition with the real Whisper base: the context, the echo guard, one context per session.

Accuracy over the labelled answer set is measured by benchmarks/stt_context.py, not asserted here.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from knotd.agent import register_plugins
from knotd.agent.local_io import read_wav
from knotd.agent.local_session import converse
from knotd.agent.session import AgentResources, KnotencheckSession
from knotd.agent.stt import Context, WhisperSTT, WhisperTranscriber
from knotd.bootstrap import session_observers
from knotd.config import SessionSettings, Settings, SttSettings
from knotd.conversation.phases import PhaseScript
from knotd.demo import bundled_requests
from knotd.speech.models import load_models
from knotd.state import DaemonState
from tests.audio import contains_words, have_model_packages, have_speech_tools, shared_whisper
from tests.phase_answers import NOISES, noise_pcm
from tests.test_stt import to_frames

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(not have_model_packages(), reason="install knotd[models]"),
    pytest.mark.skipif(not have_speech_tools(), reason="needs espeak-ng and sox"),
]

STEPS = ("step_location", "step_size", "step_since", "step_changes")
# No speech at all; with a prompt, Whisper base "hears" its prompt or loops in several of them.
NOISY = ("silence-8s", "white-quiet-2s", "white-loud-4s", "pink-loud-5s", "hum50-3s", "clicks-loud-3s")


@pytest.fixture(scope="module")
def script() -> PhaseScript:
    return PhaseScript.load()


@pytest.fixture(scope="module")
def settings(model_dir) -> SttSettings:
    return SttSettings(model=str(model_dir))


@pytest.fixture(scope="module")
def models(model_dir):
    """Whisper and Silero as the daemon loads them, once for the session-level tests."""
    register_plugins()
    return load_models(Settings(stt=SttSettings(model=str(model_dir))))


def prompt_for(script: PhaseScript, phase: str) -> str:
    return script.phase(phase).recognition.prompt(script.phase(phase).say)


def bundled_pcm(name: str) -> np.ndarray:
    frame = read_wav(next(p for p in bundled_requests() if p.name == name))
    return np.frombuffer(frame.data, dtype=np.int16).astype(np.float32) / 32768


def test_prompted_whisper_gives_no_text_for_silence_or_noise(script, settings):
    """Silence, hiss, hum and clicks with each step's context: nothing comes out, though Whisper decoded
    something (an echo of the question, a loop) for some of them: the guard dropped it."""
    transcriber = WhisperTranscriber(shared_whisper(), settings)
    heard = []
    for i, name in enumerate(NOISY):
        clip = next(c for c in NOISES if c.name == name)
        result = transcriber.transcribe_pcm(noise_pcm(clip), prompt=prompt_for(script, STEPS[i % len(STEPS)]))
        assert result.text == "", (name, result)
        heard.append(result.heard)
    assert any(heard), "Whisper decoded nothing at all: the guard was not exercised"


def test_context_brings_the_bundled_location_answer_through(script, settings):
    """The demo's own answer "Er sitzt am Hals, neben dem Kehlkopf." keeps its place words with the context."""
    transcriber = WhisperTranscriber(shared_whisper(), settings)
    result = transcriber.transcribe_pcm(bundled_pcm("demo_de_2.wav"), prompt=prompt_for(script, "step_location"))
    assert result.dropped is None
    assert script.phase("step_location").recognition.normalise(result.text) == "Hals, Kehlkopf", result.text


async def test_sessions_on_one_model_each_transcribe_with_their_own_context(script, settings):
    """Two sessions (job threads, own event loops) on the shared model at once, one asked for the place and
    one for the size: each utterance is decoded with its own session's prompt, and its words come through."""
    cases = [("step_location", "demo_de_2.wav", "kehlkopf"), ("step_size", "demo_de_3.wav", "kirsche")]
    barrier = threading.Barrier(len(cases))

    def session(phase: str, clip: str) -> tuple[str, str | None]:
        prompt = prompt_for(script, phase)
        seen: list[str | None] = []

        async def run() -> str:
            stt = WhisperSTT(shared_whisper(), settings, prompt=lambda: prompt)
            original = stt.transcribe_frames

            async def spy(frames, language, prompt=None):
                result = await original(frames, language, prompt)
                seen.append(result.prompt)
                return result

            stt.transcribe_frames = spy  # what reached Whisper with this session's utterance
            frames = to_frames((bundled_pcm(clip) * 32768).astype(np.int16), 16000)
            barrier.wait(timeout=60)
            return (await stt.recognize(frames)).alternatives[0].text

        return asyncio.run(run()), seen[0] if seen else None

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = [pool.submit(session, phase, clip) for phase, clip, _ in cases]
        results = [f.result(timeout=120) for f in futures]

    for (phase, _, word), (text, used_prompt) in zip(cases, results, strict=True):
        assert used_prompt == prompt_for(script, phase)
        assert contains_words(text, (word,), min_ratio=1.0), (phase, text)


async def test_the_demo_session_summarises_the_answers_it_understood(models, model_dir, tmp_path):
    """The whole check on local audio with the bundled answers, as `knotd demo` runs it (speculative STT with
    each phase's context): the summary record keeps one entry per check step, normalised when transcripts
    may be kept, else only whether the answer was understood.

    Only the duration is asserted word for word: Whisper base hears that clip the same every time, while
    the other clips' transcripts vary with where the VAD cuts them (benchmarks/stt_context.py measures it).
    """
    settings = Settings(stt=SttSettings(model=str(model_dir)),
                        session=SessionSettings(state_dir=str(tmp_path), record_transcripts=True))
    clips = [read_wav(p) for p in bundled_requests()]
    result = await converse(AgentResources.load(settings, models), session_observers(settings, DaemonState()), clips,
                            realtime_playout=False)

    said = [item.text_content or "" for item in result.conversation.session.history.items
            if getattr(item, "role", None) == "user"]
    assert len(said) == len(clips) and result.record.final_phase == "goodbye", said
    answers = result.record.to_record()["answers"]
    assert list(answers) == ["location", "size", "since", "changes"]
    assert answers["since"] == {"understood": True, "answer": "3 Wochen"}, said
    for field, entry in answers.items():
        assert entry["understood"] == (entry["answer"] is not None), (field, entry)

    private = result.conversation.machine.recognised_answers(with_values=False)
    assert {k: v.to_record() for k, v in private.items()} == {
        field: {"understood": entry["understood"]} for field, entry in answers.items()}


async def test_the_speculative_run_is_transcribed_with_the_sessions_context(script, models, model_dir):
    """The streaming STT (speculative, on the session's VAD) asks the session for its context as each
    transcription starts and decodes with it: the place words of the bundled answer come through."""
    from tests.test_latency import recognise

    prompt = prompt_for(script, "step_location")
    asked: list[str] = []

    def context() -> str:
        asked.append(prompt)
        return prompt

    stt = WhisperSTT(models.whisper, SttSettings(model=str(model_dir), speculative=True), vad=models.vad,
                     prompt=context)
    used: list[str | None] = []
    original = stt.transcribe_frames

    async def spy(frames, language, prompt=None, **kwargs):
        result = await original(frames, language, prompt, **kwargs)
        used.append(result.prompt)
        return result

    stt.transcribe_frames = spy
    samples = (bundled_pcm("demo_de_2.wav") * 32768).astype(np.int16)
    events = await recognise(stt, samples)

    text = [e for e in events if e.alternatives][-1].alternatives[0].text
    assert stt.speculative and asked and used and set(used) == {prompt}
    assert script.phase("step_location").recognition.normalise(text) == "Hals, Kehlkopf", text


async def test_the_stt_hands_over_the_phase_corrected_transcript(script, settings):
    """Without a prompt Whisper base hears the bundled size answer as "… wie eine Kirche."; with the size
    phase's correction in the context, the transcript livekit gets (and the session after it) says Kirsche."""
    frames = to_frames((bundled_pcm("demo_de_3.wav") * 32768).astype(np.int16), 16000)
    size = script.phase("step_size").recognition

    async def heard(context: Context) -> str:
        stt = WhisperSTT(shared_whisper(), settings, prompt=lambda: context)
        return (await stt.recognize(frames)).alternatives[0].text

    assert size.normalise(await heard(Context(None))) is None, "Whisper now hears this clip right"
    text = await heard(Context(None, size.correct))
    assert size.normalise(text) == "Kirsche", text


async def test_the_session_corrects_what_it_hears_towards_the_current_phase(models, model_dir, tmp_path):
    """A session asking whether the knot has changed hears "Ja, er ist gewachsen." (espeak-ng, noise, from the
    tuning half) through its own STT as "Ja, er ist gemachsend." and hands on "gewachsen": the text the
    guardrails, the phase machine and the summary get."""
    from tests.phase_answers import TUNING, answer_samples

    settings = Settings(stt=SttSettings(model=str(model_dir)),
                        session=SessionSettings(state_dir=str(tmp_path), record_transcripts=True))
    state = DaemonState()
    state.bind_loop(asyncio.get_running_loop())
    conversation = KnotencheckSession(AgentResources.load(settings, models), session_observers(settings, state),
                                      "s-correct", "room-1")
    for answer in (None, "Ja.", "Am Hals.", "Wie eine Erbse.", "Seit drei Wochen."):
        conversation.machine.respond(answer)
    assert conversation.machine.current == "step_changes"
    answer = next(a for a in TUNING if a.text == "Ja, er ist gewachsen.")
    frames = to_frames(answer_samples(answer), 16000)

    stt = conversation.session.stt
    context = conversation.recognition_context()
    result = await stt.transcribe_frames(frames, None, context)
    assert "gewachsen" not in result.heard.lower(), "Whisper now hears this clip right"
    text = (await stt.recognize(frames)).alternatives[0].text
    assert text == result.text and "gewachsen" in text, (result.heard, text)
    conversation.machine.respond(text)
    assert conversation.machine.recognised_answers(with_values=True)["changes"].answer == "gewachsen"
    await conversation.aclose("disconnected")
