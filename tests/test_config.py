"""Config: every class of bad input is one line naming the key, exit code 2, before anything starts."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from knotd.config import ConfigError, load_settings, public_view

ENV = {"LIVEKIT_API_KEY": "devkey", "LIVEKIT_API_SECRET": "a-secret-that-is-long-enough"}
GOOD = """
[livekit]
url = "wss://livekit.example.com"
agent_name = "knotencheck"

[status]
listen = "127.0.0.1:9464"

[worker]
max_sessions = 4
drain_timeout_s = 120
"""


def write(tmp_path, text):
    path = tmp_path / "knotd.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_loads_with_secrets_from_environment(tmp_path):
    settings = load_settings(write(tmp_path, GOOD), ENV)
    assert settings.livekit.url == "wss://livekit.example.com"
    assert settings.worker.max_sessions == 4
    assert settings.worker.drain_timeout_s == 120.0
    assert settings.livekit.api_secret.reveal() == ENV["LIVEKIT_API_SECRET"]
    assert "a-secret" not in repr(settings)
    assert public_view(settings)["livekit"]["api_secret"] == "set"


def test_systemd_credentials_win_over_environment(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "livekit-api-secret").write_text("from-credential-file\n")
    env = {**ENV, "CREDENTIALS_DIRECTORY": str(creds)}
    settings = load_settings(write(tmp_path, GOOD), env)
    assert settings.livekit.api_secret.reveal() == "from-credential-file"
    assert settings.livekit.api_key.reveal() == "devkey"


BAD_CASES = [
    # (id, file text, env, expected key in message, expected line or None)
    ("unknown key", GOOD + "\n[worker]\n", ENV, None, None),  # duplicate table: TOML syntax error
    ("unknown key in section", GOOD.replace("max_sessions = 4", "max_session = 4"), ENV,
     "worker.max_session", 10),
    ("unknown section", GOOD + "\n[wrker]\nx = 1\n", ENV, "wrker", 13),
    ("wrong type", GOOD.replace("max_sessions = 4", 'max_sessions = "four"'), ENV, "worker.max_sessions", 10),
    ("out of range", GOOD.replace("max_sessions = 4", "max_sessions = 0"), ENV, "worker.max_sessions", 10),
    ("bad listen", GOOD.replace('"127.0.0.1:9464"', '"localhost"'), ENV, "status.listen", 7),
    ("bad enum", GOOD + '\n[log]\nformat = "xml"\n', ENV, "log.format", 14),
    ("missing url", GOOD.replace('url = "wss://livekit.example.com"', ""), ENV, "livekit.url", None),
    ("bad url", GOOD.replace("wss://livekit.example.com", "ftp://x"), ENV, "livekit.url", 3),
    ("missing secret", GOOD, {"LIVEKIT_API_KEY": "k"}, "livekit.api_secret", None),
    ("secret in file", GOOD.replace('agent_name = "knotencheck"', 'api_secret = "plain"'), ENV,
     "livekit.api_secret", 4),
    ("toml syntax", "[livekit\nurl = 1", ENV, "<file>", None),
]


@pytest.mark.parametrize("text,env,key,line", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_config_is_one_error_naming_the_key(tmp_path, text, env, key, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env)
    message = str(info.value)
    assert "\n" not in message
    if key:
        assert f"at {key}" in message
    if line:
        assert f"{path}:{line}" in message


def test_secret_in_file_is_accepted_when_operator_insists(tmp_path):
    text = GOOD.replace('agent_name = "knotencheck"', 'api_secret = "plain-secret"') + (
        "\n[secrets]\nallow_in_file = true\n"
    )
    settings = load_settings(write(tmp_path, text), {"LIVEKIT_API_KEY": "k"})
    assert settings.livekit.api_secret.reveal() == "plain-secret"


@pytest.mark.parametrize("text,env,key,line", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_check_config_command_exits_2_with_one_line(tmp_path, text, env, key, line):
    path = write(tmp_path, text)
    proc = subprocess.run(
        [sys.executable, "-m", "knotd", "check-config", "--config", str(path)],
        env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knotd: config error"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_config_file_is_a_config_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "knotd", "run", "--config", str(tmp_path / "nope.toml")],
        env={"PATH": "/usr/bin:/bin", **ENV}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"knotd: config error at <file>: file not found: {tmp_path / 'nope.toml'}"


def test_help_explains_each_subcommand():
    out = subprocess.run([sys.executable, "-m", "knotd", "--help"], capture_output=True, text=True).stdout
    for command in ("run", "check-config", "demo", "models"):
        assert command in out
    version = subprocess.run([sys.executable, "-m", "knotd", "--version"], capture_output=True, text=True)
    assert version.stdout.strip().startswith("knotd 0.")
