"""Config: every class of bad input is one line naming the key, exit code 2, before anything starts."""

from __future__ import annotations

import json
import os
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


# -- check-config: hostile inputs and configs that would fail only at run time --------------------------------
def _model(tmp_path):
    model = tmp_path / "model"
    model.mkdir(parents=True, exist_ok=True)
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        (model / name).write_text("x")
    return model


def _check_config(path, capsys) -> tuple[int, str, str]:
    from knotd.cli import main

    code = main(["check-config", "--offline", "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def _config(tmp_path, extra: str = "", *, state: str | None = None) -> str:
    state = state or str(tmp_path / "state")
    return (f'[stt]\nmodel = "{_model(tmp_path)}"\n[session]\nstate_dir = "{state}"\n'
            f'[status]\nlisten = "127.0.0.1:0"\n{extra}')


def _hostile_config_paths(tmp_path):
    loop = tmp_path / "loop.toml"
    loop.symlink_to(loop)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    (tmp_path / "plain").write_text("")
    nested = tmp_path / "nested.toml"
    nested.write_text("x = " + "[" * 50000 + "]" * 50000 + "\n")
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\x7fELF\xff\xfe\x00" * 100)
    return {
        "symlink loop": (loop, "Too many levels of symbolic links"),
        "FIFO": (fifo, "not a regular file"),
        "/dev/zero": ("/dev/zero", "not a regular file"),
        "ENOTDIR": (tmp_path / "plain" / "knotd.toml", "Not a directory"),
        "name too long": (tmp_path / ("a" * 300 + ".toml"), "File name too long"),
        "nested arrays": (nested, "nested too deeply"),
        "2 MiB": (huge, "larger than 1024 KiB"),
        "binary": (binary, "not UTF-8 text"),
    }


@pytest.mark.timeout(60)
def test_check_config_answers_hostile_files_in_one_line_without_hanging(tmp_path, capsys):
    for name, (path, reason) in _hostile_config_paths(tmp_path).items():
        code, out, err = _check_config(path, capsys)
        assert code == 2, name
        assert err.count("\n") == 1 and reason in err, (name, err)
        assert "Traceback" not in err and out == ""


@pytest.mark.timeout(60)
def test_check_config_refuses_what_would_fail_at_run_time(tmp_path, capsys):
    garbage = tmp_path / "garbage.toml"
    garbage.write_text("this is [not toml\n")
    fifo_model = _model(tmp_path / "m2")
    (fifo_model / "model.bin").unlink()
    os.mkfifo(fifo_model / "model.bin")
    cases = {
        "listen with a space": ('[status]\nlisten = "foo bar:9464"\n', "status.listen"),
        "listen on a foreign address": ('', "cannot listen on 192.0.2.1:9464"),
        "garbage rules": (f'[guardrails]\nrules = "{garbage}"\n', "guardrails.rules"),
        "garbage phases": (f'[session]\nphases = "{garbage}"\n', "session.phases"),
        "credentials in llm.base_url": ('[llm]\nbase_url = "https://bob:hunter2-pw@llm.example.com/v1"\nmodel = "m"\n',
                                        "credentials in the URL are not allowed"),
        "a key in a query": ('[llm]\nbase_url = "https://llm.example.com/v1?api_key=hunter2-pw"\nmodel = "m"\n',
                             "credentials in the URL are not allowed"),
        "a model file that is a FIFO": (f'[stt]\nmodel = "{fifo_model}"\n', "missing model.bin"),
    }
    for name, (extra, expected) in cases.items():
        text = _config(tmp_path, "")
        if name == "listen on a foreign address":
            text = text.replace("127.0.0.1:0", "192.0.2.1:9464")
        path = tmp_path / "case.toml"
        # later tables of the same name would be a TOML error: merge by writing the case's table first
        path.write_text(_merge(extra, text))
        code, out, err = _check_config(path, capsys)
        assert code == 2 and expected in err, (name, err)
        assert "hunter2" not in err + out and "Traceback" not in err


def _merge(first: str, second: str) -> str:
    """Two TOML snippets as one file, keys of a table named in both merged into its first occurrence."""
    import tomllib

    merged = tomllib.loads(second)
    try:
        for table, values in tomllib.loads(first).items():
            merged.setdefault(table, {}).update(values)
    except tomllib.TOMLDecodeError:
        return first + second
    return "".join(f"[{t}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in vals.items())
                   for t, vals in merged.items())


def test_check_config_checks_the_state_directory_and_passes_a_good_config(tmp_path, capsys):
    path = tmp_path / "ok.toml"
    path.write_text(_config(tmp_path))
    code, out, err = _check_config(path, capsys)
    assert code == 0 and "config OK" in err, err
    (tmp_path / "plain").write_text("")
    path.write_text(_config(tmp_path, state=str(tmp_path / "plain" / "state")))
    code, out, err = _check_config(path, capsys)
    assert code == 2 and "session.state_dir" in err and "Not a directory" in err, err


def test_status_allowed_hosts_are_host_names(tmp_path):
    path = write(tmp_path, GOOD.replace('listen = "127.0.0.1:9464"',
                                        'listen = "0.0.0.0:9464"\nallowed_hosts = ["knotd-vm1", "knotd.example.org"]'))
    assert load_settings(path, ENV).status.allowed_hosts == ("knotd-vm1", "knotd.example.org")
    path.write_text(GOOD.replace('listen = "127.0.0.1:9464"', 'allowed_hosts = ["evil host/"]'))
    with pytest.raises(ConfigError, match="status.allowed_hosts.*not a host name"):
        load_settings(path, ENV)
