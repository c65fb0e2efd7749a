"""Typed errors. Only knotd.cli renders them for a person (one line, an exit code)."""

from __future__ import annotations


class KnotdError(Exception):
    """Base class of every error knotd raises on purpose."""

    exit_code = 1


class ConfigError(KnotdError):
    """A config value is missing or invalid.

    Args:
        path: dotted key such as ``worker.max_sessions`` ("" for the whole file).
        reason: what is wrong, for a person.
        source: ``file:line`` where the value stands, when it is known.
    """

    exit_code = 2

    def __init__(self, path: str, reason: str, source: str | None = None) -> None:
        where = f" ({source})" if source else ""
        key = path or "<file>"
        super().__init__(f"config error at {key}{where}: {reason}")
        self.path, self.reason, self.source = path, reason, source


class ModelError(KnotdError):
    """A model could not be prepared, loaded or failed its self-test.

    Its own exit code, because restarting does not fix it (the unit lists it in RestartPreventExitStatus=).
    """

    exit_code = 3


class WorkerError(KnotdError):
    """The LiveKit worker gave up (for example after all connection retries)."""
