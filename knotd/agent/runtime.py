"""The Knotencheck agent as the daemon sees it: load the shared models once, then build the job entrypoint."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from knotd.config import Settings
from knotd.state import DaemonState


class KnotencheckRuntime:
    """Implements ``knotd.daemon.AgentRuntime`` for the Knotencheck agent.

    Args:
        whisper: a Whisper load already running (``models.start_whisper_load``), so loading overlaps the
            livekit import; None loads Whisper in ``load_models``.
    """

    def __init__(self, whisper: Future[Any] | None = None) -> None:
        from knotd.agent import register_plugins

        register_plugins()  # main thread only; load_models runs in a thread
        self._whisper = whisper

    def load_models(self, settings: Settings) -> Any:
        """Whisper (known-answer self-tested) and Silero VAD, loaded once. Blocks; runs in a thread."""
        from knotd.speech.models import load_models

        return load_models(settings, self._whisper)

    def describe_models(self, models: Any) -> str:
        from knotd.agent.session import describe_models

        return describe_models(models)

    def build_entrypoint(self, settings: Settings, models: Any, state: DaemonState) -> Any:
        from knotd.agent.session import make_entrypoint

        return make_entrypoint(settings, models, state)
