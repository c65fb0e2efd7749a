"""Secrets never reach a log line: not whole, not cut short in a traceback, not as a derived token."""

from __future__ import annotations

import secrets
import string

import pytest
import structlog

from knotd import logs

KEY = "sk-proj-" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(160))


def _fail_with_key_in_locals(api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}  # noqa: F841 - a local a traceback could show
    join_jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ3b3JrZXIiLCJ2aWRlbyI6e319.c2lnbmF0dXJlLXZhbHVl"  # noqa: F841
    raise ConnectionError("worker gave up")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_168_character_key_leaves_no_prefix_in_a_logged_traceback(fmt, capsys):
    assert len(KEY) == 168
    logs.configure("info", fmt, [KEY])
    log = structlog.get_logger("test")
    try:
        _fail_with_key_in_locals(KEY)
    except ConnectionError:
        log.exception("worker_failed")
    log.error("request_failed", detail=repr(KEY)[:80] + "…", header=f"Authorization: Bearer {KEY[:20]}")
    err = capsys.readouterr().err
    assert "worker gave up" in err and "_fail_with_key_in_locals" in err  # the traceback itself is there
    assert KEY[:logs.PREFIX_CHARS] not in err
    assert "eyJzdWIiOiJ3b3JrZXIi" not in err
    assert logs.REDACTED in err


def test_redaction_keeps_the_text_around_the_secret():
    redact = logs.SecretRedactor([KEY])
    out = redact(None, "error", {"event": f"key='{KEY[:30]}…'+138 rejected", "n": 3})
    assert out == {"event": f"key='{logs.REDACTED}…'+138 rejected", "n": 3}
    assert redact(None, "info", {"event": "room knotencheck-1 joined"})["event"] == "room knotencheck-1 joined"


def test_two_keys_with_the_same_head_are_each_redacted_whole():
    """An LLM key and a TTS key both start "sk-proj-": logging either leaves nothing of it behind."""
    other = "sk-proj-" + "Q" * 40
    redact = logs.SecretRedactor([KEY, other])
    for key in (KEY, other):
        out = redact(None, "error", {"event": f"401 for key {key} (retrying)"})["event"]
        assert out == f"401 for key {logs.REDACTED} (retrying)"


# -- what mutation testing (./dev.sh mutate) showed was not pinned down: the line format on the journal -------


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_auto_format_is_json_under_systemd_and_on_pipes_and_readable_lines_on_a_terminal(monkeypatch):
    assert logs.choose_format("console", {"JOURNAL_STREAM": "8:1"}, _Stream(False)) == "console"
    assert logs.choose_format("json", {}, _Stream(True)) == "json"
    assert logs.choose_format("auto", {"JOURNAL_STREAM": "8:1"}, _Stream(True)) == "json"
    assert logs.choose_format("auto", {"journal_stream": "8:1"}, _Stream(True)) == "console"
    assert logs.choose_format("auto", {}, _Stream(True)) == "console"
    assert logs.choose_format("auto", {}, _Stream(False)) == "json"
    assert logs.choose_format("auto", {}, object()) == "json"  # a stream that cannot tell
    # by default: the process environment and stderr
    monkeypatch.setattr("sys.stderr", _Stream(True))
    monkeypatch.setenv("JOURNAL_STREAM", "8:1")
    assert logs.choose_format("auto") == "json"
    monkeypatch.delenv("JOURNAL_STREAM")
    assert logs.choose_format("auto") == "console"
    monkeypatch.setattr("sys.stderr", _Stream(False))
    assert logs.choose_format("auto") == "json"


def _lines(err: str) -> list[dict]:
    import json

    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


@pytest.fixture
def fresh_logging():
    """structlog's defaults and unset levels, so each test sees what configure() alone sets up (not what an
    earlier configure() in this process left behind)."""
    import logging

    structlog.reset_defaults()
    for name in ("aiohttp.access", "asyncio", "faster_whisper", ""):
        logging.getLogger(name).setLevel(logging.NOTSET)
    yield


def test_by_default_info_lines_are_json_with_level_logger_and_a_utc_timestamp(capsys, fresh_logging):
    """Not on a terminal (as under systemd): one JSON object per line, with an ISO timestamp in UTC."""
    import re

    logs.configure()
    structlog.get_logger("knotd.test").info("room_joined", room="r1", n=2)
    structlog.get_logger("knotd.test").debug("not_shown")
    (line,) = _lines(capsys.readouterr().err)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line.pop("timestamp"))
    assert line == {"event": "room_joined", "room": "r1", "n": 2, "level": "info", "logger": "knotd.test"}


def test_livekit_stdlib_lines_keep_their_extra_fields(capsys, fresh_logging):
    import logging

    logs.configure("info", "json", [])
    logging.getLogger("livekit.agents").warning("worker connection lost", extra={"retry_in": 2.0})
    (line,) = _lines(capsys.readouterr().err)
    assert line["event"] == "worker connection lost" and line["retry_in"] == 2.0
    assert line["level"] == "warning" and line["logger"] == "livekit.agents" and line["timestamp"].endswith("Z")


def test_chatty_third_party_loggers_are_quiet_at_info(capsys, fresh_logging):
    import logging

    logs.configure("info", "json", [])
    for name in ("aiohttp.access", "asyncio", "faster_whisper"):
        logging.getLogger(name).info("chatter from %s", name)
        logging.getLogger(name).warning("trouble from %s", name)
    events = [line["event"] for line in _lines(capsys.readouterr().err)]
    assert events == ["trouble from aiohttp.access", "trouble from asyncio", "trouble from faster_whisper"]


def test_a_json_traceback_shows_no_local_variables(capsys, fresh_logging):
    logs.configure("info", "json", [])
    try:
        _fail_with_key_in_locals("not-a-configured-secret-but-a-local")
    except ConnectionError:
        structlog.get_logger("test").exception("worker_failed")
    (line,) = _lines(capsys.readouterr().err)
    frames = line["exception"][0]["frames"]
    assert any(f["name"] == "_fail_with_key_in_locals" for f in frames)
    assert "not-a-configured-secret-but-a-local" not in repr(line)


def test_console_lines_are_plain_text_with_a_plain_traceback(capsys, fresh_logging):
    logs.configure("info", "console", [])
    try:
        _fail_with_key_in_locals("x")
    except ConnectionError:
        structlog.get_logger("test").exception("worker_failed")
    err = capsys.readouterr().err
    assert "worker_failed" in err and "Traceback (most recent call last):" in err
    assert "\x1b[" not in err and "╭" not in err  # no colour codes, no boxed (rich) traceback


def test_a_short_secret_and_every_occurrence_of_a_secret_are_redacted():
    redact = logs.SecretRedactor(["abcd", "abc"])
    assert redact(None, "info", {"event": "k=abcd, again abcd"})["event"] == f"k={logs.REDACTED}, again {logs.REDACTED}"
    assert redact(None, "info", {"event": "abc"})["event"] == "abc"  # shorter than 4: never a secret
    out = logs.SecretRedactor([KEY])(None, "info", {"event": f"{KEY} and {KEY}"})
    assert out["event"] == f"{logs.REDACTED} and {logs.REDACTED}"


def test_each_of_several_unrelated_secrets_is_redacted_whole():
    """The LiveKit secret, an LLM key and a TTS key have different heads: logging any one of them leaves none
    of it (the redactor must try every secret, not stop at the first that does not start there)."""
    livekit, llm, tts = "lk-" + "S" * 40, "sk-proj-" + "L" * 60, "tts-key-" + "T" * 20
    redact = logs.SecretRedactor([livekit, llm, tts])
    for secret in (livekit, llm, tts):
        out = redact(None, "error", {"event": f"auth failed with {secret} at the server"})["event"]
        assert out == f"auth failed with {logs.REDACTED} at the server"


def test_an_object_logged_as_a_field_is_redacted_as_its_text():
    """An exception or any object in a field is logged as its text: with the secret in it redacted."""
    redact = logs.SecretRedactor([KEY])
    out = redact(None, "error", {"event": "failed", "error": ConnectionError(f"401 for {KEY}"), "n": None,
                                 "ok": True, "nested": {"list": [ValueError(KEY)]}})
    assert out == {"event": "failed", "error": f"401 for {logs.REDACTED}", "n": None, "ok": True,
                   "nested": {"list": [logs.REDACTED]}}


def test_a_secret_cut_short_at_an_odd_length_leaves_the_text_after_it():
    redact = logs.SecretRedactor([KEY])
    assert redact(None, "error", {"event": f"key={KEY[:31]}… rejected"})["event"] == f"key={logs.REDACTED}… rejected"
