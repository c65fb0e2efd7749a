"""The LiveKit protocol stand-in, exercised with the real livekit-agents worker (THREAD executor)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from livekit import api
from livekit.agents import AgentServer, JobContext, JobExecutorType, JobRequest
from livekit.protocol import agent

from tests.livekit_standin import LiveKitStandIn, Received

pytestmark = pytest.mark.timeout(60)

API_KEY = "APIstandintest"
API_SECRET = "standin-test-secret-that-is-long-enough-for-hs256"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # AgentServer.run() writes LIVEKIT_* into os.environ; recording them here makes monkeypatch restore them
    for name in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.setenv(name, "unset-by-test")
    # the job thread imports livekit's preload module; skip its VAD/end-of-turn model loading
    monkeypatch.setenv("LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE", "0")


@pytest.fixture
async def standin() -> AsyncIterator[LiveKitStandIn]:
    server = LiveKitStandIn(API_KEY, API_SECRET)
    await server.start()
    yield server
    await server.stop()


class Entrypoints:
    """Job entrypoints for the worker; they run in the job thread, so records go through a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ran: list[tuple[str, str, str]] = []

    async def run_then_shutdown(self, ctx: JobContext) -> None:
        with self.lock:
            self.ran.append((ctx.job.id, ctx.job.room.name, ctx.job.metadata))
        ctx.shutdown("done")  # the fake job's room has no server behind it: never ctx.connect()

    async def run_until_terminated(self, ctx: JobContext) -> None:
        # returning without ctx.shutdown() keeps the job alive until the server terminates it
        with self.lock:
            self.ran.append((ctx.job.id, ctx.job.room.name, ctx.job.metadata))


@contextlib.asynccontextmanager
async def running_worker(
    url: str,
    entrypoint: Callable[[JobContext], Any],
    *,
    secret: str = API_SECRET,
    max_retry: int = 3,
    on_request: Callable[[JobRequest], Any] | None = None,
) -> AsyncIterator[tuple[AgentServer, asyncio.Task[None], asyncio.Queue[str]]]:
    """Run a real AgentServer against `url`; yields it, its run() task and its worker_registered ids."""
    server = AgentServer(
        ws_url=url,
        api_key=API_KEY,
        api_secret=secret,
        job_executor_type=JobExecutorType.THREAD,
        port=0,
        host="127.0.0.1",
        num_idle_processes=1,
        load_fnc=lambda *_: 0.0,
        max_retry=max_retry,
    )
    server.rtc_session(entrypoint, agent_name="standin-test", on_request=on_request)
    registered: asyncio.Queue[str] = asyncio.Queue()
    server.on("worker_registered", lambda worker_id, _info: registered.put_nowait(worker_id))
    run = asyncio.create_task(server.run())
    try:
        yield server, run, registered
    finally:
        with contextlib.suppress(Exception):
            await server.drain(5)
        await server.aclose()
        with contextlib.suppress(Exception):
            await run


async def test_worker_registers_and_reports_status(standin: LiveKitStandIn) -> None:
    """The worker gets the stand-in's worker id, reports its agent name and sends status updates."""
    async with running_worker(standin.url, Entrypoints().run_then_shutdown) as (_, _, registered):
        registration = await standin.wait_registered()
        assert await asyncio.wait_for(registered.get(), 10) == registration.worker_id
        assert registration.agent_name == "standin-test"
        await standin.wait_for(lambda: standin.latest_status is not None)
        assert standin.latest_status.status == agent.WorkerStatus.WS_AVAILABLE
        assert standin.messages[0].kind == "register"
        assert standin.connected_workers == [registration.worker_id]


@pytest.mark.parametrize("close_code", [aiohttp.WSCloseCode.GOING_AWAY, None], ids=["close", "abort"])
async def test_dropped_worker_reregisters_with_new_id(
    standin: LiveKitStandIn, close_code: int | None
) -> None:
    """After a drop (close frame or cut TCP) the worker reconnects and registers again."""
    async with running_worker(standin.url, Entrypoints().run_then_shutdown) as (_, _, registered):
        first = await standin.wait_registered()
        assert await standin.drop_all(close_code) == 1
        second = await standin.wait_registered(2)
        assert second.worker_id != first.worker_id
        assert await asyncio.wait_for(registered.get(), 10) == first.worker_id
        assert await asyncio.wait_for(registered.get(), 10) == second.worker_id
        await standin.wait_for(lambda: standin.connected_workers == [second.worker_id])


async def test_refused_connection_is_retried(standin: LiveKitStandIn) -> None:
    """A connection refused with HTTP 503 is recorded, and the worker's retry registers."""
    standin.refuse_next(1, status=503)
    async with running_worker(standin.url, Entrypoints().run_then_shutdown):
        await standin.wait_registered()
        assert [r.status for r in standin.rejections] == [503]


async def test_wrong_secret_is_rejected_until_worker_gives_up(standin: LiveKitStandIn) -> None:
    """A worker with the wrong secret gets 401 on every attempt and run() fails after max_retry."""
    wrong = "not-the-secret-but-long-enough-for-hs256-signing"
    async with running_worker(standin.url, Entrypoints().run_then_shutdown, secret=wrong, max_retry=1) as (
        _,
        run,
        _,
    ):
        with pytest.raises(RuntimeError, match="failed to connect"):
            await asyncio.wait_for(run, 20)
    assert [r.status for r in standin.rejections] == [401, 401]
    assert standin.registrations == []


def _token(key: str = API_KEY, secret: str = API_SECRET, agent_grant: bool = True) -> str:
    return api.AccessToken(key, secret).with_grants(api.VideoGrants(agent=agent_grant)).to_jwt()


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing bearer token"),
        ("Bearer not-a-jwt", "invalid token: DecodeError"),
        (f"Bearer {_token(secret='x' * 40)}", "invalid token: InvalidSignatureError"),
        (f"Bearer {_token(key='other-key')}", "token issuer is not the API key"),
        (f"Bearer {_token(agent_grant=False)}", "token lacks the video.agent grant"),
    ],
)
async def test_bad_tokens_get_401(standin: LiveKitStandIn, authorization: str | None, reason: str) -> None:
    """Every kind of unacceptable worker token is answered with 401 and recorded with its reason."""
    headers = {"Authorization": authorization} if authorization else {}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{standin.url}/agent", headers=headers)
    assert refused.value.status == 401
    assert [(r.status, r.reason) for r in standin.rejections] == [(401, reason)]


async def test_delayed_registration_response(standin: LiveKitStandIn) -> None:
    """With a delay set, the register request is in but the response is held back."""
    standin.set_delay(1.5)
    async with running_worker(standin.url, Entrypoints().run_then_shutdown):
        await standin.wait_for(lambda: any(m.kind == "register" for m in standin.messages))
        assert standin.registrations == []
        await standin.wait_registered()


async def test_dispatched_job_runs_entrypoint(standin: LiveKitStandIn) -> None:
    """A dispatched job is accepted, its entrypoint runs, and JS_RUNNING then JS_SUCCESS arrive."""
    entrypoints = Entrypoints()
    async with running_worker(standin.url, entrypoints.run_then_shutdown):
        await standin.wait_registered()
        job = await standin.dispatch_job("room-a", metadata='{"lang": "de"}')
        assert job.accepted
        assert job.participant_identity == f"agent-{job.job_id}"
        await standin.wait_job_status(job.job_id, agent.JobStatus.JS_SUCCESS)
        assert entrypoints.ran == [(job.job_id, "room-a", '{"lang": "de"}')]
        statuses = [u.status for u in standin.job_updates if u.job_id == job.job_id]
        assert statuses == [agent.JobStatus.JS_RUNNING, agent.JobStatus.JS_SUCCESS]


async def test_rejected_job_is_not_assigned(standin: LiveKitStandIn) -> None:
    """A worker that rejects the job request answers unavailable and never starts the job."""
    entrypoints = Entrypoints()
    async with running_worker(standin.url, entrypoints.run_then_shutdown, on_request=JobRequest.reject):
        await standin.wait_registered()
        job = await standin.dispatch_job()
        assert not job.accepted
        assert standin.job_updates == []
        assert entrypoints.ran == []


async def test_running_job_migrates_and_terminates(standin: LiveKitStandIn) -> None:
    """A job survives a reconnect (migrate_job names it) and ends when the stand-in terminates it."""
    async with running_worker(standin.url, Entrypoints().run_until_terminated):
        await standin.wait_registered()
        job = await standin.dispatch_job()
        await standin.wait_job_status(job.job_id, agent.JobStatus.JS_RUNNING)
        await standin.drop_all()
        second = await standin.wait_registered(2)
        await standin.wait_for(lambda: any(m.kind == "migrate_job" for m in standin.messages))
        migrated = [m for m in standin.messages if m.kind == "migrate_job"]
        assert [(m.worker_id, list(m.message.migrate_job.job_ids)) for m in migrated] == [
            (second.worker_id, [job.job_id])
        ]
        await standin.wait_for(lambda: any(_status_from(m, second.worker_id) for m in standin.messages))
        assert standin.latest_status.job_count == 1
        await standin.terminate_job(job.job_id)
        await standin.wait_job_status(job.job_id, agent.JobStatus.JS_SUCCESS)


def _status_from(received: Received, worker_id: str) -> bool:
    return received.kind == "update_worker" and received.worker_id == worker_id


async def test_control_api_drives_the_stand_in(standin: LiveKitStandIn) -> None:
    """The HTTP control API dispatches, drops and reports state; bad input is a 400, not a crash."""
    entrypoints = Entrypoints()
    control = standin.url.replace("ws://", "http://") + "/_standin"
    async with running_worker(standin.url, entrypoints.run_then_shutdown), aiohttp.ClientSession() as http:
        first = await standin.wait_registered()
        async with http.post(f"{control}/dispatch", params={"room": "r9"}) as resp:
            job = await resp.json()
        assert resp.status == 200 and job["accepted"] and job["room_name"] == "r9"
        await standin.wait_job_status(job["job_id"], agent.JobStatus.JS_SUCCESS)
        async with http.post(f"{control}/drop") as resp:
            assert await resp.json() == {"dropped": 1}
        await standin.wait_registered(2)
        async with http.get(f"{control}/state") as resp:
            state = await resp.json()
        assert state["registrations"][0]["worker_id"] == first.worker_id
        assert {"job_id": job["job_id"], "status": "JS_SUCCESS"} in state["job_updates"]
        assert API_SECRET not in json.dumps(state)
        async with http.post(f"{control}/refuse", params={"n": "many"}) as resp:
            assert resp.status == 400
        async with http.post(f"{control}/terminate", params={"job_id": "AJ_unknown"}) as resp:
            assert resp.status == 409


async def test_cli_serves_logs_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`python -m tests.livekit_standin` prints READY, logs registration as JSON and exits 0 on SIGTERM."""
    log_file = tmp_path / "standin.jsonl"
    env = {**os.environ, "LIVEKIT_API_SECRET": API_SECRET}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.livekit_standin",
        "--port",
        "0",
        "--api-key",
        API_KEY,
        "--log-file",
        str(log_file),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("READY ws://127.0.0.1:")
        url = line.split()[1]
        async with running_worker(url, Entrypoints().run_then_shutdown) as (_, _, registered):
            worker_id = await asyncio.wait_for(registered.get(), 10)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {"type": "register", "worker_id": worker_id, "agent_name": "standin-test"}.items() <= events[
        0
    ].items()
    assert any(e["type"] == "standin.registered" and e["worker_id"] == worker_id for e in events)
