"""The one-line STATUS= text systemd shows (`systemctl status knotd`) and the readiness /readyz reads, from the
daemon's state as the lifecycle moves. Written for what mutation testing (`./dev.sh mutate`) found untested.
"""

from __future__ import annotations

from knotd.lifecycle import Lifecycle
from knotd.state import DaemonState


def test_status_line_counts_the_sessions_while_ready_and_draining():
    state = DaemonState(worker_id="AW_7")
    state.set_lifecycle(Lifecycle.READY, "ready")
    assert state.status_line() == "ready: worker AW_7, 0 sessions"
    state.session_started("s1", "room-1", "consent")
    assert state.status_line() == "ready: worker AW_7, 1 session"
    state.session_started("s2", "room-2", "consent")
    assert state.status_line() == "ready: worker AW_7, 2 sessions"
    state.set_lifecycle(Lifecycle.DRAINING, "draining")
    assert state.status_line() == "draining: 2 sessions"


def test_otherwise_the_status_line_is_the_reason():
    state = DaemonState()
    state.set_lifecycle(Lifecycle.LOADING_MODELS, "loading models (registered as worker AW_1)")
    assert state.status_line() == "loading models (registered as worker AW_1)"


def test_only_ready_is_ready_and_only_draining_is_draining():
    state = DaemonState()
    seen = {}
    for lifecycle in Lifecycle:
        version = state.version
        state.set_lifecycle(lifecycle, f"because {lifecycle.value}")
        assert state.version > version  # every change reaches the page's event stream
        snap = state.snapshot()
        assert (snap.state, snap.reason) == (lifecycle.value, f"because {lifecycle.value}")
        seen[lifecycle] = (snap.ready, state.is_ready, state.is_draining)
    assert {k for k, (ready, _, _) in seen.items() if ready} == {Lifecycle.READY}
    assert {k for k, (_, is_ready, _) in seen.items() if is_ready} == {Lifecycle.READY}
    assert {k for k, (_, _, draining) in seen.items() if draining} == {Lifecycle.DRAINING}


async def test_healthz_reports_the_loop_lag_in_seconds_to_the_millisecond(aiohttp_client):
    from knotd.status.app import LoopMonitor, create_app

    monitor = LoopMonitor()
    assert (monitor.interval_s, monitor.unhealthy_lag_s) == (0.5, 5.0)  # a 5 s stall turns /healthz 503
    await monitor.stop()  # never started: nothing to stop
    state = DaemonState()
    state.bind_loop(__import__("asyncio").get_running_loop())
    client = await aiohttp_client(create_app(state, monitor))
    resp = await client.get("/healthz")
    body = await resp.json()
    assert resp.status == 200 and body == {"healthy": True, "loop_lag_s": 0.0}
    assert isinstance(body["loop_lag_s"], float)
    monitor.max_recent_lag_s = 0.12345
    assert (await (await client.get("/healthz")).json())["loop_lag_s"] == 0.123
