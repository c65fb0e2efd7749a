"""The Knotencheck agent as the daemon sees it: load the shared models once, then build the job entrypoint."""

from __future__ import annotations

from typing import Any

from knotd.config import Settings
from knotd.state import DaemonState


class KnotencheckRuntime:
    """Implements ``knotd.daemon.AgentRuntime`` for the Knotencheck agent."""

    def __init__(self) -> None:
        from knotd.agent import register_plugins

        register_plugins()

    def load_models(self, settings: Settings) -> Any:
        """Load Whisper, VAD and TTS once and run the known-answer self-test. Blocks; runs in a thread."""
        from knotd.agent.models import load_models

        return load_models(settings)

    def describe_models(self, models: Any) -> str:
        from knotd.agent.session import describe_models

        return describe_models(models)

    def build_entrypoint(self, settings: Settings, models: Any, state: DaemonState) -> Any:
        from knotd.agent.session import make_entrypoint

        return make_entrypoint(settings, models, state)
