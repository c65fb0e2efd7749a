"""The LiveKit side of the daemon: build the ``AgentServer`` and watch its connection.

livekit-agents 1.8.9 emits ``worker_registered`` (again after every reconnect) but nothing when the
connection drops; its only signal is the warning it logs before each retry ("failed to connect to livekit,
retrying in Ns"). ``ConnectionWatch`` listens for exactly that record so readiness can fall back to 503
while the worker is away. The match is on the message's fixed prefix; tests/test_daemon.py drops the
connection and asserts ``/readyz`` turns 503, so an upstream rename fails loudly there.
"""

from __future__ import annotations

import logging
import os
import signal
import types
from collections.abc import Awaitable, Callable

from livekit.agents import AgentServer, JobContext, JobExecutorType

from knotd.config import Settings

RETRY_MESSAGE_PREFIX = "failed to connect to livekit"


def build_server(
    settings: Settings,
    entrypoint: Callable[[JobContext], Awaitable[None]],
    load: Callable[[], float],
) -> AgentServer:
    """An ``AgentServer`` for knotd: THREAD executor, knotd's own load, loopback health port.

    Args:
        entrypoint: the job entrypoint (runs in a job thread with its own event loop).
        load: 0..1, the share of the worker's sessions in use: active sessions / max_sessions, and 1.0 until
            the models are loaded (CPU may be high on a 2-core VM while Whisper runs: livekit's default
            CPU-average load refused every job on such a VM).

    LiveKit reads the load on its own scale: livekit-server offers a room only to a worker whose load is
    below its ``agents.target_load`` (0.7 by default; affinity = target − load). Reporting active / max as
    it is left the last slot of ``max_sessions = 4`` unused (3 / 4 = 0.75): the fourth caller got no agent.
    So knotd reports ``load × livekit.target_load`` and is full (WS_FULL) exactly at ``max_sessions``.
    """
    # knotd loads the end-of-turn model itself, once, timed and self-tested (knotd.speech.turn_model), and
    # brings its own Silero VAD: livekit's preload would load its local VAD for nothing and the end-of-turn
    # weights outside knotd's model stage (and with detection = "vad", for nothing).
    os.environ.setdefault("LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE", "0")
    worker = settings.worker
    max_sessions = worker.max_sessions
    server = AgentServer(
        job_executor_type=JobExecutorType.THREAD,
        load_fnc=lambda *_: load() * settings.livekit.target_load,
        load_threshold=settings.livekit.target_load,
        # In THREAD mode an idle "process" is a thread with a fresh event loop: cheap. One per slot lets
        # LiveKit reserve every slot of a burst at once (livekit divides the threshold by this number).
        num_idle_processes=max_sessions,
        drain_timeout=int(worker.drain_timeout_s),
        max_retry=worker.max_retry,
        ws_url=settings.livekit.url,
        api_key=settings.livekit.api_key.reveal(),
        api_secret=settings.livekit.api_secret.reveal(),
        host=worker.health_listen.host,
        port=worker.health_listen.port,
        # The job's shutdown is bounded by the drain; livekit's default of 300 s would outlive it.
        session_end_timeout=min(60.0, max(worker.drain_timeout_s, 1.0)),
    )
    server.rtc_session(entrypoint, agent_name=settings.livekit.agent_name)
    return server


async def announce_load(server: AgentServer) -> None:
    """Send LiveKit the worker's load now, not at livekit's next status update (every 2.5 s).

    LiveKit offers a room only to a worker it believes has room and does not queue the job ("not dispatching
    agent job since no worker is available"): a caller joining between READY=1 — or a session's end — and
    that update would get no agent at all. livekit 1.8.9 has no public call for this; these two private
    methods are what its own status loop runs. tests/test_room.py joins a room right after READY, so a
    rename fails there.
    """
    await server._refresh_worker_load()
    await server._update_worker_status()


class ConnectionWatch(logging.Handler):
    """Calls ``on_lost`` whenever livekit reports that the worker connection failed or dropped."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_lost = on_lost
        self._logger = logging.getLogger("livekit.agents")

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith(RETRY_MESSAGE_PREFIX):
            self._on_lost()

    def __enter__(self) -> ConnectionWatch:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)


class FfiPanicWatch:
    """Calls ``on_panic`` where the livekit rtc SDK would SIGTERM its own process after an FFI panic.

    ``livekit/rtc/_ffi_client.py`` answers every panic of its native core ("unrecoverable state") by printing
    "FFI Panic: …" and ``os.kill(os.getpid(), SIGTERM)``. To knotd that signal looked like systemd stopping
    it: it drained, exited 0, and ``Restart=on-failure`` never brought it back — seen when a room connect
    was starved for 15 s ("timed out waiting for ReadyForRoomEventRequest") with four sessions joining at
    once on 2 busy cores. Inside this context the SDK's ``os`` is a view of the real module whose ``kill``
    of this process with SIGTERM calls ``on_panic`` instead (from the SDK's callback thread); every other
    call goes to the real ``os``. tests/test_worker.py feeds a real panic event through the SDK's callback,
    so a change of the SDK's mechanism fails there.
    """

    def __init__(self, on_panic: Callable[[], None]) -> None:
        self._on_panic = on_panic

    def __enter__(self) -> FfiPanicWatch:
        from livekit.rtc import _ffi_client

        real_os, on_panic = os, self._on_panic

        def kill(pid: int, sig: int) -> None:
            if pid == real_os.getpid() and sig == signal.SIGTERM:
                on_panic()
            else:
                real_os.kill(pid, sig)

        self._module = _ffi_client
        view = types.ModuleType("os")
        view.__dict__.update(real_os.__dict__)
        view.kill = kill  # type: ignore[attr-defined]
        _ffi_client.os = view  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self._module.os = os  # type: ignore[attr-defined]
