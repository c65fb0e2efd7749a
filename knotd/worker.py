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
        load: 0..1 reported to LiveKit; at 1.0 the worker takes no job. knotd reports active sessions /
            max_sessions (CPU may be high on a 2-core VM while Whisper runs: the default CPU-average load
            with its 0.7 threshold refused every job on such a VM), and 1.0 until the models are loaded.
    """
    # knotd loads the end-of-turn model itself, once, timed and self-tested (knotd.speech.turn_model), and
    # brings its own Silero VAD: livekit's preload would load its local VAD for nothing and the end-of-turn
    # weights outside knotd's model stage (and with detection = "vad", for nothing).
    os.environ.setdefault("LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE", "0")
    worker = settings.worker
    max_sessions = worker.max_sessions
    server = AgentServer(
        job_executor_type=JobExecutorType.THREAD,
        load_fnc=lambda *_: load(),
        load_threshold=1.0,
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
