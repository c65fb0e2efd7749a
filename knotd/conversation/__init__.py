"""The Knotencheck conversation, pure: guardrail rules and matching, the phase machine, turn records, summaries.

Nothing here imports livekit or prometheus_client, and nothing does I/O beyond reading its data files, so
its tests need nothing else (import-linter checks this; see pyproject.toml).
"""
