"""Session summaries: one JSON record per finished session, appended durably to ``sessions.jsonl``.

The record says what happened (outcome, phases reached, turns, guardrail hits, latency summary, bridged-task
failures); transcript text only when ``session.record_transcripts`` is on. Several job threads may finish at
once, so appends are serialised; each line is written whole and fsynced before the session counts as done.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_append_lock = threading.Lock()

SESSIONS_FILE = "sessions.jsonl"


def latency_summary(turns: Iterable[dict[str, float]]) -> dict[str, dict[str, float]]:
    """p50/p95/max per component (seconds, 3 decimals) over a session's turns."""
    by_component: dict[str, list[float]] = {}
    for turn in turns:
        for component, value in turn.items():
            by_component.setdefault(component, []).append(value)
    out = {}
    for component, values in sorted(by_component.items()):
        values.sort()
        out[component] = {
            "n": len(values),
            "p50": round(statistics.median(values), 3),
            "p95": round(_quantile(values, 0.95), 3),
            "max": round(values[-1], 3),
        }
    return out


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def append_record(state_dir: Path | str, record: dict[str, Any]) -> Path:
    """Append ``record`` as one line to ``<state_dir>/sessions.jsonl`` and fsync it (and a new file's dir).

    Raises:
        OSError: when the state directory is not writable; the caller logs it and counts the session anyway.
    """
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SESSIONS_FILE
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    with _append_lock:
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return path


def read_records(state_dir: Path | str) -> list[dict[str, Any]]:
    """All records in ``sessions.jsonl`` (oldest first); a torn last line is skipped."""
    path = Path(state_dir) / SESSIONS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
