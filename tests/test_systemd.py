"""sd_notify: path and abstract sockets, UTF-8 status text, no-op without systemd, env cleanup, the ticker."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

from knotd import systemd
from knotd.systemd import EXTEND_WINDOW_S, Notifier, Ticker


def bound_socket(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


def test_path_socket_receives_utf8_status(tmp_path):
    path = str(tmp_path / "notify")
    with bound_socket(path) as sock:
        notifier = Notifier(path)
        assert notifier.ready("ready: worker AW_1, 2 Sitzungen — ✓")
        assert sock.recv(4096).decode() == "READY=1\nSTATUS=ready: worker AW_1, 2 Sitzungen — ✓"


def test_abstract_socket_is_supported():
    name = f"knotd-test-{uuid.uuid4().hex}"
    with bound_socket("\0" + name) as sock:
        Notifier("@" + name).stopping("draining: 1 session")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining: 1 session"


def test_unset_socket_is_a_no_op():
    notifier = Notifier(None)
    assert not notifier.enabled
    assert notifier.status("anything") is False


def test_vanished_socket_does_not_raise(tmp_path):
    assert Notifier(str(tmp_path / "gone")).status("x") is False


def test_from_environ_reads_once_and_removes_the_variables():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "A": "b"}
    notifier = Notifier.from_environ(env)
    assert env == {"A": "b"}
    assert notifier.enabled and notifier.watchdog_interval_s == 2.0


def test_watchdog_for_another_pid_is_ignored():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_environ(env).watchdog_interval_s is None


def test_status_text_is_kept_on_one_line(tmp_path):
    path = str(tmp_path / "notify")
    with bound_socket(path) as sock:
        Notifier(path).status("line one\nREADY=1")
        assert sock.recv(4096) == b"STATUS=line one READY=1"


async def test_ticker_pings_the_watchdog_from_the_loop_and_extends_the_stop_timeout_when_draining(tmp_path):
    """1. A ticker runs with a watchdog of 0.2 s. 2. The daemon starts draining.
    Result: WATCHDOG=1 arrives on its own; EXTEND_TIMEOUT_USEC= arrives as soon as the drain starts."""
    path = str(tmp_path / "notify")
    with bound_socket(path) as sock:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()

        async def receive() -> str:
            return (await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).decode()

        ticker = Ticker(Notifier(path, watchdog_usec=200_000))
        ticker.start()
        try:
            assert [await receive(), await receive()] == ["WATCHDOG=1", "WATCHDOG=1"]
            ticker.extend_stop_timeout(True)
            seen = {await receive() for _ in range(3)}
            assert f"EXTEND_TIMEOUT_USEC={int(EXTEND_WINDOW_S * 1_000_000)}" in seen
        finally:
            await ticker.stop()


def test_ticker_extends_only_while_draining_and_is_silent_without_a_watchdog(tmp_path, monkeypatch):
    monkeypatch.setattr(systemd, "EXTEND_EVERY_S", 0.0)  # every tick is due
    path = str(tmp_path / "notify")
    with bound_socket(path) as sock:
        sock.setblocking(False)
        ticker = Ticker(Notifier(path))

        def sent() -> list[bytes]:
            out = []
            while True:
                try:
                    out.append(sock.recv(4096))
                except BlockingIOError:
                    return out

        ticker.tick()
        assert sent() == []
        ticker.extend_stop_timeout(True)
        ticker.tick()
        ticker.tick()
        assert sent() == [f"EXTEND_TIMEOUT_USEC={int(EXTEND_WINDOW_S * 1_000_000)}".encode()] * 2
        ticker.extend_stop_timeout(False)
        ticker.tick()
        assert sent() == []


def test_a_reader_that_falls_behind_never_blocks_the_caller(tmp_path):
    """systemd's notify socket holds net.unix.max_dgram_qlen datagrams (10 by default); a plain send to a full
    queue blocks. The notifier runs on the event loop (the LiveKit worker's too): it must drop instead."""
    import threading

    from prometheus_client import REGISTRY

    def dropped() -> float:
        return REGISTRY.get_sample_value("knotd_sd_notify_dropped_total", {"error": "BlockingIOError"}) or 0.0

    path = str(tmp_path / "notify")
    with bound_socket(path) as sock:  # bound, never read while the notifier sends
        notifier = Notifier(path)
        before = dropped()
        results: list[bool] = []
        sender = threading.Thread(target=lambda: results.extend(notifier.status(f"s{i}") for i in range(100)),
                                  daemon=True)
        sender.start()
        sender.join(timeout=10)
        assert not sender.is_alive(), "a full notify queue blocked the sender"
        assert results[0] is True and results[-1] is False
        assert dropped() - before == results.count(False)
        assert sock.recv(4096) == b"STATUS=s0"  # what was queued is intact, in order


# -- what mutation testing (./dev.sh mutate) showed was not pinned down --------------------------------


def test_without_systemd_the_environment_gives_a_silent_notifier():
    """knotd run outside systemd (no NOTIFY_SOCKET) neither notifies nor pings a watchdog."""
    notifier = Notifier.from_environ({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None


def test_a_notify_socket_without_a_watchdog_notifies_but_never_pings(tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
    notifier = Notifier.from_environ(env)
    assert env == {} and notifier.enabled and notifier.watchdog_interval_s is None


def test_from_environ_reads_the_process_environment_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier.from_environ()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert notifier.enabled and notifier.watchdog_interval_s == 1 / 2_000_000  # even a 1 µs watchdog is honoured


def test_a_failed_notification_is_logged_once_per_kind_of_error(tmp_path):
    """systemd gone: one sd_notify_failed line naming the error and errno, not one per message."""
    from structlog.testing import capture_logs

    notifier = Notifier(str(tmp_path / "gone"))
    with capture_logs() as logged:
        assert notifier.status("one") is False
        assert notifier.watchdog() is False
    assert logged == [{"event": "sd_notify_failed", "log_level": "warning", "error": "FileNotFoundError",
                       "errno": 2}]


async def test_a_stopped_ticker_leaves_no_task_behind(tmp_path):
    """After stop() the loop holds no knotd:systemd_ticker task (a leftover would ping a stopped daemon's watchdog)."""

    def tickers() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "knotd:systemd_ticker"]

    ticker = Ticker(Notifier(str(tmp_path / "notify"), watchdog_usec=10_000_000))
    await ticker.stop()  # never started: nothing to stop
    ticker.start()
    assert len(tickers()) == 1
    await ticker.stop()
    assert tickers() == []


async def test_while_draining_without_a_watchdog_the_ticker_keeps_extending(tmp_path, monkeypatch):
    """No watchdog, drain in progress: EXTEND_TIMEOUT_USEC= comes again and again, not once."""
    monkeypatch.setattr(systemd, "EXTEND_EVERY_S", 0.01)
    path = str(tmp_path / "notify")
    with bound_socket(path) as sock:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        ticker = Ticker(Notifier(path))
        ticker.start()
        try:
            await asyncio.sleep(0)  # one loop round: the idle ticker (no watchdog, no drain) waits to be woken
            ticker.extend_stop_timeout(True)
            for _ in range(3):
                got = (await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).decode()
                assert got == f"EXTEND_TIMEOUT_USEC={int(EXTEND_WINDOW_S * 1_000_000)}"
        finally:
            await ticker.stop()
