"""What an operator reads for each bad config value, word for word (`knotd check-config` prints this line), and
what the settings hold for the values knotd resolves itself (relative paths, credentials, the public view).

Written for what mutation testing (`./dev.sh mutate`) showed the other config tests let through: they check
the key and the line, not the sentence that tells the operator what to do.
"""
# ruff: noqa: E501

from __future__ import annotations

import os

import pytest

from knotd.config import ConfigError, ListenAddress, Secret, Settings, load_settings, public_view

ENV = {"LIVEKIT_API_KEY": "devkey", "LIVEKIT_API_SECRET": "a-secret-that-is-long-enough"}
LK = '[livekit]\nurl = "wss://livekit.example.com"\n'

CASES = [
    # (id, file text, environment, the whole error line with {path} for the config file)
    ('no url', '[worker]\nmax_sessions = 2\n', ENV,
     'config error at livekit.url: missing required value (e.g. url = "wss://livekit.example.com")'),
    ('no key', '[livekit]\nurl = "wss://livekit.example.com"\n', {'LIVEKIT_API_SECRET': 's3cret-value'},
     "config error at livekit.api_key: missing secret: set LIVEKIT_API_KEY in the environment (/etc/knotd/knotd.env) or the systemd credential 'livekit-api-key'"),
    ('no secret', '[livekit]\nurl = "wss://livekit.example.com"\n', {'LIVEKIT_API_KEY': 'devkey'},
     "config error at livekit.api_secret: missing secret: set LIVEKIT_API_SECRET in the environment (/etc/knotd/knotd.env) or the systemd credential 'livekit-api-secret'"),
    ('no key no secret', '[livekit]\nurl = "wss://livekit.example.com"\n', {},
     "config error at livekit.api_key: missing secret: set LIVEKIT_API_KEY in the environment (/etc/knotd/knotd.env) or the systemd credential 'livekit-api-key'"),
    ('livekit ftp', '[livekit]\nurl = "ftp://livekit.example.com"\n', ENV,
     "config error at livekit.url ({path}:2): expected a ws://, wss://, http://, https:// URL; got 'ftp://livekit.example.com'"),
    ('livekit no host', '[livekit]\nurl = "wss://"\n', ENV,
     "config error at livekit.url ({path}:2): expected a ws://, wss://, http://, https:// URL; got 'wss://'"),
    ('livekit bad port', '[livekit]\nurl = "wss://livekit.example.com:99999"\n', ENV,
     "config error at livekit.url ({path}:2): expected a ws://, wss://, http://, https:// URL; got 'wss://livekit.example.com:99999'"),
    ('livekit creds', '[livekit]\nurl = "wss://u:p@livekit.example.com"\n', ENV,
     'config error at livekit.url ({path}:2): credentials in the URL are not allowed; use LIVEKIT_API_KEY/SECRET'),
    ('livekit token query', '[livekit]\nurl = "wss://livekit.example.com/?token=abc"\n', ENV,
     'config error at livekit.url ({path}:2): credentials in the URL are not allowed; use LIVEKIT_API_KEY/SECRET'),
    ('livekit access_token', '[livekit]\nurl = "wss://livekit.example.com/?x=1&ACCESS_TOKEN=abc"\n', ENV,
     'config error at livekit.url ({path}:2): credentials in the URL are not allowed; use LIVEKIT_API_KEY/SECRET'),
    ('livekit api-key', '[livekit]\nurl = "wss://livekit.example.com/?api-key=abc"\n', ENV,
     'config error at livekit.url ({path}:2): credentials in the URL are not allowed; use LIVEKIT_API_KEY/SECRET'),
    ('llm ws', LK + '[llm]\nbase_url = "ws://llm.example.com/v1"\nmodel = "m"\n', ENV,
     "config error at llm.base_url ({path}:4): expected a http://, https:// URL; got 'ws://llm.example.com/v1'"),
    ('tts ftp', LK + '[tts]\nengine = "openai"\nbase_url = "ftp://tts.example.com"\nmodel = "m"\n', ENV,
     "config error at tts.base_url ({path}:5): expected a http://, https:// URL; got 'ftp://tts.example.com'"),
    ('tts cred', LK + '[tts]\nbase_url = "https://tts.example.com/?password=x"\n', ENV,
     'config error at tts.base_url ({path}:4): credentials in the URL are not allowed; use KNOTD_TTS_API_KEY'),
    ('agent name', LK + 'agent_name = "knoten check"\n', ENV,
     "config error at livekit.agent_name ({path}:3): use 1-64 letters, digits, '.', '_' or '-'"),
    ('agent name long', LK + 'agent_name = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"\n', ENV,
     "config error at livekit.agent_name ({path}:3): use 1-64 letters, digits, '.', '_' or '-'"),
    ('endpointing', LK + '[turn]\nmin_endpointing_delay_s = 2.0\nmax_endpointing_delay_s = 1.0\n', ENV,
     'config error at turn.min_endpointing_delay_s ({path}:4): must not be larger than turn.max_endpointing_delay_s'),
    ('llm model', LK + '[llm]\nbase_url = "https://llm.example.com/v1"\n', ENV,
     'config error at llm.model ({path}:4): required when llm.base_url is set'),
    ('piper', LK + '[tts]\nengine = "piper"\n', ENV,
     'config error at tts.piper_model ({path}:4): required when tts.engine = "piper"'),
    ('openai no url', LK + '[tts]\nengine = "openai"\nmodel = "m"\n', ENV,
     'config error at tts.base_url ({path}:4): tts.base_url and tts.model are required when tts.engine = "openai"'),
    ('openai no model', LK + '[tts]\nengine = "openai"\nbase_url = "https://tts.example.com"\n', ENV,
     'config error at tts.base_url ({path}:4): tts.base_url and tts.model are required when tts.engine = "openai"'),
    ('secret wrong type', LK + 'api_key = 5\n[secrets]\nallow_in_file = true\n', ENV,
     'config error at livekit.api_key ({path}:3): expected a string, got an integer'),
    ('listen int', LK + '[status]\nlisten = 9464\n', ENV,
     "config error at status.listen ({path}:4): expected a string like '127.0.0.1:9464', got an integer"),
    ('listen port', LK + '[status]\nlisten = "127.0.0.1:70000"\n', ENV,
     'config error at status.listen ({path}:4): port out of range: 70000'),
    ('hosts not list', LK + '[status]\nallowed_hosts = "a"\n', ENV,
     'config error at status.allowed_hosts ({path}:4): expected an array of strings, got a string'),
    ('hosts bad', LK + '[status]\nallowed_hosts = ["ok", "not ok"]\n', ENV,
     "config error at status.allowed_hosts ({path}:4): not a host name: 'not ok'"),
    ('bool', LK + '[session]\nrecord_transcripts = "yes"\n', ENV,
     'config error at session.record_transcripts ({path}:4): expected true or false, got a string'),
    ('int float', LK + '[worker]\nmax_sessions = 2.5\n', ENV,
     'config error at worker.max_sessions ({path}:4): expected an integer, got a number'),
    ('int bool', LK + '[worker]\nmax_sessions = true\n', ENV,
     'config error at worker.max_sessions ({path}:4): expected an integer, got a boolean'),
    ('float str', LK + '[worker]\ndrain_timeout_s = "10"\n', ENV,
     'config error at worker.drain_timeout_s ({path}:4): expected a number, got a string'),
    ('float bool', LK + '[worker]\ndrain_timeout_s = false\n', ENV,
     'config error at worker.drain_timeout_s ({path}:4): expected a number, got a boolean'),
    ('str int', LK + '[log]\nlevel = 3\n', ENV,
     'config error at log.level ({path}:4): expected a string, got an integer'),
    ('choice', LK + '[log]\nlevel = "loud"\n', ENV,
     "config error at log.level ({path}:4): must be one of debug, info, warning, error; got 'loud'"),
    ('range low', LK + '[stt]\nmax_window_s = 4.5\n', ENV,
     'config error at stt.max_window_s ({path}:4): must be between 5 and 30; got 4.5'),
    ('range high', LK + '[llm]\ntemperature = 2.5\n', ENV,
     'config error at llm.temperature ({path}:4): must be between 0 and 2; got 2.5'),
    ('array type', LK + '[stt]\nlanguage = ["de"]\n', ENV,
     'config error at stt.language ({path}:4): expected a string, got an array'),
    ('table in key', LK + '[stt]\nlanguage = {a = 1}\n', ENV,
     'config error at stt.language ({path}:4): expected a string, got a table'),
    ('unknown top key', 'loglevel = "x"\n[livekit]\nurl = "wss://livekit.example.com"\n', ENV,
     'config error at loglevel ({path}:1): unknown section or key'),
    ('secret in file', LK + 'api_key = "k"\n', {'LIVEKIT_API_SECRET': 's'},
     "config error at livekit.api_key ({path}:3): secrets do not belong in the config file; set LIVEKIT_API_KEY in /etc/knotd/knotd.env or a systemd credential 'livekit-api-key' (or set secrets.allow_in_file = true)"),
    ('llm secret in file', LK + '[llm]\napi_key = "k"\n', ENV,
     "config error at llm.api_key ({path}:4): secrets do not belong in the config file; set KNOTD_LLM_API_KEY in /etc/knotd/knotd.env or a systemd credential 'llm-api-key' (or set secrets.allow_in_file = true)"),
    ("a section that is not a table", 'worker = 3\n' + LK, ENV,
     "config error at worker ({path}:1): must be a table ([worker])"),
]


@pytest.mark.parametrize("text,env,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_bad_value_gets_its_own_sentence(tmp_path, text, env, message):
    path = tmp_path / "knotd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env)
    assert str(info.value) == message.format(path=path)


def test_relative_paths_are_taken_from_the_config_files_directory(tmp_path):
    conf = tmp_path / "etc"
    conf.mkdir()
    path = conf / "knotd.toml"
    path.write_text(LK + '[session]\nstate_dir = "state"\nphases = "/srv/phases.toml"\n'
                    '[stt]\nmodel = "../models/./whisper"\n[guardrails]\nrules = ""\n')
    settings = load_settings(path, ENV)
    assert settings.session.state_dir == str(conf / "state")
    assert settings.stt.model == str(tmp_path / "models" / "whisper")
    assert settings.session.phases == "/srv/phases.toml"
    assert settings.guardrails.rules == ""  # empty: the shipped rules, not the config directory
    assert settings.tts.piper_model == ""


def test_relative_paths_from_a_config_given_as_a_string_are_resolved_too(tmp_path):
    path = tmp_path / "knotd.toml"
    path.write_text(LK + '[tts]\nengine = "piper"\npiper_model = "voices/de.onnx"\n')
    assert load_settings(str(path), ENV).tts.piper_model == str(tmp_path / "voices" / "de.onnx")


def test_credentials_win_a_blank_credential_falls_back_and_every_secret_is_read(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "livekit-api-key").write_text("  key-from-credential \n")
    (creds / "livekit-api-secret").write_text("\n")  # systemd's blank credential for a missing file
    env = {"CREDENTIALS_DIRECTORY": str(creds), "LIVEKIT_API_KEY": "env-key", "LIVEKIT_API_SECRET": " env-secret ",
           "KNOTD_LLM_API_KEY": "llm-key", "KNOTD_TTS_API_KEY": "tts-key"}
    path = tmp_path / "knotd.toml"
    path.write_text(LK)
    settings = load_settings(path, env)
    assert settings.livekit.api_key.reveal() == "key-from-credential"
    assert settings.livekit.api_secret.reveal() == "env-secret"
    assert settings.llm.api_key.reveal() == "llm-key" and settings.tts.api_key.reveal() == "tts-key"
    # what the log redactor is given: every secret that is set
    assert sorted(settings.secret_values()) == ["env-secret", "key-from-credential", "llm-key", "tts-key"]


def test_an_unreadable_credential_is_one_error_naming_it(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "livekit-api-secret").write_bytes(b"\xff\xfe not utf-8")
    path = tmp_path / "knotd.toml"
    path.write_text(LK)
    with pytest.raises(ConfigError) as info:
        load_settings(path, {**ENV, "CREDENTIALS_DIRECTORY": str(creds)})
    assert str(info.value) == (f"config error at livekit.api_secret: cannot read credential "
                               f"{creds / 'livekit-api-secret'}: not UTF-8 text")
    (creds / "livekit-api-secret").unlink()
    (creds / "livekit-api-secret").mkdir()
    with pytest.raises(ConfigError) as info:
        load_settings(path, {**ENV, "CREDENTIALS_DIRECTORY": str(creds)})
    assert str(info.value).startswith(f"config error at livekit.api_secret: cannot read credential "
                                      f"{creds / 'livekit-api-secret'}: ")


def test_without_an_environment_the_process_environment_is_read(tmp_path, monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "knotd.toml"
    path.write_text(LK)
    assert load_settings(path).livekit.api_key.reveal() == "devkey"


def test_the_demo_needs_no_livekit_and_reads_no_file():
    settings = load_settings(None, {}, require_livekit=False)
    assert settings.source == "<defaults>" and settings.livekit.url == "" and settings.secret_values() == []


def test_the_public_view_shows_whether_secrets_are_set_never_their_value(tmp_path):
    path = tmp_path / "knotd.toml"
    path.write_text(LK + '[status]\nlisten = "[::1]:9464"\n')
    view = public_view(load_settings(path, ENV))
    assert view["livekit"]["api_key"] == "set" and view["llm"]["api_key"] == "unset"
    assert view["status"]["listen"] == "[::1]:9464" and view["worker"]["health_listen"] == "127.0.0.1:0"
    assert view["worker"]["max_sessions"] == 4 and view["session"]["record_transcripts"] is False
    assert view["source"] == str(path)
    assert "a-secret-that-is-long-enough" not in repr(view)


def test_a_secret_never_shows_itself():
    assert repr(Secret("hunter2-pw")) == str(Secret("hunter2-pw")) == "Secret('**********')"
    assert repr(Secret("")) == "Secret('')"
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b") and Secret("a") != "a"
    assert len({Secret("a"), Secret("a"), Secret("b")}) == 2
    assert str(ListenAddress("::1", 9464)) == "[::1]:9464" and str(ListenAddress("0.0.0.0", 1)) == "0.0.0.0:1"


def test_the_defaults_keep_transcripts_off():
    """The privacy default: nothing the caller said is kept unless the operator turns it on."""
    assert Settings().session.record_transcripts is False
    assert os.path.isabs(Settings().session.state_dir)


MORE_CASES = [
    ("a [livekit] table without url", '[livekit]\nagent_name = "k"\n', ENV,
     'config error at livekit.url ({path}:1): missing required value (e.g. url = "wss://livekit.example.com")'),
    ("listen without a port", LK + '[status]\nlisten = "localhost"\n', ENV,
     "config error at status.listen ({path}:4): expected host:port (e.g. '127.0.0.1:9464' or '[::1]:9464'); got 'localhost'"),
    ("a date where a number goes", LK + '[worker]\nmax_sessions = 1979-05-27\n', ENV,
     'config error at worker.max_sessions ({path}:4): expected an integer, got date'),
    ("credentials and a bad port", '[livekit]\nurl = "wss://u:p@livekit.example.com:99999"\n', ENV,
     'config error at livekit.url ({path}:2): credentials in the URL are not allowed; use LIVEKIT_API_KEY/SECRET'),
    ("port 65536", LK + '[status]\nlisten = "127.0.0.1:65536"\n', ENV,
     'config error at status.listen ({path}:4): port out of range: 65536'),
]


@pytest.mark.parametrize("text,env,message", [c[1:] for c in MORE_CASES], ids=[c[0] for c in MORE_CASES])
def test_more_bad_values_get_their_own_sentence(tmp_path, text, env, message):
    test_each_bad_value_gets_its_own_sentence(tmp_path, text, env, message)


@pytest.mark.parametrize("listen", ["[FE80::1]:9464", "[fe80::1]:9464", "localhost:9464", "KNOTD-VM:9464",
                                    "127.0.0.1:65535"])
def test_listen_addresses_in_either_case_and_the_highest_port_are_accepted(tmp_path, listen):
    path = tmp_path / "knotd.toml"
    path.write_text(LK + f'[status]\nlisten = "{listen}"\n')
    assert str(load_settings(path, ENV).status.listen) == listen


@pytest.mark.parametrize("n", [1, 64])
def test_range_limits_are_inclusive(tmp_path, n):
    path = tmp_path / "knotd.toml"
    path.write_text(LK + f"[worker]\nmax_sessions = {n}\n")
    assert load_settings(path, ENV).worker.max_sessions == n


def test_a_credential_is_read_up_to_64_kib_and_a_directory_is_no_credential(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    secret = creds / "livekit-api-secret"
    path = tmp_path / "knotd.toml"
    path.write_text(LK)
    env = {**ENV, "CREDENTIALS_DIRECTORY": str(creds)}
    secret.write_bytes(b"s" * (64 * 1024))
    assert load_settings(path, env).livekit.api_secret.reveal() == "s" * (64 * 1024)
    secret.write_bytes(b"s" * (64 * 1024 + 1))
    with pytest.raises(ConfigError) as info:
        load_settings(path, env)
    assert str(info.value) == f"config error at livekit.api_secret: cannot read credential {secret}: larger than 64 KiB"
    secret.unlink()
    secret.mkdir()
    with pytest.raises(ConfigError) as info:
        load_settings(path, env)
    assert str(info.value) == f"config error at livekit.api_secret: cannot read credential {secret}: not a regular file"
