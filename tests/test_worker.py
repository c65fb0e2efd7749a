"""The LiveKit side of the daemon: what knotd does where the livekit SDK would stop the process itself."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

# A real panic event through the rtc SDK's own FFI callback, as its native core sends one; with the watch
# the process lives on and the callback is told, without it the SDK SIGTERMs its own process.
PANIC_SCRIPT = textwrap.dedent("""
    import ctypes, signal, sys
    # SIGTERM held pending (in every thread started from here on) until the check below: whether the SDK sent
    # one is then a fact to read, not something to wait for.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    from livekit.rtc import _ffi_client
    from livekit.rtc._proto import ffi_pb2
    from knotd.worker import FfiPanicWatch

    event = ffi_pb2.FfiEvent()
    event.panic.message = "timed out waiting for ReadyForRoomEventRequest after ConnectCallback (room_handle=7)"
    data = event.SerializeToString()
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    told = []
    if sys.argv[1] == "watched":
        with FfiPanicWatch(lambda: told.append(1)):
            _ffi_client.ffi_event_callback(buffer, len(data))
    else:
        _ffi_client.ffi_event_callback(buffer, len(data))
    pending = signal.SIGTERM in signal.sigpending()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a pending SIGTERM ends the process here
    print("alive, told", len(told), "pending", pending)
""")


def run_panic(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PANIC_SCRIPT, mode], capture_output=True, text=True, timeout=60)


def test_an_ffi_panic_reaches_knotd_instead_of_terminating_the_process():
    watched = run_panic("watched")
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.strip() == "alive, told 1 pending False"
    assert "FFI Panic:" in watched.stderr  # the SDK still reports it (to the journal)


def test_without_the_watch_the_sdk_terminates_its_own_process():
    bare = run_panic("bare")
    assert bare.returncode == -signal.SIGTERM
