"""The sessions journal: one JSON line per finished session, appended durably to ``<state_dir>/sessions.jsonl``.

Several job threads may finish at once, so appends are serialised; each line is written whole and fsynced
before the session counts as done. A write that cannot finish (disk full, read-only) is cut back off the
file, so ``sessions.jsonl`` never holds half a record written by knotd; a torn last line left by a crash or
another writer is skipped when reading, and the next record starts on a fresh line.

A session that is running has a small marker file in ``<state_dir>/open/`` (fsynced). If knotd dies
(``kill -9``, the watchdog, a power cut) the marker stays; the next start appends the session's record with
outcome ``crashed`` (``recover_open_sessions``), so no session goes unrecorded.

``SessionJournal`` is the session observer that does both. When the state directory cannot be written it
logs once (path and errno), counts ``knotd_session_record_write_failures_total``, keeps the records in memory and
writes them with the next record that succeeds.
"""

from __future__ import annotations

import errno as errno_names
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from knotd import metrics
from knotd.agent.observer import SessionObserver
from knotd.conversation.summary import SessionSummary

log = structlog.get_logger(__name__)

_append_lock = threading.Lock()

SESSIONS_FILE = "sessions.jsonl"
OPEN_DIR = "open"
CRASHED = "crashed"
# Records kept in memory while the state directory cannot be written; beyond this the oldest are dropped.
MAX_PENDING = 1000


class SessionJournal(SessionObserver):
    """Appends every finished session's record to ``sessions.jsonl`` in ``state_dir``; marks running sessions.

    A state directory that cannot be written is logged once and counted; the records wait in memory and the
    session counts as finished anyway.
    """

    def __init__(self, state_dir: Path | str,
                 on_problem: Callable[[str | None, int], None] = lambda problem, pending: None) -> None:
        """``on_problem(problem, pending)`` is told when writing fails (the path and error) and when it works
        again (None), for the status page."""
        self.state_dir = Path(state_dir)
        self._on_problem = on_problem
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._failing: str | None = None  # the error last logged, so a lasting fault is logged once
        self._markers: dict[str, dict[str, Any]] = {}

    @property
    def pending(self) -> int:
        """Records not yet written (the state directory failed)."""
        with self._lock:
            return len(self._pending)

    # -- the per-session marker ---------------------------------------------------------------------
    def session_started(self, session_id: str, room: str, phase: str) -> None:
        marker = {"session_id": session_id, "room": room, "started_at": round(time.time(), 3),
                  "phases_reached": [phase], "final_phase": phase, "turns": 0, **_owner()}
        with self._lock:
            self._markers[session_id] = marker
        self._save_marker(marker)

    def phase_changed(self, session_id: str, phase: str) -> None:
        with self._lock:
            marker = self._markers.get(session_id)
            if marker is None:
                return
            if phase not in marker["phases_reached"]:
                marker["phases_reached"].append(phase)
            marker["final_phase"] = phase
            marker = dict(marker, phases_reached=list(marker["phases_reached"]))
        self._save_marker(marker, durable=False)

    def turn_completed(self, session_id: str, components: Mapping[str, float]) -> None:
        with self._lock:
            marker = self._markers.get(session_id)
            if marker is not None:
                marker["turns"] += 1  # written with the next phase change or at the end: a count may lag

    def _save_marker(self, marker: dict[str, Any], *, durable: bool = True) -> None:
        try:
            write_marker(self.state_dir, marker, durable=durable)
        except OSError as err:
            self._report_failure(err, self.state_dir / OPEN_DIR, count=False)

    # -- the record -----------------------------------------------------------------------------------
    def session_finished(self, summary: SessionSummary) -> None:
        with self._lock:
            self._markers.pop(summary.session_id, None)
        if self.write(summary.to_record()):
            remove_marker(self.state_dir, summary.session_id)
            log.info("session_summary", session_id=summary.session_id, outcome=summary.outcome,
                     turns=summary.turns, phases=list(summary.phases_reached),
                     guardrail_hits=summary.guardrail.total_hits, file=str(self.state_dir / SESSIONS_FILE))

    def write(self, record: dict[str, Any]) -> bool:
        """Append ``record`` after any that wait in memory; False (and kept in memory) when it cannot be."""
        with self._lock:
            self._pending.append(record)
            del self._pending[:-MAX_PENDING]
            while self._pending:
                try:
                    append_record(self.state_dir, self._pending[0])
                except OSError as err:
                    self._report_failure(err, self.state_dir / SESSIONS_FILE, count=True)
                    return False
                self._pending.pop(0)
            if self._failing is not None:
                log.info("session_summaries_written_again", file=str(self.state_dir / SESSIONS_FILE))
                self._failing = None
                self._on_problem(None, 0)
            return True

    def _report_failure(self, err: OSError, path: Path, *, count: bool) -> None:
        if count:
            metrics.RECORD_WRITE_FAILURES.inc()
            reason = os.strerror(err.errno) if err.errno else type(err).__name__
            self._on_problem(f"{path}: {reason}", len(self._pending))
        code = errno_names.errorcode.get(err.errno or 0, type(err).__name__)
        if self._failing != code:  # a lasting fault is logged once, not per session
            self._failing = code
            log.error("session_summary_not_written", path=str(path), errno=code, error=os.strerror(err.errno)
                      if err.errno else type(err).__name__, pending=len(self._pending))


def append_record(state_dir: Path | str, record: dict[str, Any]) -> Path:
    """Append ``record`` as one line to ``<state_dir>/sessions.jsonl`` and fsync it (and a new file's dir).

    Every byte is written or none: a short write (disk full) is cut back off the file. A file that does not
    end in a newline (a line torn by a crash) gets one first, so the torn line stays alone.

    Raises:
        OSError: the state directory is not writable or full; the file is as it was.
    """
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SESSIONS_FILE
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
    with _append_lock:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            try:
                _write_all(fd, line)
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, size)  # no half record; freeing the bytes needs no space
                raise
        finally:
            os.close(fd)
        if created:
            _fsync_dir(directory)
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno_names.ENOSPC, os.strerror(errno_names.ENOSPC))
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_records(state_dir: Path | str) -> list[dict[str, Any]]:
    """All records in ``sessions.jsonl`` (oldest first); torn lines (from a crash) are skipped."""
    path = Path(state_dir) / SESSIONS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# -- markers of running sessions ------------------------------------------------------------------------
def _marker_path(state_dir: Path, session_id: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id)[:120] or "session"
    return state_dir / OPEN_DIR / f"{safe}.json"


def write_marker(state_dir: Path | str, marker: dict[str, Any], *, durable: bool = True) -> None:
    """Write (replace) a running session's marker atomically; ``durable`` also fsyncs it (the first write of a
    session: that the session existed must survive a crash; a later phase is a detail not worth an fsync on
    the session's loop)."""
    directory = Path(state_dir) / OPEN_DIR
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = _marker_path(Path(state_dir), marker["session_id"])
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        _write_all(fd, json.dumps(marker, ensure_ascii=False).encode("utf-8"))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        _fsync_dir(directory)
    if created:
        _fsync_dir(Path(state_dir))


def remove_marker(state_dir: Path | str, session_id: str) -> None:
    try:
        _marker_path(Path(state_dir), session_id).unlink()
    except OSError:
        pass  # gone already, or a read-only directory: the record is written, recovery skips written ids


def recover_open_sessions(state_dir: Path | str) -> list[dict[str, Any]]:
    """Append a ``crashed`` record for every session whose marker a dead knotd left; return the records.

    A marker of a live process (another knotd sharing the directory) is left alone. Ended is the marker's
    last write, the last moment knotd is known to have had the session.

    Raises:
        OSError: the records cannot be written (the markers then stay for the next start).
    """
    directory = Path(state_dir) / OPEN_DIR
    if not directory.is_dir():
        return []
    written = {r.get("session_id") for r in read_records(state_dir)}
    recovered = []
    for path in sorted(directory.glob("*.json")):
        try:
            marker = json.loads(path.read_bytes())
            ended_at = path.stat().st_mtime
        except (OSError, ValueError):
            log.warning("session_marker_unreadable", path=str(path))
            path.unlink(missing_ok=True)
            continue
        if not isinstance(marker, dict) or "session_id" not in marker:
            path.unlink(missing_ok=True)
            continue
        if _owner_alive(marker):
            continue
        if marker["session_id"] not in written:
            record = crashed_record(marker, ended_at)
            append_record(state_dir, record)
            recovered.append(record)
            log.warning("session_recovered_as_crashed", session_id=record["session_id"],
                        started_at=record["started_at"], file=str(Path(state_dir) / SESSIONS_FILE))
        path.unlink(missing_ok=True)
    return recovered


def crashed_record(marker: Mapping[str, Any], ended_at: float) -> dict[str, Any]:
    """The summary record of a session knotd lost (killed mid-session): what its marker knew."""
    started_at = float(marker.get("started_at", ended_at))
    return {
        "session_id": str(marker["session_id"]),
        "room": str(marker.get("room", "")),
        "started_at": round(started_at, 3),
        "ended_at": round(ended_at, 3),
        "duration_s": round(max(0.0, ended_at - started_at), 3),
        "outcome": CRASHED,
        "phases_reached": list(marker.get("phases_reached", [])),
        "final_phase": str(marker.get("final_phase", "")),
        "turns": int(marker.get("turns", 0)),
        "latency_s": {},
        "guardrail": {},
        "task_failures": 0,
        "agent_speeches": {},
    }


def _owner() -> dict[str, Any]:
    """Who writes a marker: this process, told apart from a later one with the same pid (after a reboot, or
    once pids wrap) by the boot id and the process's start time."""
    return {"pid": os.getpid(), "boot_id": _boot_id(), "pid_start": _start_ticks(os.getpid())}


def _owner_alive(marker: Mapping[str, Any]) -> bool:
    """Whether the knotd that wrote ``marker`` still runs (another knotd sharing the state directory)."""
    pid = marker.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False  # recovery runs at start, before this process has sessions: the marker is a dead one's
    if "boot_id" in marker and marker["boot_id"] != _boot_id():
        return False  # written before a reboot (a power cut): the pid is some other process's now
    if marker.get("pid_start") is not None:
        return _start_ticks(pid) == marker["pid_start"]
    return _alive(pid)  # a marker without the process's start time


@functools.cache
def _boot_id() -> str:
    """This boot's id (constant while the process runs: read once)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22); None if it is not
    there or not visible (the unit's ProtectProc=invisible hides other users' processes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a knotd writing to this (knotd-owned) state directory
    return True
