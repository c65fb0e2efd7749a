"""sd_notify: path and abstract sockets, UTF-8 status text, no-op without systemd, env cleanup."""

from __future__ import annotations

import os
import socket
import uuid

from knotd.systemd import Notifier


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
