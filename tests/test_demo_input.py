"""`knotd demo` with input it cannot use: one line, exit 2, before the session starts (never a hang)."""

from __future__ import annotations

import os
import struct
import wave

import numpy as np
import pytest

from knotd.cli import main


def _wav(path, *, frames: int, channels: int = 1, width: int = 2, rate: int = 16000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\0" * frames * channels * width)
    return path


def _float32_wav(path):
    data = np.zeros(16000, dtype=np.float32).tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 3, 1, 16000, 64000, 4, 32) + b"data" + struct.pack("<I", len(data))
    path.write_bytes(header + data)
    return path


def _zero_channel_wav(path):
    header = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 0, 16000, 0, 0, 16) + b"data" + struct.pack("<I", 0)
    path.write_bytes(header)
    return path


@pytest.mark.timeout(60)
def test_unusable_audio_and_reply_paths_are_one_line_and_exit_2(tmp_path, capsys):
    good = _wav(tmp_path / "good.wav", frames=16000)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n")
    fifo = tmp_path / "fifo.wav"
    os.mkfifo(fifo)
    (tmp_path / "plain").write_text("")
    cases = {
        "0 frames": ([_wav(tmp_path / "empty.wav", frames=0)], tmp_path / "r.wav", "less than 0.1 s"),
        "text renamed .wav": ([text], tmp_path / "r.wav", "not a 16-bit PCM WAV"),
        "float32": ([_float32_wav(tmp_path / "f32.wav")], tmp_path / "r.wav", "not a 16-bit PCM WAV"),
        "0 channels": ([_zero_channel_wav(tmp_path / "c0.wav")], tmp_path / "r.wav", "not a 16-bit PCM WAV"),
        "8-bit": ([_wav(tmp_path / "u8.wav", frames=16000, width=1)], tmp_path / "r.wav", "16-bit"),
        "a FIFO": ([fifo], tmp_path / "r.wav", "not a regular file"),
        "missing": ([tmp_path / "nope.wav"], tmp_path / "r.wav", "No such file"),
        "unwritable --out": ([good], tmp_path / "plain" / "reply.wav", "cannot write the reply"),
        "--out is a directory": ([good], tmp_path, "Is a directory"),
    }
    for name, (clips, out, expected) in cases.items():
        argv = ["demo", "--out", str(out)]
        for clip in clips:
            argv += ["--audio", str(clip)]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert not (tmp_path / "r.wav").exists()
