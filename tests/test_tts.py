"""Text to speech: espeak-ng as a livekit TTS, the engine factory, and Whisper hearing the result."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import APIError

from knotd import stages
from knotd.agent import tts as knotd_tts
from knotd.agent.tts import EspeakTTS, build_tts
from knotd.config import Secret, SttSettings, TtsSettings
from knotd.errors import ModelError
from tests.audio import contains_words, have_model_packages, shared_whisper, whisper_base_dir

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

REPLY = "Willkommen beim Knotencheck. Sind Sie einverstanden, dass wir jetzt beginnen?"


async def synthesize(engine, text: str) -> rtc.AudioFrame:
    return await engine.synthesize(text).collect()


def rms(frame: rtc.AudioFrame) -> float:
    samples = np.frombuffer(frame.data, dtype=np.int16).astype(np.float64)
    return float(np.sqrt(np.mean(samples**2)))


@needs_espeak
@pytest.mark.parametrize("sample_rate", [16000, 24000, 48000])
async def test_espeak_speaks_at_the_configured_rate(sample_rate):
    """The reply is mono, audible, at tts.sample_rate, and about as long as the words take at speed_wpm."""
    engine = build_tts(TtsSettings(sample_rate=sample_rate, speed_wpm=160))

    frame = await synthesize(engine, REPLY)

    assert (frame.sample_rate, frame.num_channels) == (sample_rate, 1)
    assert rms(frame) > 500
    expected_s = len(REPLY.split()) / 160 * 60
    assert 0.6 * expected_s < frame.duration < 1.6 * expected_s


@needs_espeak
async def test_faster_speech_is_shorter():
    """speed_wpm reaches espeak-ng: 300 wpm gives clearly shorter audio than 120 wpm."""
    slow = await synthesize(build_tts(TtsSettings(speed_wpm=120)), REPLY)
    fast = await synthesize(build_tts(TtsSettings(speed_wpm=300)), REPLY)

    assert fast.duration < 0.7 * slow.duration


@needs_espeak
async def test_text_that_looks_like_options_is_spoken():
    """Text goes to espeak-ng on stdin, so a reply starting with '-' is speech, not a command-line option."""
    frame = await synthesize(build_tts(TtsSettings()), "-v xx --help")

    assert frame.duration > 0.5 and rms(frame) > 500


@needs_espeak
def test_build_records_the_tts_init_stage():
    """Building the TTS is timed as the tts_init stage."""
    build_tts(TtsSettings())

    assert stages.recent(1)[0].name == "tts_init"


@needs_espeak
def test_unknown_voice_fails_at_build_time():
    """A voice espeak-ng does not have is a start-up error naming the voice, not a silent first reply."""
    with pytest.raises(ModelError, match="no voice 'xx-nope'"):
        build_tts(TtsSettings(voice="xx-nope"))


def test_missing_espeak_says_what_to_install(monkeypatch):
    """Without espeak-ng on PATH the error says which package to install."""
    monkeypatch.setattr(knotd_tts.shutil, "which", lambda name: None)

    with pytest.raises(ModelError, match="apt install espeak-ng"):
        build_tts(TtsSettings())


async def test_espeak_vanishing_at_run_time_is_an_api_error():
    """If the program disappears after start-up, synthesis fails with livekit's APIError, once."""
    engine = EspeakTTS(TtsSettings(), executable="/nonexistent/espeak-ng")

    with pytest.raises(APIError, match="install the espeak-ng package"):
        await synthesize(engine, "Hallo")


@pytest.mark.skipif(importlib.util.find_spec("piper") is not None, reason="piper-tts is installed")
def test_piper_without_the_package_is_a_clear_error():
    """engine = "piper" without piper-tts installed names the package."""
    with pytest.raises(ModelError, match="pip install piper-tts"):
        build_tts(TtsSettings(engine="piper", piper_model="/nonexistent/voice.onnx"))


def test_openai_engine_uses_the_configured_endpoint():
    """engine = "openai" builds livekit's OpenAI TTS for the configured base URL and model, without I/O."""
    from livekit.plugins import openai

    engine = build_tts(TtsSettings(engine="openai", base_url="http://127.0.0.1:9/v1", model="tts-local",
                                   voice="alloy", api_key=Secret("sk-test")))

    assert isinstance(engine, openai.TTS)
    assert engine.model == "tts-local"


@needs_espeak
@pytest.mark.models
@pytest.mark.skipif(not have_model_packages(), reason="install knotd[models]")
async def test_whisper_understands_what_espeak_says():
    """Closing the loop: the agent's spoken reply, transcribed by the agent's own STT, has the words back."""
    from knotd.agent.stt import WhisperSTT

    engine = build_tts(TtsSettings(sample_rate=24000, speed_wpm=150))
    stt = WhisperSTT(shared_whisper(), SttSettings(model=str(whisper_base_dir())))
    text = "Hallo, ich möchte den Knotencheck starten."

    frame = await synthesize(engine, text)
    event = await stt.recognize([frame])

    assert contains_words(event.alternatives[0].text, ("hallo", "knotencheck", "starten"))



def _wrapper(tmp_path, body: str) -> str:
    """An executable that runs the real espeak-ng inside ``body`` (``$ESPEAK "$@"``)."""
    script = tmp_path / "espeak-wrapper"
    script.write_text(f"#!/bin/sh\nESPEAK={shutil.which('espeak-ng')}\n{body}\n")
    script.chmod(0o755)
    return str(script)


@needs_espeak
async def test_espeak_gets_no_secrets_from_knotds_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVEKIT_API_SECRET", "a-secret-that-must-stay-home")
    monkeypatch.setenv("KNOTD_LLM_API_KEY", "sk-proj-stay-home-too")
    env_file = tmp_path / "env.txt"
    engine = EspeakTTS(TtsSettings(), executable=_wrapper(tmp_path, f'env > {env_file}\nexec "$ESPEAK" "$@"'))

    frame = await synthesize(engine, REPLY)

    assert rms(frame) > 500  # the real espeak-ng spoke
    seen = env_file.read_text()
    assert "stay-home" not in seen and "LIVEKIT" not in seen and "KNOTD" not in seen
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in seen


@needs_espeak
async def test_espeak_crashing_mid_sentence_is_an_api_error_not_a_hang(tmp_path):
    """espeak-ng killed after part of the audio: the stream ends with livekit's APIError (the session's TTS
    error path), never a hang or a half-read pipe."""
    engine = EspeakTTS(TtsSettings(), executable=_wrapper(tmp_path, '"$ESPEAK" "$@" | head -c 20000\nkill -SEGV $$'))

    with pytest.raises(APIError, match="espeak-ng failed"):
        await synthesize(engine, REPLY)
