"""The sessions journal: one JSON line per finished session, appended durably to ``<state_dir>/sessions.jsonl``.

Several job threads may finish at once, so appends are serialised; each line is written whole and fsynced
before the session counts as done. ``SessionJournal`` is the session observer that writes it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import structlog

from knotd.agent.observer import SessionObserver
from knotd.conversation.summary import SessionSummary

log = structlog.get_logger(__name__)

_append_lock = threading.Lock()

SESSIONS_FILE = "sessions.jsonl"


class SessionJournal(SessionObserver):
    """Appends every finished session's record to ``sessions.jsonl`` in ``state_dir``.

    A state directory that cannot be written is logged; the session counts as finished anyway.
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = state_dir

    def session_finished(self, summary: SessionSummary) -> None:
        try:
            path = append_record(self.state_dir, summary.to_record())
        except OSError as err:
            log.error("session_summary_not_written", session_id=summary.session_id, error=type(err).__name__,
                      state_dir=str(self.state_dir))
            return
        log.info("session_summary", session_id=summary.session_id, outcome=summary.outcome, turns=summary.turns,
                 phases=list(summary.phases_reached), guardrail_hits=summary.guardrail.total_hits, file=str(path))


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
