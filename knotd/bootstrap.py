"""One start-up for ``knotd run`` and ``knotd demo``: config → models → resources → status server.

The CLI loads the config (and starts loading Whisper). ``Bootstrap`` then builds what both commands share:
the daemon state with its session observers (state, metrics, the sessions journal), the status server, and
the agent's resources once the models are in. The two commands differ only in where a session's audio comes
from: a LiveKit room (``knotd.daemon``) or local files (``knotd.demo``).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from typing import Any

import structlog
from aiohttp import web

from knotd import metrics
from knotd.agent.observer import Observers
from knotd.config import ListenAddress, Settings
from knotd.journal import SessionJournal, recover_open_sessions
from knotd.lifecycle import Facts, Lifecycle, derive
from knotd.stages import stage
from knotd.state import DaemonState
from knotd.status.app import LoopMonitor, start_status_server
from knotd.status.snapshot import DEMO, LIVEKIT

log = structlog.get_logger(__name__)


def session_observers(settings: Settings, state: DaemonState) -> Observers:
    """Everything a session reports to: the daemon's state, the metrics, the sessions journal."""
    return Observers(state, metrics.MetricsObserver(),
                     SessionJournal(settings.session.state_dir, on_problem=state.journal_status))


def recover_crashed_sessions(settings: Settings) -> int:
    """Record the sessions a killed knotd left open (outcome ``crashed``); how many there were."""
    try:
        records = recover_open_sessions(settings.session.state_dir)
    except OSError as err:
        log.error("crashed_sessions_not_recovered", state_dir=settings.session.state_dir,
                  error=os.strerror(err.errno) if err.errno else type(err).__name__)
        return 0
    for _ in records:
        metrics.SESSIONS.labels(outcome="crashed").inc()
    return len(records)


class Bootstrap:
    """What ``run`` and ``demo`` share. Create on the main thread (livekit plugins register only there).

    Args:
        demo: ``knotd demo``: one session, local audio, no LiveKit.
        whisper: a Whisper load already running (``start_whisper_load``), so it overlaps the livekit import.
        guardrail: a guardrail load already running (``start_guardrail_load``), likewise.
    """

    def __init__(self, settings: Settings, *, demo: bool = False, whisper: Future[Any] | None = None,
                 guardrail: Future[Any] | None = None) -> None:
        from knotd.agent import register_plugins

        register_plugins(settings)  # main thread only; the models load in a thread
        self.settings = settings
        self.state = DaemonState(
            livekit_url="" if demo else settings.livekit.url,
            agent_name=settings.livekit.agent_name,
            max_sessions=1 if demo else settings.worker.max_sessions,
            mode=DEMO if demo else LIVEKIT,
        )
        self.observers = session_observers(settings, self.state)
        self.recovered = recover_crashed_sessions(settings)
        self.monitor = LoopMonitor()
        self.status_address: ListenAddress | None = None  # once listening: the address bound (port 0 resolved)
        self._whisper = whisper
        self._guardrail = guardrail

    def apply(self, facts: Facts) -> Lifecycle:
        """Derive the lifecycle from ``facts`` and show it: the state (page, ``/readyz``) and ``knotd_ready``."""
        lifecycle, reason = derive(facts)
        self.state.set_lifecycle(lifecycle, reason)
        metrics.READY.set(1 if lifecycle is Lifecycle.READY else 0)
        return lifecycle

    async def start_status_server(self) -> web.AppRunner:
        """Bind the state to this loop, set the constant metrics, and serve the status routes.

        Raises:
            ListenError: the status address cannot be bound.
        """
        self.state.bind_loop(asyncio.get_running_loop())
        metrics.initialise(self.state.max_sessions)
        self.monitor.start()
        listen = self.settings.status.listen
        with stage("status_listen"):
            runner = await start_status_server(self.state, listen, self.monitor,
                                               allowed_hosts=self.settings.status.allowed_hosts)
        self.status_address = ListenAddress(listen.host, runner.addresses[0][1]) if runner.addresses else listen
        return runner

    async def load_resources(self) -> Any:
        """Load the shared models (in a thread), then the guardrail rules and the phase script.

        Raises:
            ModelError: Whisper cannot load or fails its self-test. ConfigError: a bad rules or script file.
        """
        from knotd.agent.llm import initialise_metrics as initialise_llm_metrics
        from knotd.agent.session import AgentResources, describe_models
        from knotd.speech.models import load_models

        with stage("model_load"):
            models = await asyncio.to_thread(load_models, self.settings, self._whisper, self._guardrail)
        self.state.model = describe_models(models)
        resources = AgentResources.load(self.settings, models)
        metrics.initialise_guardrail(resources.guardrail)
        metrics.initialise_phases(resources.script.phases)
        initialise_llm_metrics()
        return resources

    async def close(self) -> None:
        await self.monitor.stop()
