"""The sync→async bridge: failures counted and logged, no lost tasks, bounded drain, any thread."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
from livekit import rtc
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from knotd.bridge import DrainResult, Signal, TaskBridge


def count(handler: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value("knotd_handler_tasks_total", {"handler": handler, "outcome": outcome})
    return value or 0.0


def inflight(handler: str) -> float:
    return REGISTRY.get_sample_value("knotd_handler_tasks_inflight", {"handler": handler}) or 0.0


async def test_livekit_emitter_accepts_bridged_async_handler_and_runs_it():
    emitter = rtc.EventEmitter()
    bridge = TaskBridge("s1")
    seen = asyncio.Event()

    async def on_thing(value):
        await asyncio.sleep(0)
        seen.set()

    with pytest.raises(ValueError):
        emitter.on("thing", on_thing)  # what livekit does with a bare async callback
    before = count("thing_ok", "ok")
    bridge.on(emitter, "thing", on_thing, name="thing_ok")
    emitter.emit("thing", 1)
    await asyncio.wait_for(seen.wait(), 2)
    await bridge.drain(1)
    assert count("thing_ok", "ok") == before + 1


async def test_failure_is_counted_and_logged_with_type_only():
    failures = []
    bridge = TaskBridge("s2", on_failure=failures.append)
    before = count("boom", "failed")

    async def boom():
        raise RuntimeError("token=super-secret-value")

    with capture_logs() as logs:
        bridge.spawn("boom", boom())
        await bridge.drain(1)
    assert count("boom", "failed") == before + 1
    assert bridge.failures == 1
    assert failures[0].handler == "boom" and failures[0].exception == "RuntimeError"
    event = next(e for e in logs if e["event"] == "bridge_task_failed")
    assert event["handler"] == "boom" and event["exception"] == "RuntimeError"
    assert "super-secret-value" not in repr(logs)


async def test_tasks_survive_garbage_collection_mid_flight():
    bridge = TaskBridge("s3")
    release = asyncio.Event()
    finished = []

    async def slow(i):
        await release.wait()
        finished.append(i)

    for i in range(20):
        bridge.spawn("slow", slow(i))
    await asyncio.sleep(0)
    gc.collect()
    assert bridge.inflight == 20
    assert inflight("slow") == 20
    release.set()
    result = await bridge.drain(2)
    assert sorted(finished) == list(range(20))
    assert result.completed == 20 and result.cancelled == 0
    assert inflight("slow") == 0


async def test_drain_cancels_stragglers_and_counts_them():
    bridge = TaskBridge("s4")
    before = count("straggler", "cancelled")

    async def forever():
        await asyncio.sleep(3600)

    bridge.spawn("straggler", forever())
    bridge.spawn("straggler", forever())
    await asyncio.sleep(0)
    result = await bridge.drain(0.05)
    assert result.cancelled == 2
    assert count("straggler", "cancelled") == before + 2
    # after drain, new work is refused and counted, not silently dropped
    bridge.spawn("straggler", forever())
    await asyncio.sleep(0.01)
    assert count("straggler", "cancelled") == before + 3
    assert bridge.inflight == 0


async def test_spawn_from_another_thread_runs_on_the_bridge_loop():
    bridge = TaskBridge("s5")
    loop = asyncio.get_running_loop()
    ran_on = []
    done = asyncio.Event()

    async def record():
        ran_on.append(asyncio.get_running_loop())
        done.set()

    thread = threading.Thread(target=lambda: bridge.spawn("cross", record()))
    thread.start()
    thread.join()
    await asyncio.wait_for(done.wait(), 2)
    assert ran_on == [loop]
    await bridge.drain(1)


def test_bridge_in_a_job_thread_loop_while_main_thread_reads_metrics():
    """A job thread with its own loop uses its bridge; the main thread reads the counters meanwhile."""
    before = count("job_thread", "ok")
    results = {}

    def job_thread():
        async def main():
            bridge = TaskBridge("job")

            async def work():
                await asyncio.sleep(0.01)

            for _ in range(50):
                bridge.spawn("job_thread", work())
            results["drain"] = await bridge.drain(5)

        asyncio.run(main())

    thread = threading.Thread(target=job_thread)
    thread.start()
    while thread.is_alive():
        count("job_thread", "ok")  # concurrent reads must not break anything
        thread.join(0.001)
    assert results["drain"].completed == 50
    assert count("job_thread", "ok") == before + 50


async def test_an_exception_storm_is_counted_whole_logged_rarely_and_the_session_goes_on():
    """500 failures from one handler as fast as the loop runs them (hundreds per second and more)."""
    emitter = rtc.EventEmitter()
    bridge = TaskBridge("storm", on_failure=lambda failure: None)
    before = count("storm", "failed")
    survived = asyncio.Event()

    async def on_storm(n):
        if n == "last":
            survived.set()
            return
        raise ValueError("bad frame")

    bridge.on(emitter, "frame", on_storm, name="storm")
    with capture_logs() as logs:
        for n in range(500):
            emitter.emit("frame", n)
        await asyncio.sleep(0)
        emitter.emit("frame", "last")
        await asyncio.wait_for(survived.wait(), 10)
        await bridge.drain(5)
    assert count("storm", "failed") == before + 500 and bridge.failures == 500
    assert len([e for e in logs if e["event"] == "bridge_task_failed"]) == 1
    assert inflight("storm") == 0 and bridge.inflight == 0


def test_a_signal_set_on_one_thread_wakes_waiters_on_other_loops_and_keeps_no_finished_waiter():
    signal = Signal()
    woke: list[str] = []
    waiting = threading.Barrier(3)

    def job_thread(name: str) -> None:
        async def run() -> None:
            task = asyncio.ensure_future(signal.wait())
            await asyncio.sleep(0)  # registered
            waiting.wait()
            await task
            woke.append(name)
        asyncio.run(run())

    async def gives_up() -> None:  # a session that started before the signal: it stops waiting
        task = asyncio.ensure_future(signal.wait())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(gives_up())
    assert not signal._waiters
    threads = [threading.Thread(target=job_thread, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    waiting.wait()
    signal.set()
    for t in threads:
        t.join(timeout=10)
    assert sorted(woke) == ["a", "b"]
    assert not signal._waiters

    async def late() -> None:  # set before anyone waits: returns at once
        await asyncio.wait_for(signal.wait(), 5)
    asyncio.run(late())


# -- what mutation testing (./dev.sh mutate) showed was not pinned down: the journal lines and series -----


async def test_a_registered_handler_has_its_series_on_metrics_before_its_first_task():
    """/metrics shows knotd_handler_tasks_total{handler,outcome} = 0 from registration on (rate() needs them)."""
    import uuid

    bridge = TaskBridge("series")
    name = f"series_{uuid.uuid4().hex}"  # a handler this process has never seen: no series yet

    async def never(_):
        pass

    bridge.on(rtc.EventEmitter(), "thing", never, name=name)
    for outcome in ("ok", "failed", "cancelled"):
        assert REGISTRY.get_sample_value("knotd_handler_tasks_total", {"handler": name, "outcome": outcome}) == 0.0
    assert REGISTRY.get_sample_value("knotd_handler_tasks_inflight", {"handler": name}) == 0.0


async def test_failures_are_logged_with_the_session_and_a_count_of_the_lines_left_out(monkeypatch):
    """The journal: the first failure of a handler in full; the next ones within the interval left out and
    counted on the next line that is written."""
    from knotd import bridge as bridge_module

    failures = []
    failed = asyncio.Event()

    def on_failure(failure):
        failures.append(failure)
        failed.set()

    bridge = TaskBridge("s-log", on_failure=on_failure)

    async def boom():
        raise ValueError("bad frame")

    async def fail_once():
        failed.clear()
        bridge.spawn("noisy", boom())
        await asyncio.wait_for(failed.wait(), 5)

    with capture_logs() as logs:
        for _ in range(3):
            await fail_once()
        monkeypatch.setattr(bridge_module, "FAILURE_LOG_INTERVAL_S", 0.0)  # the interval has passed
        await fail_once()
        await bridge.drain(1)
    lines = [e for e in logs if e["event"] == "bridge_task_failed"]
    assert len(lines) == 2
    for line in lines:
        assert isinstance(line.pop("duration_ms"), float)
    assert lines[0] == {"event": "bridge_task_failed", "log_level": "error", "session_id": "s-log",
                        "handler": "noisy", "exception": "ValueError"}
    assert lines[1] == dict(lines[0], not_logged_since_last=2)
    assert len(failures) == 4 and bridge.failures == 4
    assert {(f.session_id, f.handler, f.exception) for f in failures} == {("s-log", "noisy", "ValueError")}
    assert all(isinstance(f.at, float) and f.at > 0 for f in failures)


async def test_a_failed_task_logs_how_long_it_ran_in_milliseconds():
    bridge = TaskBridge("s-ms")

    async def boom():
        raise ValueError("x")

    with capture_logs() as logs:
        bridge.spawn("ms", boom())
        await bridge.drain(1)
    (line,) = [e for e in logs if e["event"] == "bridge_task_failed"]
    assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 60_000


async def test_a_broken_failure_observer_is_logged_and_the_session_goes_on():
    def broken(failure):
        raise KeyError("observer")

    bridge = TaskBridge("s-obs", on_failure=broken)

    async def boom():
        raise ValueError("x")

    with capture_logs() as logs:
        bridge.spawn("obs", boom())
        await bridge.drain(1)
    assert {"event": "bridge_failure_observer_failed", "log_level": "warning", "exception": "KeyError"} in logs
    assert bridge.failures == 1


async def test_draining_an_idle_bridge_reports_nothing_done_and_nothing_cancelled():
    assert await TaskBridge("s-idle").drain(1) == DrainResult(0, 0)


async def test_the_drain_names_what_it_cut_and_refuses_later_work_in_the_journal():
    bridge = TaskBridge("s-cut")

    async def forever():
        await asyncio.Event().wait()

    with capture_logs() as logs:
        bridge.spawn("straggler", forever())
        bridge.spawn("other", forever())
        await asyncio.sleep(0)
        assert await bridge.drain(0.01) == DrainResult(0, 2)
        late = forever()
        bridge.spawn("late", late)
    assert {"event": "bridge_drain_cancelled", "log_level": "warning", "session_id": "s-cut", "cancelled": 2,
            "handlers": ["other", "straggler"]} in logs
    assert {"event": "bridge_task_rejected", "log_level": "warning", "session_id": "s-cut", "handler": "late",
            "reason": "closing"} in logs
    assert late.cr_frame is None  # closed, never started


async def test_a_task_that_ignores_its_cancellation_does_not_hold_the_drain():
    bridge = TaskBridge("s-stubborn")
    release = asyncio.Event()

    async def stubborn():
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    bridge.spawn("stubborn", stubborn())
    await asyncio.sleep(0)
    try:
        result = await asyncio.wait_for(bridge.drain(0.01), 30)
        assert result == DrainResult(0, 1)
    finally:
        release.set()


async def test_work_spawned_from_another_thread_counts_under_its_handler():
    bridge = TaskBridge("s-thread")
    before = count("from_thread", "ok")
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def work():
        done.set()

    thread = threading.Thread(target=bridge.spawn, args=("from_thread", work()))
    thread.start()
    thread.join()
    await asyncio.wait_for(done.wait(), 5)
    await bridge.drain(1)
    assert count("from_thread", "ok") == before + 1
    assert loop.is_running()
