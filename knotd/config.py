"""Turn the TOML config file plus the environment into frozen ``Settings``.

No other module reads config files, ``os.environ`` for settings, or systemd credentials.
Secrets never come from the TOML file unless ``[secrets] allow_in_file = true`` says the operator insists;
they are wrapped in ``Secret`` so that a repr, a log line or a JSON dump never shows them.

This module does not check that model files exist or that LiveKit is reachable: those are runtime checks
with their own stages and errors.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from knotd.datafiles import Locator, describe_os_error, parse_toml, read_data_file, read_small_file
from knotd.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/knotd/knotd.toml")


class Secret:
    """A string that does not show itself in repr/str; call ``reveal()`` where the value is needed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class LiveKitSettings:
    url: str = ""
    agent_name: str = "knotencheck"
    api_key: Secret = field(default_factory=lambda: Secret(""), metadata={"secret": True})
    api_secret: Secret = field(default_factory=lambda: Secret(""), metadata={"secret": True})
    # The server's agents.target_load: it offers a room only to a worker whose reported load is below it.
    target_load: float = 0.7


@dataclass(frozen=True)
class StatusSettings:
    listen: ListenAddress = field(default_factory=lambda: ListenAddress("127.0.0.1", 9464))
    # Host names (besides the listen address, localhost and IP addresses) a request's Host header may carry,
    # e.g. the name Prometheus scrapes; any other gets 421 (DNS rebinding).
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkerSettings:
    max_sessions: int = 4
    drain_timeout_s: float = 600.0
    # livekit's own health server cannot be switched off; keep it on loopback and off 8081.
    health_listen: ListenAddress = field(default_factory=lambda: ListenAddress("127.0.0.1", 0))
    max_retry: int = 16


@dataclass(frozen=True)
class LogSettings:
    format: str = "auto"  # auto | json | console
    level: str = "info"


@dataclass(frozen=True)
class SttSettings:
    model: str = "/usr/share/knotd/models/whisper-base"
    language: str = "de"
    hotwords: str = "Knotencheck"
    compute_type: str = "int8"
    beam_size: int = 1
    num_workers: int = 2
    cpu_threads: int = 0
    # Longest encoder window knotd feeds Whisper for one utterance; shorter utterances get a shorter bucket.
    max_window_s: float = 30.0
    self_test: bool = True
    # Start transcribing at the first short pause, before the VAD ends the turn; drop it if the user goes on.
    speculative: bool = True
    speculative_silence_s: float = 0.1
    # Tell Whisper the question just asked and the words the phase expects (phases.toml: recognition).
    context: bool = True
    # A prompted transcript is dropped when Whisper thinks it this likely that nothing was said.
    no_speech_threshold: float = 0.6
    # Longest utterance transcribed; a caller who talks on is cut there and told so (bounds CPU and memory).
    max_utterance_s: float = 30.0


@dataclass(frozen=True)
class TurnSettings:
    # model: LiveKit's local end-of-turn model decides after a short silence (falls back to vad if it cannot
    # load); vad: the turn ends after the Silero VAD's silence (0.55 s). vad by default for now: on the
    # held-back clips the model answered finished turns in 1.64 s (vad 0.67 s), and after an utterance cut at
    # stt.max_utterance_s the model path gave no answer in the real-room monologue test.
    detection: str = "vad"
    # From the end of speech: how long to wait when the model says the speaker is done (and, with vad, at
    # least this long), and when it says they are not. Chosen with benchmarks/turns.py.
    min_endpointing_delay_s: float = 0.3
    max_endpointing_delay_s: float = 1.5
    # The model's probability at or above which the speaker is done; 0: its shipped threshold for the
    # language (German 0.245, which cut off a third of mid-sentence pauses in benchmarks/turns.py).
    model_threshold: float = 0.35


@dataclass(frozen=True)
class LlmSettings:
    base_url: str = ""  # empty: the built-in scripted Knotencheck LLM
    model: str = ""
    api_key: Secret = field(default_factory=lambda: Secret(""), metadata={"secret": True})
    max_tokens: int = 200
    temperature: float = 0.2
    timeout_s: float = 8.0
    fallback_line: str = (
        "Entschuldigung, ich habe gerade technische Probleme. Bitte versuchen Sie es gleich noch einmal."
    )


@dataclass(frozen=True)
class TtsSettings:
    engine: str = "espeak"  # espeak | piper | openai
    voice: str = "de"
    speed_wpm: int = 160
    sample_rate: int = 24000
    piper_model: str = ""
    base_url: str = ""
    model: str = ""
    api_key: Secret = field(default_factory=lambda: Secret(""), metadata={"secret": True})


@dataclass(frozen=True)
class GuardrailSettings:
    rules: str = ""  # path to a TOML rules file; empty: the shipped Knotencheck rules
    semantic: bool = True  # the semantic layer (sentence encoder + exemplars) after the rules
    max_input_chars: int = 2000  # longer typed messages are refused before any rule, model or LLM sees them


@dataclass(frozen=True)
class SessionSettings:
    state_dir: str = "/var/lib/knotd"
    record_transcripts: bool = False
    phases: str = ""  # path to a TOML phase script; empty: the shipped Knotencheck script
    # Joining the room and starting the session; a job stuck longer (room server unreachable, a starved
    # connect) ends with outcome "error" instead of holding a session slot.
    start_timeout_s: float = 20.0


@dataclass(frozen=True)
class SecretsSettings:
    allow_in_file: bool = False


@dataclass(frozen=True)
class Settings:
    livekit: LiveKitSettings = field(default_factory=LiveKitSettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    stt: SttSettings = field(default_factory=SttSettings)
    turn: TurnSettings = field(default_factory=TurnSettings)
    llm: LlmSettings = field(default_factory=LlmSettings)
    tts: TtsSettings = field(default_factory=TtsSettings)
    guardrails: GuardrailSettings = field(default_factory=GuardrailSettings)
    session: SessionSettings = field(default_factory=SessionSettings)
    secrets: SecretsSettings = field(default_factory=SecretsSettings)
    source: str = "<defaults>"

    def secret_values(self) -> list[str]:
        """Every non-empty secret, for the log redactor."""
        values = []
        for section in dataclasses.fields(self):
            obj = getattr(self, section.name)
            if dataclasses.is_dataclass(obj):
                for f in dataclasses.fields(obj):
                    v = getattr(obj, f.name)
                    if isinstance(v, Secret) and v:
                        values.append(v.reveal())
        return values


# Where each secret may come from, besides the TOML file: (environment variable, credential file name).
SECRET_SOURCES: dict[str, tuple[str, str]] = {
    "livekit.api_key": ("LIVEKIT_API_KEY", "livekit-api-key"),
    "livekit.api_secret": ("LIVEKIT_API_SECRET", "livekit-api-secret"),
    "llm.api_key": ("KNOTD_LLM_API_KEY", "llm-api-key"),
    "tts.api_key": ("KNOTD_TTS_API_KEY", "tts-api-key"),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "log.format": ("auto", "json", "console"),
    "log.level": ("debug", "info", "warning", "error"),
    "tts.engine": ("espeak", "piper", "openai"),
    "stt.compute_type": ("int8", "int8_float32", "float32", "int16"),
    "turn.detection": ("model", "vad"),
}

# (lowest, highest) allowed, inclusive.
_RANGES: dict[str, tuple[float, float]] = {
    "worker.max_sessions": (1, 64),
    "livekit.target_load": (0.05, 1.0),
    "worker.drain_timeout_s": (0, 86400),
    "worker.max_retry": (0, 1000),
    "session.start_timeout_s": (1, 300),
    "stt.beam_size": (1, 10),
    "stt.num_workers": (1, 16),
    "stt.cpu_threads": (0, 64),
    "stt.max_window_s": (5, 30),
    "stt.speculative_silence_s": (0.05, 1.0),
    "stt.no_speech_threshold": (0.0, 1.0),
    "stt.max_utterance_s": (5, 120),
    "turn.min_endpointing_delay_s": (0, 10),
    "turn.max_endpointing_delay_s": (0, 30),
    "turn.model_threshold": (0, 1),
    "llm.max_tokens": (1, 8192),
    "guardrails.max_input_chars": (100, 100_000),
    "llm.temperature": (0, 2),
    "llm.timeout_s": (0.1, 300),
    "tts.speed_wpm": (80, 450),
    "tts.sample_rate": (8000, 48000),
}


def load_settings(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_livekit: bool = True,
) -> Settings:
    """Read ``path`` (TOML) and the environment into validated ``Settings``.

    Args:
        path: the config file; ``None`` means defaults only (used by ``knotd demo``).
        env: the environment to read secrets from (defaults to ``os.environ``).
        require_livekit: whether ``livekit.url`` and the API key/secret must be set (``knotd run``).

    Raises:
        ConfigError: for the first problem found, naming the key and, where known, file:line.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    text = ""
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        text, source = read_data_file("", path, "")
        raw = parse_toml("", text, source)

    find = Locator(source, text)

    def locate(section: str | None, key: str | None) -> str | None:
        return find(".".join(part for part in (section, key) if part))

    sections: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name == "source":
            continue
        section_raw = raw.pop(f.name, {})
        if not isinstance(section_raw, dict):
            raise ConfigError(f.name, f"must be a table ([{f.name}])", locate(f.name, None))
        sections[f.name] = _build_section(f.name, f.default_factory, section_raw, locate)  # type: ignore[arg-type]
    if raw:
        name = sorted(raw)[0]
        where = locate(name, None) if isinstance(raw[name], dict) else locate(None, name)
        raise ConfigError(name, "unknown section or key", where)

    if isinstance(path, Path):
        sections = _resolve_relative_paths(sections, path.parent)
    settings = Settings(**sections, source=source)
    settings = _apply_secrets(settings, env, locate)
    _check_cross_field(settings, require_livekit, locate)
    return settings


# Where a config key stands: locate(section, key) -> "file:line", or None when it is not in the file.
_Locate = Callable[[str | None, str | None], str | None]

# Keys holding file system paths; relative values are taken relative to the config file's directory.
_PATH_KEYS = ("stt.model", "tts.piper_model", "guardrails.rules", "session.phases", "session.state_dir")


def _resolve_relative_paths(sections: dict[str, Any], base: Path) -> dict[str, Any]:
    for dotted in _PATH_KEYS:
        section_name, key = dotted.split(".")
        section = sections[section_name]
        value = getattr(section, key)
        if value and not Path(value).is_absolute():
            # Lexically: resolve() would touch the file system (and fail on a symlink loop) before any check.
            resolved = os.path.normpath(os.path.join(os.path.abspath(base), value))
            sections[section_name] = dataclasses.replace(section, **{key: resolved})
    return sections


def _build_section(name: str, factory: Any, values: dict[str, Any], locate: _Locate) -> Any:
    defaults = factory()
    kwargs: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(defaults)}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        where = locate(name, key)
        f = known.get(key)
        if f is None:
            raise ConfigError(dotted, "unknown key", where)
        kwargs[key] = _convert(dotted, getattr(defaults, key), value, where)
    return dataclasses.replace(defaults, **kwargs)


def _convert(dotted: str, default: Any, value: Any, where: str | None) -> Any:
    def fail(reason: str) -> ConfigError:
        return ConfigError(dotted, reason, where)

    if isinstance(default, Secret):
        if not isinstance(value, str):
            raise fail(f"expected a string, got {_toml_type(value)}")
        return Secret(value)
    if isinstance(default, ListenAddress):
        if not isinstance(value, str):
            raise fail(f"expected a string like '127.0.0.1:9464', got {_toml_type(value)}")
        return _parse_listen(value, fail)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(f"expected an array of strings, got {_toml_type(value)}")
        bad = [v for v in value if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", v)]
        if bad:
            raise fail(f"not a host name: {bad[0]!r}")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {_toml_type(value)}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"expected an integer, got {_toml_type(value)}")
        _check_range(dotted, value, fail)
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"expected a number, got {_toml_type(value)}")
        _check_range(dotted, value, fail)
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise fail(f"expected a string, got {_toml_type(value)}")
        choices = _CHOICES.get(dotted)
        if choices and value not in choices:
            raise fail(f"must be one of {', '.join(choices)}; got {value!r}")
        return value
    raise fail("unsupported value")  # pragma: no cover - every field type is handled above


def _check_range(dotted: str, value: float, fail: Any) -> None:
    bounds = _RANGES.get(dotted)
    if bounds and not bounds[0] <= value <= bounds[1]:
        raise fail(f"must be between {bounds[0]:g} and {bounds[1]:g}; got {value:g}")


def _parse_listen(value: str, fail: Any) -> ListenAddress:
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([A-Za-z0-9][A-Za-z0-9.-]{0,252}):(\d{1,5})", value.strip())
    if not m:
        raise fail(f"expected host:port (e.g. '127.0.0.1:9464' or '[::1]:9464'); got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise fail(f"port out of range: {port}")
    return ListenAddress(host, port)


def _toml_type(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _apply_secrets(settings: Settings, env: Mapping[str, str], locate: _Locate) -> Settings:
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    for dotted, (env_name, cred_name) in SECRET_SOURCES.items():
        section_name, key = dotted.split(".")
        section = getattr(settings, section_name)
        from_file: Secret = getattr(section, key)
        if from_file and not settings.secrets.allow_in_file:
            raise ConfigError(
                dotted,
                f"secrets do not belong in the config file; set {env_name} in /etc/knotd/knotd.env or a "
                f"systemd credential '{cred_name}' (or set secrets.allow_in_file = true)",
                locate(section_name, key),
            )
        value = _read_credential(cred_dir, cred_name, dotted) if cred_dir else None
        if not value:  # the unit gives a blank credential when its file is missing: fall back to the env
            value = env.get(env_name)
        if value:
            section = dataclasses.replace(section, **{key: Secret(value.strip())})
            settings = dataclasses.replace(settings, **{section_name: section})
    return settings


def _read_credential(cred_dir: str, name: str, dotted: str) -> str | None:
    path = Path(cred_dir) / name
    try:
        return read_small_file(path, 64 * 1024).decode("utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        reason = describe_os_error(err) if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(dotted, f"cannot read credential {path}: {reason}") from None


def _check_cross_field(settings: Settings, require_livekit: bool, locate: _Locate) -> None:
    lk = settings.livekit
    if require_livekit:
        if not lk.url:
            raise ConfigError("livekit.url", "missing required value (e.g. url = \"wss://livekit.example.com\")",
                              locate("livekit", None))
        if not lk.api_key or not lk.api_secret:
            missing = "LIVEKIT_API_KEY" if not lk.api_key else "LIVEKIT_API_SECRET"
            raise ConfigError(
                "livekit.api_key" if not lk.api_key else "livekit.api_secret",
                f"missing secret: set {missing} in the environment (/etc/knotd/knotd.env) or the systemd "
                f"credential '{SECRET_SOURCES['livekit.api_key' if not lk.api_key else 'livekit.api_secret'][1]}'",
            )
    _check_url("livekit.url", lk.url, ("ws", "wss", "http", "https"), "LIVEKIT_API_KEY/SECRET", locate)
    _check_url("llm.base_url", settings.llm.base_url, ("http", "https"), "KNOTD_LLM_API_KEY", locate)
    _check_url("tts.base_url", settings.tts.base_url, ("http", "https"), "KNOTD_TTS_API_KEY", locate)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", lk.agent_name):
        raise ConfigError("livekit.agent_name", "use 1-64 letters, digits, '.', '_' or '-'",
                          locate("livekit", "agent_name"))
    turn = settings.turn
    if turn.min_endpointing_delay_s > turn.max_endpointing_delay_s:
        raise ConfigError("turn.min_endpointing_delay_s", "must not be larger than turn.max_endpointing_delay_s",
                          locate("turn", "min_endpointing_delay_s"))
    if settings.llm.base_url:
        if not settings.llm.model:
            raise ConfigError("llm.model", "required when llm.base_url is set", locate("llm", "base_url"))
    if settings.tts.engine == "piper" and not settings.tts.piper_model:
        raise ConfigError("tts.piper_model", "required when tts.engine = \"piper\"", locate("tts", "engine"))
    if settings.tts.engine == "openai" and not (settings.tts.base_url and settings.tts.model):
        raise ConfigError("tts.base_url", "tts.base_url and tts.model are required when tts.engine = \"openai\"",
                          locate("tts", "engine"))


def _check_url(dotted: str, url: str, schemes: tuple[str, ...], secret_env: str, locate: _Locate) -> None:
    """A URL with one of ``schemes`` and a host, and no credentials in it (the error never repeats them)."""
    if not url:
        return
    section, key = dotted.split(".")
    try:
        parts = urlsplit(url)
        host, has_credentials = parts.hostname, "@" in parts.netloc
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        host, has_credentials, parts = None, "@" in url, None
    if has_credentials or re.search(r"(?i)[?&](api[_-]?key|key|token|secret|password|access_token)=", url):
        raise ConfigError(dotted, f"credentials in the URL are not allowed; use {secret_env}", locate(section, key))
    if parts is None or parts.scheme not in schemes or not host:
        shown = ", ".join(f"{s}://" for s in schemes)
        raise ConfigError(dotted, f"expected a {shown} URL; got {url!r}", locate(section, key))


def public_view(settings: Settings) -> dict[str, Any]:
    """The settings as a JSON-able dict with secrets reduced to whether they are set."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, Secret):
            return "set" if obj else "unset"
        if isinstance(obj, ListenAddress):
            return str(obj)
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return obj

    return convert(settings)
