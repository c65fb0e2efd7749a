"""Logging: structlog for knotd, and livekit's stdlib logging through the same renderer.

One line per event on stderr: JSON under systemd (``JOURNAL_STREAM`` is set) or when not on a terminal,
readable key=value lines on a terminal. The last processor before rendering removes every configured
secret from every value, so a secret that slips into an exception message or a livekit ``extra`` field
still never reaches the journal.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
REDACTED = "[redacted]"


class SecretRedactor:
    """Processor that replaces each secret value (and nothing else) wherever it appears in the event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, Mapping):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._scrub(v) for v in value]
        if isinstance(value, (int, float, bool)) or value is None:
            return value
        return self._scrub(str(value))

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if not self._secrets:
            return event_dict
        return {k: self._scrub(v) for k, v in event_dict.items()}


def choose_format(configured: str, environ: Mapping[str, str] | None = None, stream: Any = None) -> str:
    """Resolve ``auto`` to ``json`` (systemd journal, pipes) or ``console`` (a terminal)."""
    if configured != "auto":
        return configured
    env = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    if env.get("JOURNAL_STREAM"):
        return "json"
    return "console" if getattr(stream, "isatty", lambda: False)() else "json"


def configure(level: str = "info", fmt: str = "auto", secrets: Iterable[str] = ()) -> None:
    """Set up structlog and the stdlib root logger. Call once, early; calling again reconfigures."""
    fmt = choose_format(fmt)
    redact = SecretRedactor(secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exc = structlog.processors.dict_tracebacks
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        exc = structlog.processors.format_exc_info
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # livekit logs through stdlib with `extra={...}`: keep those fields, they are the useful part.
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.StackInfoRenderer(),
            exc,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # Chatty third-party loggers that add nothing for an operator at info level.
    for name in ("aiohttp.access", "asyncio", "faster_whisper"):
        logging.getLogger(name).setLevel(max(_LEVELS[level], logging.WARNING))
