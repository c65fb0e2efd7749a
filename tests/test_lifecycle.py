"""The daemon's lifecycle is derived from its facts in one place (knotd.lifecycle.derive)."""

from __future__ import annotations

from knotd.lifecycle import Facts, Lifecycle, derive

URL = "wss://livekit.example"


def test_start_is_loading_models():
    assert derive(Facts(livekit_url=URL)) == (Lifecycle.LOADING_MODELS, "loading models")


def test_registered_before_the_models_are_in_still_loads_and_names_the_worker():
    facts = Facts(livekit_url=URL, worker_id="AW_1", is_registered=True, registrations=1)
    assert derive(facts) == (Lifecycle.LOADING_MODELS, "loading models (registered as worker AW_1)")


def test_ready_needs_both_models_and_registration():
    facts = Facts(livekit_url=URL, models_loaded=True)
    assert derive(facts) == (Lifecycle.CONNECTING, f"connecting to {URL}")
    facts.connection_failed = True
    assert derive(facts) == (Lifecycle.CONNECTING, f"connecting to {URL}: not reachable yet, retrying")
    facts.worker_id, facts.is_registered, facts.registrations = "AW_1", True, 1
    assert derive(facts) == (Lifecycle.READY, "ready")


def test_a_lost_connection_after_registering_is_reconnecting():
    facts = Facts(livekit_url=URL, models_loaded=True, worker_id="AW_1", registrations=1, connection_failed=True)
    assert derive(facts) == (Lifecycle.RECONNECTING, f"reconnecting to {URL}: connection lost")


def test_draining_stopped_and_failed_win_over_everything_else():
    facts = Facts(livekit_url=URL, models_loaded=True, worker_id="AW_1", is_registered=True, registrations=1)
    facts.draining = True
    assert derive(facts) == (Lifecycle.DRAINING, "draining")
    facts.stopped = True
    assert derive(facts) == (Lifecycle.STOPPED, "stopped")
    facts.failure = "LiveKit worker stopped: boom"
    assert derive(facts) == (Lifecycle.FAILED, "LiveKit worker stopped: boom")


def test_the_demo_is_ready_without_livekit_once_the_models_are_in():
    facts = Facts(demo=True)
    assert derive(facts) == (Lifecycle.LOADING_MODELS, "loading models")
    facts.models_loaded = True
    lifecycle, reason = derive(facts)
    assert lifecycle is Lifecycle.READY and "no LiveKit" in reason


def test_the_demo_says_exactly_why_it_is_ready():
    """The reason /readyz and the page show in the demo, word for word."""
    facts = Facts(demo=True, models_loaded=True)
    assert derive(facts) == (Lifecycle.READY, "demo: one session on local audio, no LiveKit")
