"""The Knotencheck voice agent, the LiveKit edge: session wiring, STT, TTS and LLM adapters, local audio IO."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from knotd.config import Settings


def register_plugins(settings: Settings | None = None) -> None:
    """Import the livekit plugins knotd uses. Call on the main thread, before loading models in a thread.

    livekit registers plugins at import time and refuses to do so from any other thread. The OpenAI plugin
    (≈ 1 s of imports on 2 cores) only when `settings` use an OpenAI-compatible LLM or TTS, or are not given.
    """
    import livekit.plugins.silero  # noqa: F401

    if settings is None or settings.llm.base_url or settings.tts.engine == "openai":
        import livekit.plugins.openai  # noqa: F401
