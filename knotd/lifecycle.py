"""The daemon's lifecycle, derived in one place from the facts.

Every event (models loaded, worker registered, connection lost, stop requested, a failure) updates the
``Facts`` and calls ``derive()``; nothing else decides the lifecycle or its reason.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Lifecycle(enum.Enum):
    STARTING = "starting"
    LOADING_MODELS = "loading_models"
    CONNECTING = "connecting"
    READY = "ready"
    RECONNECTING = "reconnecting"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class Facts:
    """What the daemon knows; ``derive()`` reads only these.

    ``demo`` is ``knotd demo``: local audio and no LiveKit, so it is ready once the models are in.
    """

    livekit_url: str = ""
    demo: bool = False
    models_loaded: bool = False
    worker_id: str | None = None
    is_registered: bool = False
    registrations: int = 0
    connection_failed: bool = False
    draining: bool = False
    stopped: bool = False
    failure: str | None = None


def derive(f: Facts) -> tuple[Lifecycle, str]:
    """The lifecycle and the reason a person reads for it."""
    if f.failure is not None:
        return Lifecycle.FAILED, f.failure
    if f.stopped:
        return Lifecycle.STOPPED, "stopped"
    if f.draining:
        return Lifecycle.DRAINING, "draining"
    if f.demo:
        if f.models_loaded:
            return Lifecycle.READY, "demo: one session on local audio, no LiveKit"
        return Lifecycle.LOADING_MODELS, "loading models"
    if f.is_registered:
        if f.models_loaded:
            return Lifecycle.READY, "ready"
        return Lifecycle.LOADING_MODELS, f"loading models (registered as worker {f.worker_id})"
    if f.registrations > 0:
        return Lifecycle.RECONNECTING, f"reconnecting to {f.livekit_url}: connection lost"
    if not f.models_loaded:
        return Lifecycle.LOADING_MODELS, "loading models"
    if f.connection_failed:
        return Lifecycle.CONNECTING, f"connecting to {f.livekit_url}: not reachable yet, retrying"
    return Lifecycle.CONNECTING, f"connecting to {f.livekit_url}"
