"""`knotd run` as a real subprocess against the LiveKit stand-in, with a real NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from livekit.protocol import agent

from knotd.journal import read_records
from tests.conftest import API_KEY, API_SECRET, closed_port

pytestmark = pytest.mark.models


async def test_ready_only_after_registration(standin, start_daemon, notify_socket):
    """1. The stand-in holds the registration answer back. 2. It registers.

    Result: STATUS lines come first, /readyz is 503 with a reason until registration, then READY=1
    (sent by the main process itself) and /readyz 200.
    """
    standin.set_delay(4.0)
    daemon = await start_daemon(standin.url)
    body = await daemon.wait_http("/healthz", 200, timeout=60)
    code, body = await daemon.get("/readyz")
    assert code == 503
    assert json.loads(body)["state"] in ("loading_models", "connecting")
    assert "READY" not in notify_socket.keys()

    ready = await notify_socket.wait_for("READY", timeout=30)
    assert ready.pid == daemon.pid
    assert len(standin.registrations) == 1
    await daemon.wait_http("/readyz", 200, timeout=5)
    keys = notify_socket.keys()
    assert keys.index("READY") > 0 and set(keys[: keys.index("READY")]) == {"STATUS"}
    statuses = notify_socket.statuses()
    assert "loading models" in statuses
    assert any(s.startswith("connecting to ws://127.0.0.1") for s in statuses)
    assert ready.fields["STATUS"] == f"ready: worker {standin.registrations[0].worker_id}, 0 sessions"

    status = json.loads((await daemon.get("/api/status"))[1])
    assert status["ready"] is True
    assert status["livekit"]["worker_id"] == standin.registrations[0].worker_id
    assert {s["name"] for s in status["stages"]} >= {"config", "model_load", "guard_load", "status_listen",
                                                    "worker_start"}


async def test_connection_drop_turns_readyz_503_until_reregistered(standin, start_daemon, notify_socket):
    daemon = await start_daemon(standin.url)
    await notify_socket.wait_for("READY", timeout=120)
    await daemon.wait_http("/readyz", 200)

    standin.refuse_next(1)  # the first reconnect fails, so the worker stays away for its 2 s backoff
    await standin.drop_all()
    body = json.loads(await daemon.wait_http("/readyz", 503, timeout=5))
    assert body["state"] == "reconnecting"
    assert "connection lost" in body["reason"]

    await standin.wait_registered(2, timeout=20)
    await daemon.wait_http("/readyz", 200, timeout=5)
    code, metrics = await daemon.get("/metrics")
    assert "knotd_worker_registrations_total 2.0" in metrics
    assert "knotd_ready 1.0" in metrics


async def test_sigterm_drains_and_exits_zero(standin, start_daemon, notify_socket):
    daemon = await start_daemon(standin.url)
    await notify_socket.wait_for("READY", timeout=120)
    daemon.signal(signal.SIGTERM)
    stopping = await notify_socket.wait_for("STOPPING", timeout=5)
    assert stopping.pid == daemon.pid
    assert await daemon.wait_exit(timeout=15) == 0
    assert "drain" in daemon.log_text()


async def test_draining_turns_readyz_503_and_a_second_sigterm_exits_130(standin, start_daemon, notify_socket):
    """1. A job holds the drain open (its room never answers). 2. SIGTERM, then SIGTERM again.

    Result: the first starts the drain (STOPPING=1, then EXTEND_TIMEOUT_USEC= while it lasts) and /readyz
    answers 503 "draining" while the session holds it open; the second ends the process at once with exit
    code 130 (the forced stop of the CLI's exit codes).
    """
    daemon = await start_daemon(standin.url, worker="drain_timeout_s = 60")
    await notify_socket.wait_for("READY", timeout=120)
    async with _black_hole() as url:
        job = await standin.dispatch_job("drain-room", url=url)
        assert job.accepted
        await _wait_sessions(daemon, 1)
        daemon.signal(signal.SIGTERM)
        await notify_socket.wait_for("STOPPING", timeout=5)
        # While it drains, knotd asks systemd for more time itself (TimeoutStopSec need not track the drain).
        extend = await notify_socket.wait_for("EXTEND_TIMEOUT_USEC", timeout=5)
        assert extend.pid == daemon.pid and int(extend.fields["EXTEND_TIMEOUT_USEC"]) >= 10_000_000
        body = json.loads(await daemon.wait_http("/readyz", 503, timeout=5))
        assert (body["ready"], body["state"]) == (False, "draining")
        assert len(json.loads((await daemon.get("/api/status"))[1])["sessions"]) == 1  # it holds the drain
        assert daemon.proc.returncode is None, "a running session must hold the drain open"
        daemon.signal(signal.SIGTERM)
        code = await daemon.wait_exit(timeout=10)
    assert code == 130
    assert '"event": "forced_exit"' in daemon.log_text()


async def test_unreachable_livekit_is_not_ready_and_does_not_crash(start_daemon, notify_socket):
    with closed_port() as port:
        daemon = await start_daemon(f"ws://127.0.0.1:{port}")
        await daemon.wait_http("/healthz", 200, timeout=60)
        body = json.loads(await daemon.wait_json("/readyz", lambda b: "retrying" in b["reason"], timeout=10))
        assert body["state"] == "connecting" and "not reachable" in body["reason"]
        assert any("not reachable" in s for s in notify_socket.statuses())
        assert daemon.proc.returncode is None
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(timeout=15) == 0


async def test_worker_giving_up_exits_nonzero(start_daemon, notify_socket):
    with closed_port() as port:
        daemon = await start_daemon(f"ws://127.0.0.1:{port}", worker="drain_timeout_s = 5\nmax_retry = 1")
        code = await daemon.wait_exit(timeout=90)
    assert code == 1
    assert "failed to connect to livekit after 1 attempts" in notify_socket.statuses()[-1]


async def test_secret_never_leaves_the_process(standin, start_daemon, notify_socket):
    daemon = await start_daemon(standin.url)
    await notify_socket.wait_for("READY", timeout=120)
    pages = [(await daemon.get(path))[1] for path in ("/", "/api/status", "/metrics", "/readyz", "/healthz")]
    daemon.signal(signal.SIGTERM)
    await daemon.wait_exit(timeout=15)
    for text in [*pages, daemon.log_text(), "\n".join(notify_socket.statuses())]:
        assert API_SECRET not in text
    assert "knotd_build_info" in pages[2] and "lk_agents_worker_load" in pages[2]


async def test_credentials_in_a_logged_livekit_error_are_redacted(standin, start_daemon, notify_socket):
    """1. The first connection is answered with an error text that repeats the API key and the worker's
    Authorization header (a misconfigured proxy). 2. livekit logs the failure with that text and retries.

    Result: the journal has the failure line with the text around the credentials, but neither the API key
    (a configured secret) nor the join token (a JWT signed with the API secret): both are "[redacted]".
    """
    standin.echo_credentials_next(1)
    daemon = await start_daemon(standin.url)
    await notify_socket.wait_for("READY", timeout=120)
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(timeout=30) == 0
    assert len(standin.echoed) == 1 and API_KEY in standin.echoed[0]
    token = standin.echoed[0].split("Bearer ")[1].rstrip(")")
    lines = [json.loads(line) for line in daemon.log_text().splitlines() if line.startswith("{")]
    failures = [line for line in lines if line["event"].startswith("failed to connect to livekit")]
    assert len(failures) == 1, [line["event"] for line in lines]
    error = failures[0]["error"]
    assert "401 Unauthorized: api key [redacted] rejected (Authorization: Bearer [redacted])" in error
    log = daemon.log_text()
    assert API_KEY not in log and token not in log and token[:20] not in log and API_SECRET not in log


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) missing")
async def test_metrics_pass_promtool(standin, start_daemon, notify_socket):
    daemon = await start_daemon(standin.url)
    await notify_socket.wait_for("READY", timeout=120)
    _, text = await daemon.get("/metrics")
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    # promtool exits 1 for lint warnings too; only real errors matter (no lint output expected from knotd_*)
    knotd_problems = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "knotd_" in line]
    assert knotd_problems == []
    assert "error" not in proc.stderr.lower(), proc.stderr


async def _wait_sessions(daemon, n: int, timeout: float = 20.0) -> None:
    await daemon.wait_json("/api/status", lambda status: len(status["sessions"]) >= n, timeout=timeout)


class _black_hole:
    """A TCP listener that accepts and never answers: a room server that hangs."""

    async def __aenter__(self) -> str:
        import asyncio

        async def hold(reader, writer):
            await reader.read()

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()


async def test_watchdog_pings_come_from_the_main_process(standin, start_daemon, notify_socket):
    daemon = await start_daemon(standin.url, env={"WATCHDOG_USEC": "1000000"})
    await notify_socket.wait_for("READY", timeout=120)
    await notify_socket.wait_for("WATCHDOG", timeout=10, count=3)  # every half WATCHDOG_USEC (test_systemd)
    pings = [m for m in notify_socket.messages if "WATCHDOG" in m.fields]
    assert {m.pid for m in pings} == {daemon.pid}
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(timeout=15) == 0


async def test_a_session_cut_by_the_drain_bound_still_writes_its_summary(standin, start_daemon, notify_socket,
                                                                          tmp_path):
    """1. A session runs (its room never answers). 2. SIGTERM with a 2 s drain bound.

    Result: knotd exits 0 within the bound plus a few seconds (it once took the bound + 15 s: livekit waited
    for the job's entrypoint; the session's own start timeout is 20 s), and the session's record is in
    sessions.jsonl with outcome "drained".
    """
    daemon = await start_daemon(standin.url, worker="drain_timeout_s = 2")
    await notify_socket.wait_for("READY", timeout=120)
    async with _black_hole() as url:
        job = await standin.dispatch_job("drained-room", url=url)
        assert job.accepted
        await _wait_sessions(daemon, 1)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(timeout=2 + 8) == 0  # TimeoutError: the stop outlasted the bound by 8 s
    records = read_records(tmp_path / "state")
    assert [(r["session_id"], r["room"], r["outcome"]) for r in records] == [(job.job_id, "drained-room", "drained")]


async def test_a_session_whose_room_never_answers_ends_and_frees_its_slot(standin, start_daemon, notify_socket,
                                                                          tmp_path):
    """1. A job is dispatched to a room server that accepts the connection and never answers.

    Result: after session.start_timeout_s the session ends with outcome "error" in sessions.jsonl, the
    daemon has no session left and reports load 0 to LiveKit again.
    """
    daemon = await start_daemon(standin.url, session="start_timeout_s = 2")
    await notify_socket.wait_for("READY", timeout=120)
    async with _black_hole() as url:
        job = await standin.dispatch_job("silent-room", url=url)
        assert job.accepted
        await _wait_sessions(daemon, 1)
        deadline = time.monotonic() + 30
        while not read_records(tmp_path / "state") and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    records = read_records(tmp_path / "state")
    assert [(r["room"], r["outcome"]) for r in records] == [("silent-room", "error")]
    status = json.loads((await daemon.get("/api/status"))[1])
    assert status["sessions"] == []
    _, metrics = await daemon.get("/metrics")
    assert 'knotd_stage_duration_seconds_count{stage="session_start",status="error"} 1.0' in metrics


async def test_a_session_killed_with_its_daemon_is_recorded_as_crashed_at_the_next_start(
        standin, start_daemon, notify_socket, tmp_path, model_dir):
    """1. A session runs (its room never answers). 2. kill -9 of knotd. 3. knotd starts again (systemd's
    Restart=on-failure does this in the package; here the test does).

    Result: sessions.jsonl gets the killed session's record with outcome "crashed" at the second start.
    """
    daemon = await start_daemon(standin.url, session="start_timeout_s = 120")
    await notify_socket.wait_for("READY", timeout=120)
    async with _black_hole() as url:
        job = await standin.dispatch_job("killed-room", url=url)
        assert job.accepted
        await _wait_sessions(daemon, 1)
        daemon.signal(signal.SIGKILL)
        assert await daemon.wait_exit(timeout=30) == -signal.SIGKILL
    state = tmp_path / "state"
    assert read_records(state) == []

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET}
    with open(tmp_path / "restarted.log", "wb") as log_file:
        again = subprocess.Popen([sys.executable, "-m", "knotd", "run", "--config", str(daemon.config_path)],
                                 stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while not read_records(state) and again.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        records = read_records(state)
        assert [(r["session_id"], r["room"], r["outcome"]) for r in records] == [
            (job.job_id, "killed-room", "crashed")], (tmp_path / "restarted.log").read_text()[-3000:]
        assert not list((state / "open").glob("*.json"))
    finally:
        again.send_signal(signal.SIGTERM)
        try:
            again.wait(timeout=60)
        except subprocess.TimeoutExpired:
            again.kill()


async def test_a_corrupt_model_file_fails_the_start_with_exit_3(tmp_path, model_dir):
    """The Whisper model directory replaced by a corrupt file between two starts: `knotd run` stops with one
    line naming the model and exit 3 (the unit's RestartPreventExitStatus=, so no restart loop)."""
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "model.bin").write_bytes(os.urandom(4096))
    config = tmp_path / "knotd.toml"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET}
    with closed_port() as livekit_port:
        config.write_text(f'[livekit]\nurl = "ws://127.0.0.1:{livekit_port}"\n[stt]\nmodel = "{broken}"\n'
                          f'[session]\nstate_dir = "{tmp_path / "state"}"\n[status]\nlisten = "127.0.0.1:0"\n'
                          '[log]\nformat = "json"\n')
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "knotd", "run", "--config", str(config), env=env, cwd=str(tmp_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 180)
    lines = err.decode().splitlines()
    assert proc.returncode == 3, lines[-5:]
    assert lines[-1].startswith("knotd: cannot load the whisper model from ") and str(broken) in lines[-1]
    assert "Traceback" not in err.decode()


async def test_livekit_knows_the_worker_has_room_when_ready_is_sent(standin, start_daemon, notify_socket):
    """LiveKit offers a room only to a worker it believes has room, and does not queue it: the worker's
    "available" status reaches LiveKit together with READY=1, not at livekit's next periodic update (2.5 s
    after the connection, which is about when knotd becomes ready: without the push it came ≈ 2.4 s late).
    """
    daemon = await start_daemon(standin.url)
    ready = await notify_socket.wait_for("READY", timeout=120)
    ready_wall = time.time() - (time.monotonic() - ready.at)

    def available():
        return [r for r in standin.messages if r.kind == "update_worker"
                and r.message.update_worker.status == agent.WorkerStatus.WS_AVAILABLE]

    await standin.wait_for(lambda: available(), timeout=10, what="an available status")
    assert available()[0].at - ready_wall < 1.0
    assert available()[0].message.update_worker.load == 0.0
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(timeout=30) == 0
