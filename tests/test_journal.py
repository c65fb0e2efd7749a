"""The sessions journal under faults: a full or read-only state directory, a torn line, a killed knotd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from knotd import metrics
from knotd.journal import (
    OPEN_DIR,
    SESSIONS_FILE,
    SessionJournal,
    append_record,
    read_records,
    recover_open_sessions,
    write_marker,
)


def _record(n: int, size: int = 600) -> dict:
    return {"session_id": f"s{n}", "outcome": "completed", "padding": "x" * size}


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (root only): a state directory that fills up."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory``: only the free tail of files' last pages is left."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def test_torn_last_line_is_skipped_and_the_next_record_starts_a_fresh_line(tmp_path):
    append_record(tmp_path, _record(1, 10))
    with open(tmp_path / SESSIONS_FILE, "ab") as f:
        f.write(b'{"session_id": "torn", "outc')  # a crash mid-write
    append_record(tmp_path, _record(2, 10))
    assert [r["session_id"] for r in read_records(tmp_path)] == ["s1", "s2"]
    lines = (tmp_path / SESSIONS_FILE).read_bytes().split(b"\n")
    assert lines[1] == b'{"session_id": "torn", "outc'


def test_full_disk_writes_no_fragment_and_keeps_records_until_space_returns(small_tmpfs):
    """Records larger than a page: the second one fits only partly in the first one's last page (a short write
    of ≈ 3 KiB, then ENOSPC)."""
    journal = SessionJournal(small_tmpfs / "state")
    assert journal.write(_record(1, 5000))
    before = (small_tmpfs / "state" / SESSIONS_FILE).read_bytes()
    filler = _fill(small_tmpfs)
    failures = metrics.RECORD_WRITE_FAILURES._value.get()

    assert not journal.write(_record(2, 5000))
    assert not journal.write(_record(3, 5000))
    assert (small_tmpfs / "state" / SESSIONS_FILE).read_bytes() == before  # not a byte of a half record
    assert journal.pending == 2
    assert metrics.RECORD_WRITE_FAILURES._value.get() == failures + 2

    filler.unlink()
    assert journal.write(_record(4, 5000))
    assert [r["session_id"] for r in read_records(small_tmpfs / "state")] == ["s1", "s2", "s3", "s4"]
    assert journal.pending == 0


def test_read_only_state_dir_is_logged_once_with_path_and_errno(small_tmpfs, capsys):
    from knotd import logs
    from knotd.state import DaemonState
    from knotd.status.latency import LatencyHistograms
    from knotd.status.page import create_environment, render_index
    from knotd.status.view import build_page

    logs.configure("info", "json")
    state = DaemonState()
    journal = SessionJournal(small_tmpfs, on_problem=state.journal_status)
    assert journal.write(_record(1, 10))
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    for n in range(2, 5):
        assert not journal.write(_record(n, 10))
    errors = [json.loads(line) for line in capsys.readouterr().err.splitlines()
              if "session_summary_not_written" in line]
    assert len(errors) == 1
    assert errors[0]["errno"] == "EROFS" and errors[0]["path"] == str(small_tmpfs / SESSIONS_FILE)
    snapshot = state.snapshot()
    assert snapshot.to_json()["journal"] == {"problem": f"{small_tmpfs / SESSIONS_FILE}: Read-only file system",
                                             "pending_records": 3}
    page = render_index(create_environment(), build_page(snapshot, LatencyHistograms()))
    assert "Session records are not being written" in page and "3 records wait in memory" in page
    subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert journal.write(_record(5, 10))
    assert state.snapshot().journal_problem is None
    assert [r["session_id"] for r in read_records(small_tmpfs)] == ["s1", "s2", "s3", "s4", "s5"]


def test_short_write_past_the_file_size_limit_fails_loudly_and_leaves_no_fragment(tmp_path):
    """RLIMIT_FSIZE makes the kernel write only part of the line (as a full disk does), without root."""
    append_record(tmp_path, _record(1, 10))
    size = (tmp_path / SESSIONS_FILE).stat().st_size
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 100}, {size + 100}))
from knotd.journal import append_record
try:
    append_record({str(tmp_path)!r}, {{"session_id": "s2", "padding": "x" * 600}})
except OSError as err:
    print("failed", err.errno)
    sys.exit(0)
print("reported success")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("failed"), out.stdout + out.stderr
    assert (tmp_path / SESSIONS_FILE).stat().st_size == size
    append_record(tmp_path, _record(3, 10))
    assert [r["session_id"] for r in read_records(tmp_path)] == ["s1", "s3"]


def test_sessions_left_open_by_a_dead_knotd_are_recorded_as_crashed(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()
    write_marker(tmp_path, {"session_id": "RM_dead", "room": "r1", "started_at": 1000.0,
                            "phases_reached": ["greeting", "consent"], "final_phase": "consent", "turns": 2,
                            "pid": proc.pid})
    write_marker(tmp_path, {"session_id": "RM_alive", "room": "r2", "started_at": 1000.0,
                            "phases_reached": ["greeting"], "final_phase": "greeting", "turns": 0,
                            "pid": os.getppid()})  # another knotd sharing the directory, still running

    recovered = recover_open_sessions(tmp_path)
    assert [r["session_id"] for r in recovered] == ["RM_dead"]
    record = read_records(tmp_path)[0]
    assert record["outcome"] == "crashed" and record["final_phase"] == "consent" and record["room"] == "r1"
    assert sorted(p.name for p in (tmp_path / OPEN_DIR).iterdir()) == ["RM_alive.json"]
    assert recover_open_sessions(tmp_path) == []  # once only


def test_a_marker_whose_pid_is_now_another_process_is_recorded_as_crashed(tmp_path):
    """1. A running knotd (a child process) has a session open. 2. Its marker, as a knotd that died before a
    reboot (another boot id) or before its pid came round again (another start time) would have left it.

    Result: those two are recorded as crashed although a process with their pid runs; the live knotd's own
    session is left alone.
    """
    code = ("import sys, time; from knotd.journal import SessionJournal; "
            "SessionJournal(sys.argv[1]).session_started('RM_running', 'r', 'greeting'); print('open', flush=True); "
            "time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "open"
        running = json.loads((tmp_path / OPEN_DIR / "RM_running.json").read_text())
        assert running["pid"] == child.pid
        write_marker(tmp_path, dict(running, session_id="RM_before_reboot", boot_id="another boot"))
        write_marker(tmp_path, dict(running, session_id="RM_pid_reused", pid_start=running["pid_start"] - 1))

        recovered = recover_open_sessions(tmp_path)
        assert sorted(r["session_id"] for r in recovered) == ["RM_before_reboot", "RM_pid_reused"]
        assert [p.name for p in (tmp_path / OPEN_DIR).iterdir()] == ["RM_running.json"]
    finally:
        child.kill()
        child.wait()
