"""The Knotencheck voice agent, the LiveKit edge: session wiring, STT, TTS and LLM adapters, local audio IO."""


def register_plugins() -> None:
    """Import the livekit plugins knotd uses. Call on the main thread, before loading models in a thread.

    livekit registers plugins at import time and refuses to do so from any other thread.
    """
    import livekit.plugins.openai  # noqa: F401
    import livekit.plugins.silero  # noqa: F401
