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
