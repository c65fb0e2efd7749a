"""The status page, /events, /api/status and /static/ through aiohttp's test client (no browser)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import Histogram

from knotd import metrics
from knotd.bridge import TaskFailure
from knotd.conversation.guardrails import GuardSummary, Verdict
from knotd.conversation.recognition import StepAnswer
from knotd.conversation.summary import SessionSummary
from knotd.lifecycle import Facts, derive
from knotd.state import DaemonState, Lifecycle
from knotd.status.app import STREAMS_KEY, LoopMonitor, create_app
from knotd.status.latency import Buckets, LatencyHistograms, histogram_quantile, summarise
from knotd.status.page import format_duration, format_latency
from knotd.status.snapshot import DEMO

XSS = "<script>alert(1)</script>"


def private_histograms() -> LatencyHistograms:
    """Histograms outside knotd's global registry, so each test sees only its own observations."""
    return LatencyHistograms(
        stages=Histogram("t_stage_seconds", "test", ["stage", "status"], buckets=metrics.STAGE_BUCKETS,
                         registry=None),
        turns=Histogram("t_turn_seconds", "test", ["component"], buckets=metrics.TURN_BUCKETS, registry=None),
    )


@pytest.fixture
async def state() -> DaemonState:
    s = DaemonState(livekit_url="wss://livekit.example", agent_name="knotencheck", model="whisper base int8",
                    max_sessions=2)
    s.bind_loop(asyncio.get_running_loop())
    return s


@pytest.fixture
def histograms() -> LatencyHistograms:
    return private_histograms()


@pytest.fixture
async def client(aiohttp_client, state, histograms):
    return await aiohttp_client(create_app(state, histograms=histograms))


async def page_text(client) -> str:
    resp = await client.get("/")
    assert resp.status == 200
    return await resp.text()


def visible_text(html: str) -> str:
    """Roughly what a person reads: tags dropped, whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


async def read_sse(resp: aiohttp.ClientResponse, timeout: float = 5.0) -> tuple[str, str]:
    """The next SSE event as (event name, data), or ("comment", text) for a comment line."""
    name, data = "message", []
    while True:
        raw = await asyncio.wait_for(resp.content.readline(), timeout)
        if not raw:
            raise EOFError("stream ended")
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            return "comment", line[1:].strip()
        if not line:
            if data:
                return name, "\n".join(data)
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)


async def next_status(resp: aiohttp.ClientResponse) -> dict:
    while True:
        name, data = await read_sse(resp)
        if name == "status":
            return json.loads(data)


# -- the page -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lifecycle", list(Lifecycle))
async def test_page_renders_every_lifecycle_state(client, state, lifecycle):
    """Whatever the daemon is doing, / answers 200 with a badge that says ready or not."""
    state.set_lifecycle(lifecycle, f"reason for {lifecycle.value}")
    text = visible_text(await page_text(client))
    badge = "READY" if lifecycle is Lifecycle.READY else "NOT READY"
    expected = {"draining": "DRAINING", "stopped": "STOPPED", "failed": "FAILED"}.get(lifecycle.value, badge)
    assert expected in text


async def test_not_ready_page_says_why(client, state):
    """1. knotd has loaded its models and is dialling LiveKit.

    Result: the page says NOT READY, what is happening, the daemon's own reason, and which steps are done.
    """
    state.set_lifecycle(Lifecycle.CONNECTING, "connecting to wss://livekit.example: not reachable yet, retrying")
    html = await page_text(client)
    text = visible_text(html)
    assert "NOT READY" in text and "Connecting to LiveKit" in text
    assert "not reachable yet, retrying" in text
    assert re.search(r'step-done"><span[^>]*></span>Models loaded', html)
    assert re.search(r'step-active"><span[^>]*></span>Registered with LiveKit', html)
    assert "not registered" in text


async def test_ready_page_names_the_worker_and_capacity(client, state):
    state.set_lifecycle(Lifecycle.READY, "ready")
    state.worker_registered("AW_test42")
    state.session_started("s1", "werkstatt-1", "greeting")
    text = visible_text(await page_text(client))
    assert "READY" in text and "NOT READY" not in text
    assert "AW_test42" in text
    assert "1 of 2 sessions in use" in text
    assert "wss://livekit.example" in text and "whisper base int8" in text and "werkstatt-1" in text


async def test_demo_page_says_it_is_a_demo_with_local_audio_and_never_none(aiohttp_client, histograms):
    """1. `knotd demo` has loaded its models (no LiveKit, no worker).
    Result: the page says DEMO and local audio, shows no LiveKit step as pending, and no "None" anywhere."""
    demo = DaemonState(agent_name="knotencheck", model="whisper base int8", max_sessions=1, mode=DEMO)
    demo.bind_loop(asyncio.get_running_loop())
    demo.set_lifecycle(*derive(Facts(demo=True, models_loaded=True)))
    client = await aiohttp_client(create_app(demo, histograms=histograms))
    html = await page_text(client)
    text = visible_text(html)
    assert "DEMO" in text and "local audio" in text and "not connected to LiveKit" in text
    assert "None" not in text and "Registered with LiveKit" not in text
    assert re.search(r'step-done"><span[^>]*></span>Local audio \(demo, no LiveKit\)', html)
    body = await (await client.get("/api/status")).json()
    assert body["mode"] == "demo" and body["ready"] is True


async def test_room_names_and_handler_names_are_escaped(client, state):
    """User-controlled text (room names) and code names never become markup, on the page or in /events."""
    state.session_started("s1", XSS, "greeting")
    state.task_failed(TaskFailure("s1", "<img src=x onerror=alert(2)>", "ValueError", 1.0))
    html = await page_text(client)
    assert XSS not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html

    resp = await client.get("/events")
    while (event := await read_sse(resp))[0] != "page":
        pass
    sections = json.loads(event[1])["sections"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in sections["sessions"]["html"]
    assert XSS not in event[1]
    resp.close()


async def test_page_has_no_inline_script_or_style_and_sends_a_strict_csp(client):
    resp = await client.get("/")
    html = await resp.text()
    csp = resp.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp and "style-src 'self'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert " style=" not in html and "<style" not in html
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html))
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"


@pytest.mark.parametrize("path", ["/events", "/static/status.css", "/no-such-page"])
async def test_every_response_carries_the_security_headers(client, path):
    """Streams, static files and error pages too, not only the handlers' own responses."""
    resp = await client.get(path)
    assert "unsafe-inline" not in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"
    resp.close()


async def test_page_links_the_machine_endpoints(client):
    html = await page_text(client)
    assert 'href="/metrics"' in html and 'href="/api/status"' in html


async def test_page_shows_sessions_turns_guardrails_failures(client, state):
    state.set_lifecycle(Lifecycle.READY, "ready")
    state.session_started("s1", "werkstatt-2", "greeting")
    state.phase_changed("s1", "guided_check")
    state.turn_completed("s1", {"eou": 0.2, "stt": 0.3, "llm_ttft": 0.15, "tts_ttfb": 0.08, "e2e": 0.91})
    state.guard_verdict("s1", "input", Verdict(False, rule="off_topic"))
    state.task_failed(TaskFailure("s1", "publish_phase", "TimeoutError", 1.0))
    state.session_finished(SessionSummary(
        session_id="s0", room="werkstatt-0", outcome="completed", started_at=100.0, ended_at=160.0,
        turns=3, phases_reached=("greeting", "summary"), final_phase="goodbye",
        latency_s={"e2e": {"n": 3, "p50": 0.64, "p95": 0.7, "max": 0.7}}, task_failures=0,
        guardrail=GuardSummary(checks={}, hits={"input": {"off_topic": 2}, "output": {"no_diagnosis": 1}},
                               discarded_chars=0),
    ))
    html = await page_text(client)
    text = visible_text(html)
    assert "guided_check" in text
    assert "910 ms" in text  # the turn's e2e, over the 0.8 s goal ...
    assert re.search(r'class="num over"[^>]*>910 ms', html)  # ... and marked as such
    assert 'class="pt over"' in html  # the sparkline's dot for it, too
    assert "off_topic" in text and "publish_phase" in text and "TimeoutError" in text
    finished = visible_text(html[html.index('id="finished"'):])
    assert "werkstatt-0" in finished and "completed" in finished and "1 min 0 s" in finished
    assert "goodbye" in finished and "640 ms" in finished
    assert re.search(r'data-label="Guardrail hits">3<', html)


async def test_page_and_api_show_how_turns_ended_and_cut_offs(client, state):
    state.set_lifecycle(Lifecycle.READY, "ready")
    state.session_started("s1", "werkstatt-2", "greeting")
    for how in ("model", "model", "max_delay", "vad"):
        state.turn_ended("s1", how)
    state.turn_cut_off("s1", "model")
    state.turn_completed("s1", {"eou": 0.3, "e2e": 0.45})

    text = visible_text(await page_text(client))
    assert re.search(r"Turns ended by:\s*model 2 · max delay 1 · vad 1\.", text), text
    assert "Cut off: 1 answer the caller talked into within 1 s." in text
    document = await (await client.get("/api/status")).json()
    assert document["turn_endings"] == {"model": 2, "max_delay": 1, "vad": 1}
    assert document["turn_cutoffs"] == {"model": 1}


async def test_finished_sessions_show_the_answers_as_the_record_keeps_them(client, state):
    """With transcripts allowed the summary keeps normalised answers and the page shows them; without, the page
    shows only whether each answer was understood."""
    for room, kept in (("kept", True), ("private", False)):
        state.session_finished(SessionSummary(
            session_id=room, room=room, outcome="completed", started_at=100.0, ended_at=160.0, phases_reached=(),
            final_phase="goodbye", turns=4, latency_s={}, guardrail=GuardSummary(checks={}, hits={}, discarded_chars=0),
            answers={"location": StepAnswer(True, "Hals, Kehlkopf" if kept else None, kept),
                     "size": StepAnswer(False, None, kept)}))
    html = await page_text(client)
    rows = {room: visible_text(html[html.index(f">{room}<"):].split("</tr>")[0]) for room in ("kept", "private")}
    assert "location: Hals, Kehlkopf" in rows["kept"] and "size: not understood" in rows["kept"]
    assert "location: understood" in rows["private"] and "size: not understood" in rows["private"]
    assert "Kehlkopf" not in rows["private"]


async def test_finished_session_with_nothing_measured_still_renders(client, state):
    """A session that ended before any turn (no room name, no phase, no latency) shows dashes, not an error."""
    state.session_finished(SessionSummary(
        session_id="s9", room="", outcome="error", started_at=100.0, ended_at=101.0, phases_reached=(),
        final_phase="", turns=0, latency_s={}, guardrail=GuardSummary(checks={}, hits={}, discarded_chars=0),
    ))
    html = await page_text(client)
    finished = visible_text(html[html.index('id="finished"'):])
    assert "Latest finished sessions" in visible_text(html) and "session s9" in finished and "error" in finished
    assert "—" in finished and "None" not in visible_text(html)


# -- latency --------------------------------------------------------------------------------------------------
def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    buckets = Buckets({0.1: 10, 0.5: 20, 1.0: 20, float("inf"): 20})
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.1 + 0.4 * 9 / 10)


def test_quantile_in_the_overflow_bucket_is_the_highest_finite_bound():
    assert histogram_quantile(0.5, Buckets({0.1: 0, 1.0: 0, float("inf"): 5})) == 1.0


def test_empty_histogram_has_no_quantile():
    assert summarise(Buckets({0.1: 0, float("inf"): 0})).p50_s is None


def test_single_observation_is_reported_exactly():
    """One model_load of 2.1 s is 2.1 s, not the middle of the 1–2.5 s bucket."""
    s = summarise(Buckets({1.0: 0, 2.5: 1, float("inf"): 1}, sum=2.1))
    assert (s.count, s.p50_s, s.p95_s) == (1, 2.1, 2.1)


async def test_api_status_carries_percentiles_from_the_histograms(client, histograms):
    for seconds in (0.3, 0.3, 0.3, 0.7):
        histograms.turns.labels(component="e2e").observe(seconds)
    histograms.stages.labels(stage="model_load", status="ok").observe(2.1)
    histograms.stages.labels(stage="input_guard", status="error").observe(0.002)
    body = await (await client.get("/api/status")).json()
    turn = {row["component"]: row for row in body["latency"]["turn"]}
    assert list(turn) == ["eou", "stt", "llm_ttft", "tts_ttfb", "e2e"]
    assert turn["e2e"]["count"] == 4 and turn["e2e"]["p50_s"] == pytest.approx(0.2 + 0.1 * 2 / 3, abs=1e-4)
    assert turn["eou"] == {"component": "eou", "count": 0, "mean_s": None, "p50_s": None, "p95_s": None}
    stages = {row["stage"]: row for row in body["latency"]["stages"]}
    assert stages["model_load"]["p95_s"] == pytest.approx(2.1)
    assert body["latency"]["goal_s"] == 0.8
    text = visible_text(await page_text(client))
    assert "input_guard" in text and "(1 failed)" in text


def test_formats_read_naturally():
    assert [format_latency(v) for v in (None, 0.0004, 0.42, 1.234, 26.04)] == ["—", "<1 ms", "420 ms", "1.23 s",
                                                                                "26.0 s"]
    assert [format_duration(v) for v in (5, 252, 7380, 270000)] == ["5 s", "4 min 12 s", "2 h 03 min", "3 d 3 h"]


# -- static files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "content_types"), [
    ("/static/status.js", {"text/javascript", "application/javascript"}),
    ("/static/status.css", {"text/css"}),
    ("/static/favicon.svg", {"image/svg+xml"}),
])
async def test_static_files_have_their_content_types(client, path, content_types):
    """With nosniff, a browser runs the script and applies the stylesheet only under these types."""
    resp = await client.get(path)
    assert resp.status == 200
    assert resp.headers["Content-Type"].split(";")[0] in content_types
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/static/", "/static/../index.html", "/static/%2e%2e/index.html",
                                  "/static/partials/status.html"])
async def test_static_serves_nothing_but_its_own_files(client, path):
    resp = await client.get(path)
    assert resp.status in (403, 404)


# -- /events -------------------------------------------------------------------------------------------------
async def test_events_sends_the_state_at_once_and_then_each_change(client, state):
    """1. A browser opens /events while knotd connects. 2. The worker registers.

    Result: the first status event says connecting, a later one says ready with the worker id.
    """
    state.set_lifecycle(Lifecycle.CONNECTING, "connecting to wss://livekit.example")
    resp = await client.get("/events")
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    first = await next_status(resp)
    assert (first["ready"], first["state"]) == (False, "connecting")

    state.worker_registered("AW_live")
    state.set_lifecycle(Lifecycle.READY, "ready")
    update = await next_status(resp)
    while not update["ready"]:  # the registration and the lifecycle change may arrive apart
        update = await next_status(resp)
    assert update["livekit"]["worker_id"] == "AW_live"
    resp.close()


async def test_events_page_update_carries_every_section_with_a_hash(client, state):
    resp = await client.get("/events")
    while (event := await read_sse(resp))[0] != "page":
        pass
    update = json.loads(event[1])
    assert set(update["sections"]) == {"status", "about", "sessions", "turns", "guardrails", "failures",
                                       "finished", "stages"}
    html = await page_text(client)
    for name, section in update["sections"].items():
        assert f'id="{name}"' in html and re.fullmatch(r"[0-9a-f]{12}", section["hash"])
    assert update["title"].startswith("knotd:")
    resp.close()


async def test_events_sends_a_heartbeat_when_nothing_changes(client, state):
    client.server.app[STREAMS_KEY].heartbeat_s = 0.2
    resp = await client.get("/events")
    while (event := await read_sse(resp))[0] != "comment":
        pass
    assert event == ("comment", "heartbeat")
    resp.close()


async def test_events_pushes_new_histogram_numbers_by_the_next_heartbeat(client, histograms):
    """A stage or turn timing does not change the daemon state, yet the page's percentiles follow it."""
    client.server.app[STREAMS_KEY].heartbeat_s = 0.2
    resp = await client.get("/events")
    first = await next_status(resp)
    assert [row["count"] for row in first["latency"]["turn"] if row["component"] == "e2e"] == [0]
    histograms.turns.labels(component="e2e").observe(0.5)
    update = await next_status(resp)
    assert [row["count"] for row in update["latency"]["turn"] if row["component"] == "e2e"] == [1]
    resp.close()


async def test_events_refuses_streams_beyond_the_cap(client):
    client.server.app[STREAMS_KEY].max_streams = 1
    first = await client.get("/events")
    await read_sse(first)
    second = await client.get("/events")
    assert second.status == 503
    assert "too many" in (await second.json())["error"]
    first.close()


async def test_shutdown_with_an_open_stream_does_not_hang(state):
    """1. A browser keeps /events open. 2. The daemon cleans up its status server (the last step of a drain).

    Result: cleanup finishes promptly (aiohttp would otherwise wait its 60 s shutdown timeout for the
    stream), and the browser sees the stream end.
    """
    runner = web.AppRunner(create_app(state, histograms=private_histograms()))
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"http://127.0.0.1:{sock.getsockname()[1]}/events")
        await next_status(resp)
        await asyncio.wait_for(runner.cleanup(), timeout=10)
        with pytest.raises((EOFError, aiohttp.ClientPayloadError)):
            while True:
                await read_sse(resp)


async def wait_healthz(client, predicate, timeout: float = 10.0) -> tuple[int, dict]:
    """Poll /healthz until ``predicate(status, body)`` holds."""
    async with asyncio.timeout(timeout):
        while True:
            resp = await client.get("/healthz")
            status, body = resp.status, await resp.json()
            if predicate(status, body):
                return status, body
            await asyncio.sleep(0.02)


async def test_healthz_is_503_after_the_event_loop_stalled_and_200_again_once_it_runs(aiohttp_client, state):
    """1. The loop runs. 2. Something blocks it for a second (a stuck handler). 3. It runs again.

    Result: /healthz 200, then 503 with the lag it measured, then 200 again once the stall has decayed."""
    monitor = LoopMonitor(interval_s=0.05, unhealthy_lag_s=0.5)
    monitor.start()
    try:
        client = await aiohttp_client(create_app(state, monitor, histograms=private_histograms()))
        await wait_healthz(client, lambda status, _: status == 200)
        time.sleep(1.0)  # the stall under test: the whole loop blocked, as a stuck handler would block it
        resp = await client.get("/healthz")
        assert (resp.status, (await resp.json())["healthy"]) == (503, False)
        status, body = await wait_healthz(client, lambda _, b: b["loop_lag_s"] >= 0.5)  # the stall, measured
        assert (status, body["healthy"]) == (503, False)
        status, body = await wait_healthz(client, lambda _, b: b["loop_lag_s"] < 0.5)  # decayed
        assert (status, body["healthy"]) == (200, True)
    finally:
        await monitor.stop()


async def test_readyz_is_503_while_draining(client, state):
    state.set_lifecycle(*derive(Facts(livekit_url="wss://livekit.example", models_loaded=True, worker_id="AW_1",
                                      is_registered=True, registrations=1)))
    assert (await client.get("/readyz")).status == 200
    state.set_lifecycle(*derive(Facts(livekit_url="wss://livekit.example", models_loaded=True, worker_id="AW_1",
                                      is_registered=True, registrations=1, draining=True)))
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await resp.json() == {"ready": False, "state": "draining", "reason": "draining"}
