"""The Knotencheck agent as the daemon sees it: load the shared models once, then build the job entrypoint."""

from __future__ import annotations

from typing import Any

from knotd.config import Settings
from knotd.state import DaemonState


class KnotencheckRuntime:
    """Implements ``knotd.daemon.AgentRuntime`` for the Knotencheck agent."""

    def load_models(self, settings: Settings) -> Any:
        """Load Whisper, VAD and TTS once and run the known-answer self-test. Blocks; runs in a thread."""
        from knotd.agent.models import load_models

        return load_models(settings)

    def describe_models(self, models: Any) -> str:
        return models.describe()

    def build_entrypoint(self, settings: Settings, models: Any, state: DaemonState) -> Any:
        from knotd.agent.session import make_entrypoint

        return make_entrypoint(settings, models, state)
