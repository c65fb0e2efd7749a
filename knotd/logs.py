"""Logging: structlog for knotd, and livekit's stdlib logging through the same renderer.

One line per event on stderr: JSON under systemd (``JOURNAL_STREAM`` is set) or when not on a terminal,
readable key=value lines on a terminal. The last processor before rendering removes every configured
secret from every value, so a secret that slips into an exception message or a livekit ``extra`` field
still never reaches the journal.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
import structlog.tracebacks

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
REDACTED = "[redacted]"


# A secret cut short (a repr shortened to 80 characters shows ``'sk-proj-A1b2…'+88``) still starts with this
# many of its characters; shorter secrets are matched whole.
PREFIX_CHARS = 8
# Credentials that are not configured secrets but derive from them: bearer tokens and JWTs (LiveKit join tokens).
_TOKENS = re.compile(
    r"(?i:(?<=bearer )|(?<=bearer%20))[A-Za-z0-9._~+/=-]{8,}"
    r"|eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}(?:\.[A-Za-z0-9_-]*)?"
)


class SecretRedactor:
    """Processor that replaces each secret value, any prefix of one that is at least ``PREFIX_CHARS`` long, and
    bearer tokens and JWTs wherever they appear in the event."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        heads = sorted({s[:PREFIX_CHARS] for s in self._secrets}, key=len, reverse=True)
        self._heads = re.compile("|".join(map(re.escape, heads))) if heads else None

    def _extent(self, value: str, start: int) -> int:
        """How many characters from ``start`` belong to a secret: the longest run that any secret starting
        there matches. Secrets often share a head ("sk-proj-"): the one that matches furthest decides, so no
        tail of one secret survives behind the shared head of another."""
        longest = 0
        for secret in self._secrets:
            if not value.startswith(secret[:PREFIX_CHARS], start):
                continue
            end = start + min(len(secret), PREFIX_CHARS)
            while end < len(value) and end - start < len(secret) and value[end] == secret[end - start]:
                end += 1  # as much of the secret as is there
            longest = max(longest, end - start)
        return longest

    def _scrub_text(self, value: str) -> str:
        if self._heads is not None:
            found = self._heads.search(value)
            while found is not None:
                start = found.start()
                value = value[:start] + REDACTED + value[start + self._extent(value, start):]
                found = self._heads.search(value, start + len(REDACTED))
        return _TOKENS.sub(REDACTED, value)

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._scrub_text(value)
        if isinstance(value, Mapping):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._scrub(v) for v in value]
        if isinstance(value, (int, float, bool)) or value is None:
            return value
        return self._scrub(str(value))

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
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
    # Tracebacks never show local variables: they hold keys, tokens and request headers, cut to a length
    # that no redactor can recognise reliably.
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
        exc = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
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
