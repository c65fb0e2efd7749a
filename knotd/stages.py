"""The one stage timer: ``with stage("stt_init"):`` or ``async with stage("session_start"):``.

Each stage produces one structlog event in the seed note's shape (``pipeline stage=stt_init status=ok
latency_ms=26031.3``), one observation of ``knotd_stage_duration_seconds{stage,status}``, and one entry in a
short in-memory history that the status API shows. It is safe to use from job threads.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog

from knotd import metrics

log = structlog.get_logger("knotd.pipeline")

_HISTORY_LEN = 200
_history: collections.deque[StageRecord] = collections.deque(maxlen=_HISTORY_LEN)
_history_lock = threading.Lock()


@dataclass(frozen=True)
class StageRecord:
    name: str
    status: str  # ok | error
    latency_ms: float
    at: float  # wall-clock end time (time.time())
    error: str | None = None


class stage:  # noqa: N801 - used like a function: `with stage("x"):`
    """Time a named stage; an exception inside marks it ``status=error`` and propagates unchanged.

    Args:
        name: a bounded stage name (it becomes a metric label).
        fields: extra key=value pairs for the log line (never secrets or user text).
    """

    __slots__ = ("name", "fields", "_start", "latency_s")

    def __init__(self, name: str, **fields: Any) -> None:
        self.name, self.fields = name, fields
        self._start = 0.0
        self.latency_s = 0.0

    def __enter__(self) -> stage:
        self._start = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.latency_s = time.perf_counter() - self._start
        record(self.name, self.latency_s, exc_type, **self.fields)

    async def __aenter__(self) -> stage:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def record(name: str, latency_s: float, exc_type: type[BaseException] | None = None, **fields: Any) -> None:
    """Record a stage measured elsewhere (for example the config stage, timed before logging was set up)."""
    status = "ok" if exc_type is None else "error"
    error = exc_type.__name__ if exc_type is not None else None
    metrics.STAGE_DURATION.labels(stage=name, status=status).observe(latency_s)
    latency_ms = round(latency_s * 1000, 1)
    with _history_lock:
        _history.append(StageRecord(name, status, latency_ms, time.time(), error))
    if error:
        log.warning("pipeline", stage=name, status=status, latency_ms=latency_ms, error=error, **fields)
    else:
        log.info("pipeline", stage=name, status=status, latency_ms=latency_ms, **fields)


def recent(limit: int = 50) -> list[StageRecord]:
    """The latest stage records, newest last."""
    with _history_lock:
        return list(_history)[-limit:]
