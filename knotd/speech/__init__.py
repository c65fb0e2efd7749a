"""The speech models every session shares: Whisper's files, its livekit-free transcriber, Silero VAD loading."""
