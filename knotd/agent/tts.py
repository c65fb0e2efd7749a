"""Text to speech behind livekit's TTS ABC: espeak-ng (default), Piper, or an OpenAI-compatible endpoint.

`EspeakTTS` runs `espeak-ng --stdout` per request and streams its PCM to livekit as it arrives, resampled
to `tts.sample_rate`. The agent's sentence tokenizer feeds it one sentence at a time (livekit wraps a
non-streaming TTS in a StreamAdapter), so the first audio of a reply comes after the first sentence only.

This module does not decide what is said (LLM and guardrails do) and keeps no audio after a request.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from livekit import rtc
from livekit.agents import APIConnectionError, APIError, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

from knotd.config import TtsSettings
from knotd.errors import ModelError
from knotd.stages import stage

if TYPE_CHECKING:
    from piper import PiperVoice

ESPEAK = "espeak-ng"
_READ_CHUNK = 8192
# Longest a request may run; espeak-ng needs ~20 ms for 5 s of speech.
_ESPEAK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WavFormat:
    sample_rate: int
    num_channels: int


async def read_wav_header(stream: asyncio.StreamReader) -> WavFormat | None:
    """Read a streamed WAV header up to the start of the data chunk; None if the stream is empty.

    espeak-ng --stdout cannot seek back, so its RIFF and data sizes are placeholders (0x7ffff…); they are
    ignored here and the PCM simply runs until end of stream.

    Raises:
        APIError: the stream is not 16-bit PCM WAV.
    """
    try:
        riff = await stream.readexactly(12)
    except asyncio.IncompleteReadError as err:
        if not err.partial:
            return None
        raise APIError("espeak-ng wrote a truncated WAV header", retryable=False) from None
    if riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
        raise APIError("espeak-ng did not write WAV audio", retryable=False)
    fmt: WavFormat | None = None
    try:
        while True:
            chunk_id, size = struct.unpack("<4sI", await stream.readexactly(8))
            if chunk_id == b"data":
                break
            body = await stream.readexactly(size + (size & 1))
            if chunk_id == b"fmt ":
                audio_format, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                if audio_format != 1 or bits != 16:
                    raise APIError(f"unsupported WAV format {audio_format}/{bits} bit", retryable=False)
                fmt = WavFormat(rate, channels)
    except asyncio.IncompleteReadError:
        raise APIError("espeak-ng wrote a truncated WAV header", retryable=False) from None
    if fmt is None:
        raise APIError("espeak-ng wrote WAV audio without a format chunk", retryable=False)
    return fmt


class _PcmForwarder:
    """Resamples s16 mono PCM chunks to the output rate and pushes them to livekit's AudioEmitter."""

    def __init__(self, emitter: tts.AudioEmitter, in_rate: int, out_rate: int) -> None:
        self._emitter = emitter
        self._resampler = None if in_rate == out_rate else rtc.AudioResampler(
            in_rate, out_rate, num_channels=1, quality=rtc.AudioResamplerQuality.HIGH)
        self._carry = b""  # an odd trailing byte: half a sample

    def push(self, data: bytes) -> None:
        data = self._carry + data
        cut = len(data) & ~1
        data, self._carry = data[:cut], data[cut:]
        if not data:
            return
        if self._resampler is None:
            self._emitter.push(data)
            return
        for frame in self._resampler.push(bytearray(data)):
            self._emitter.push(frame.data.tobytes())

    def flush(self) -> None:
        if self._resampler is not None:
            for frame in self._resampler.flush():
                self._emitter.push(frame.data.tobytes())


class EspeakTTS(tts.TTS):
    """espeak-ng as a livekit TTS: robotic but local, instant (RTF ≈ 0.005) and German-capable."""

    def __init__(self, settings: TtsSettings, *, executable: str = ESPEAK) -> None:
        """Cheap; `build_tts()` also checks that espeak-ng and the voice exist."""
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False), sample_rate=settings.sample_rate,
                         num_channels=1)
        self.voice = settings.voice
        self.speed_wpm = settings.speed_wpm
        self.executable = executable

    @property
    def model(self) -> str:
        return f"espeak-ng/{self.voice}"

    @property
    def provider(self) -> str:
        return "espeak-ng"

    def command(self) -> list[str]:
        """The espeak-ng command line; the text goes to its stdin, never into argv."""
        return [self.executable, "-v", self.voice, "-s", str(self.speed_wpm), "-b", "1", "--stdin", "--stdout"]

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
                   ) -> tts.ChunkedStream:
        return _EspeakStream(tts=self, input_text=text, conn_options=conn_options)


class _EspeakStream(tts.ChunkedStream):
    def __init__(self, *, tts: EspeakTTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._espeak = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(request_id=utils.shortuuid("tts_"), sample_rate=self._espeak.sample_rate,
                                  num_channels=1, mime_type="audio/pcm")
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._espeak.command(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=child_environment())
        except OSError as err:
            raise APIError(f"cannot run {self._espeak.executable}: {err.strerror or err} "
                           "(install the espeak-ng package)", retryable=False) from None
        try:
            async with asyncio.timeout(_ESPEAK_TIMEOUT_S):
                await self._stream_audio(proc, output_emitter)
        except TimeoutError:
            raise APIConnectionError(f"espeak-ng took longer than {_ESPEAK_TIMEOUT_S:g} s") from None
        finally:
            if proc.returncode is None:  # cancelled (the user interrupted) or failed: stop espeak-ng
                proc.kill()
                await proc.wait()

    async def _stream_audio(self, proc: asyncio.subprocess.Process, emitter: tts.AudioEmitter) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        # espeak-ng --stdin reads all input before it speaks, so writing first cannot deadlock.
        try:
            proc.stdin.write(self.input_text.encode("utf-8"))
            await proc.stdin.drain()
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # espeak-ng exited early (e.g. unknown voice); its exit status and stderr say why, below
        stderr_task = asyncio.ensure_future(proc.stderr.read())
        try:
            fmt = await read_wav_header(proc.stdout)
            if fmt is not None:
                if fmt.num_channels != 1:
                    raise APIError(f"espeak-ng wrote {fmt.num_channels} channels", retryable=False)
                forwarder = _PcmForwarder(emitter, fmt.sample_rate, self._espeak.sample_rate)
                while data := await proc.stdout.read(_READ_CHUNK):
                    forwarder.push(data)
                forwarder.flush()
            returncode = await proc.wait()
            stderr = await stderr_task
        finally:
            stderr_task.cancel()
        if returncode != 0:
            message = (stderr.decode("utf-8", "replace").strip().splitlines() or [""])[0]
            raise APIError(f"espeak-ng failed (exit {returncode}): {message}", retryable=False)


class PiperTTS(tts.TTS):
    """Piper (`piper-tts`, optional) with a local .onnx voice; each request is synthesized in a thread."""

    def __init__(self, voice: PiperVoice, settings: TtsSettings) -> None:
        super().__init__(capabilities=tts.TTSCapabilities(streaming=False), sample_rate=settings.sample_rate,
                         num_channels=1)
        self.voice = voice
        self.voice_name = Path(settings.piper_model).stem

    @property
    def model(self) -> str:
        return f"piper/{self.voice_name}"

    @property
    def provider(self) -> str:
        return "piper"

    def synthesize(self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
                   ) -> tts.ChunkedStream:
        return _PiperStream(tts=self, input_text=text, conn_options=conn_options)


class _PiperStream(tts.ChunkedStream):
    def __init__(self, *, tts: PiperTTS, input_text: str, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._piper = tts

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(request_id=utils.shortuuid("tts_"), sample_rate=self._piper.sample_rate,
                                  num_channels=1, mime_type="audio/pcm")
        try:
            chunks = await asyncio.to_thread(lambda: list(self._piper.voice.synthesize(self.input_text)))
        except (RuntimeError, ValueError, OSError) as err:
            raise APIError(f"piper failed: {type(err).__name__}: {err}", retryable=False) from err
        forwarder: _PcmForwarder | None = None
        for chunk in chunks:
            if forwarder is None:
                forwarder = _PcmForwarder(output_emitter, chunk.sample_rate, self._piper.sample_rate)
            forwarder.push(chunk.audio_int16_bytes)
        if forwarder is not None:
            forwarder.flush()


def build_tts(settings: TtsSettings) -> tts.TTS:
    """The TTS `settings.engine` names: "espeak" (default), "piper" or "openai". Timed as stage `tts_init`.

    Blocks briefly (Piper loads its voice here); call it off the event loop or before it starts.

    Raises:
        ModelError: the engine's program, package or voice is missing, in one line.
    """
    with stage("tts_init", engine=settings.engine):
        if settings.engine == "espeak":
            return _build_espeak(settings)
        if settings.engine == "piper":
            return _build_piper(settings)
        if settings.engine == "openai":
            return _build_openai(settings)
        raise ModelError(f"unknown TTS engine {settings.engine!r} (use espeak, piper or openai)")


# What a child process (espeak-ng) may see of knotd's environment; the secrets (LIVEKIT_API_SECRET, …) and
# everything else stay behind.
_CHILD_ENV_KEYS = ("LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "ESPEAK_DATA_PATH")
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"


def child_environment() -> dict[str, str]:
    """A minimal environment for child processes: a fixed PATH and the locale."""
    env = {key: os.environ[key] for key in _CHILD_ENV_KEYS if key in os.environ}
    env["PATH"] = _CHILD_PATH
    return env


def _build_espeak(settings: TtsSettings) -> EspeakTTS:
    executable = shutil.which(ESPEAK)
    if executable is None:
        raise ModelError("espeak-ng is not installed (apt install espeak-ng); it is the default TTS")
    # Speaking one letter quietly (-q) checks the voice now instead of at the first reply.
    probe = subprocess.run([executable, "-v", settings.voice, "-q", "--stdin"], input=b"a",
                           capture_output=True, timeout=10, check=False, env=child_environment())
    if probe.returncode != 0:
        raise ModelError(f"espeak-ng has no voice {settings.voice!r} (list them with `espeak-ng --voices`)")
    return EspeakTTS(settings, executable=executable)


def _build_piper(settings: TtsSettings) -> PiperTTS:
    try:
        from piper import PiperVoice
    except ImportError:
        raise ModelError("tts.engine is \"piper\" but the piper-tts package is not installed "
                         "(pip install piper-tts)") from None
    model = Path(settings.piper_model)
    if not model.is_file():
        raise ModelError(f"Piper voice model not found: {model}")
    config = model.with_name(model.name + ".json")
    if not config.is_file():
        raise ModelError(f"Piper voice config not found: {config} (it belongs next to the .onnx file)")
    try:
        voice = PiperVoice.load(model, config_path=config)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"cannot load the Piper voice {model}: {type(err).__name__}: {err}") from err
    return PiperTTS(voice, settings)


def _build_openai(settings: TtsSettings) -> tts.TTS:
    from livekit.plugins import openai  # deferred: pulls in the openai client (≈0.6 s)

    # Local OpenAI-compatible servers often need no key, but the client refuses to start without one.
    api_key = settings.api_key.reveal() or "unused"
    return openai.TTS(base_url=settings.base_url, model=settings.model, voice=settings.voice, api_key=api_key)
