"""A LiveKit server stand-in for tests: just the agent-worker protocol, nothing else.

It serves the WebSocket that a livekit-agents worker dials (``<url>/agent``), checks the worker's
HS256 ``Authorization: Bearer`` JWT, and speaks the real ``livekit.protocol.agent`` protobuf
messages: registration, worker status, availability/assignment, job status and termination.
Tests drive it to refuse, delay or drop connections and to dispatch jobs, and read what the worker
sent. Run as ``python -m tests.livekit_standin`` it serves the same thing in its own process,
plus a small HTTP control API (``/_standin/...``) for tests written outside Python.

What it does NOT implement: rooms, media, signalling (``/rtc``), the Twirp server API, dispatch
rules, load balancing between workers, token refresh, ``worker_token`` (hosted agents), pings
(the worker sends none) and TLS. A dispatched job gets a real room token, but nothing answers it,
so a job's entrypoint must not call ``ctx.connect()``. The control API has no authentication:
bind it to loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, Any

import jwt
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError
from livekit import api
from livekit.protocol import agent, models

CONTROL_PREFIX = "/_standin"


@dataclass(frozen=True)
class Received:
    """One `WorkerMessage` as it arrived; `kind` is the name of the set oneof field."""

    at: float
    worker_id: str
    kind: str
    message: agent.WorkerMessage


@dataclass(frozen=True)
class Registration:
    """A worker id issued in a `RegisterWorkerResponse`."""

    at: float
    worker_id: str
    agent_name: str
    version: str


@dataclass(frozen=True)
class Rejection:
    """A connection attempt answered at HTTP level (refused on demand, or a bad token)."""

    at: float
    status: int
    reason: str


@dataclass(frozen=True)
class JobHandle:
    """The outcome of `LiveKitStandIn.dispatch_job`."""

    job_id: str
    worker_id: str
    room_name: str
    accepted: bool
    participant_identity: str


@dataclass
class _Worker:
    worker_id: str
    ws: web.WebSocketResponse
    request: web.Request
    agent_name: str = ""
    registered: bool = False


class LiveKitStandIn:
    """The agent-dispatch side of a LiveKit server, on one aiohttp app (see the module docstring).

    Every public method runs on the event loop that called `start()`.
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_file: IO[str] | None = None,
    ) -> None:
        self._api_key, self._api_secret = api_key, api_secret
        self._host, self._port = host, port
        self._log_file = log_file
        self.url = ""
        self.messages: list[Received] = []
        self.registrations: list[Registration] = []
        self.rejections: list[Rejection] = []
        self._workers: dict[str, _Worker] = {}
        self._job_workers: dict[str, str] = {}
        self._pending: dict[str, tuple[str, asyncio.Future[agent.AvailabilityResponse]]] = {}
        self._ids = itertools.count(1)
        self._job_ids = itertools.count(1)
        self._refuse: list[int] = []
        self._echo = 0
        self.echoed: list[str] = []
        self._delay = 0.0
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen and return the server URL (``ws://host:port``), which the worker extends with /agent."""
        app = web.Application()
        app.router.add_get("/agent", self._agent_ws)
        app.router.add_get(f"{CONTROL_PREFIX}/state", self._control_state)
        app.router.add_post(f"{CONTROL_PREFIX}/{{action}}", self._control_action)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.url = f"ws://{self._host}:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        """Close every worker connection (going-away) and stop listening."""
        await self.drop_all(WSCloseCode.GOING_AWAY)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- views -----------------------------------------------------------------------------------

    @property
    def connected_workers(self) -> list[str]:
        """Ids of the registered workers whose WebSocket is open, oldest first."""
        return [w.worker_id for w in self._workers.values() if w.registered]

    @property
    def latest_status(self) -> agent.UpdateWorkerStatus | None:
        """The last `UpdateWorkerStatus` from any worker, or None before the first one."""
        updates = [r.message.update_worker for r in self.messages if r.kind == "update_worker"]
        return updates[-1] if updates else None

    @property
    def job_updates(self) -> list[agent.UpdateJobStatus]:
        """Every `UpdateJobStatus` received, in arrival order."""
        return [r.message.update_job for r in self.messages if r.kind == "update_job"]

    def state(self) -> dict[str, Any]:
        """A JSON-ready summary (no tokens): what ``GET /_standin/state`` returns."""
        status = self.latest_status
        return {
            "url": self.url,
            "registrations": [asdict(r) for r in self.registrations],
            "rejections": [asdict(r) for r in self.rejections],
            "connected_workers": self.connected_workers,
            "latest_status": None if status is None else _to_dict(status),
            "job_updates": [_to_dict(u) for u in self.job_updates],
            "message_counts": dict(Counter(r.kind for r in self.messages)),
        }

    # -- controls --------------------------------------------------------------------------------

    def refuse_next(self, n: int = 1, status: int = 503) -> None:
        """Answer the next `n` connection attempts with HTTP `status` instead of upgrading."""
        self._refuse.extend([status] * n)

    def echo_credentials_next(self, n: int = 1) -> None:
        """Answer the next `n` registrations with a text frame that repeats the worker's API key and its
        ``Authorization`` header, as a misconfigured proxy's error page might; the worker gives up on that
        connection (it expected a binary register response) and retries. The texts sent are in `echoed`."""
        self._echo += n

    def set_delay(self, seconds: float) -> None:
        """Hold each later registration response back by `seconds`."""
        self._delay = seconds

    async def drop_all(self, code: int | None = WSCloseCode.GOING_AWAY) -> int:
        """Close every worker WebSocket with close `code`, or cut the TCP connection if `code` is None.

        Returns how many connections were dropped; their workers reconnect on their own.
        """
        workers = list(self._workers.values())
        for w in workers:
            self._record_event("standin.dropped", worker_id=w.worker_id, code=code)
            if code is not None:
                await w.ws.close(code=code, message=b"dropped by stand-in")
            elif w.request.transport is not None:
                w.request.transport.abort()
        return len(workers)

    async def dispatch_job(
        self,
        room_name: str = "r1",
        job_id: str | None = None,
        metadata: str = "",
        *,
        worker_id: str | None = None,
        timeout: float = 10.0,
        url: str | None = None,
    ) -> JobHandle:
        """Offer a job to a worker (the newest one by default) and assign it if the worker accepts.

        Sends `AvailabilityRequest`, waits for the `AvailabilityResponse` and, when it says available,
        sends `JobAssignment` with a room-join token signed with the API secret and the room server's
        `url` (default: this stand-in's, where nothing answers the room connection).
        """
        if worker_id is None:
            if not self.connected_workers:
                raise RuntimeError("no worker is connected to the stand-in")
            worker_id = self.connected_workers[-1]
        worker = self._workers.get(worker_id)
        if worker is None:
            raise RuntimeError(f"worker {worker_id} is not connected")
        job_id = job_id or f"AJ_{next(self._job_ids)}"
        job = agent.Job(
            id=job_id,
            type=agent.JobType.JT_ROOM,
            agent_name=worker.agent_name,
            metadata=metadata,
            room=models.Room(sid=f"RM_{job_id}", name=room_name),
        )
        answer: asyncio.Future[agent.AvailabilityResponse] = asyncio.get_running_loop().create_future()
        self._pending[job_id] = (worker_id, answer)
        try:
            await worker.ws.send_bytes(
                agent.ServerMessage(availability=agent.AvailabilityRequest(job=job)).SerializeToString()
            )
            async with asyncio.timeout(timeout):
                response = await answer
        finally:
            self._pending.pop(job_id, None)
        if response.available:
            token = (
                api.AccessToken(self._api_key, self._api_secret)
                .with_identity(response.participant_identity)
                .with_kind("agent")
                .with_grants(api.VideoGrants(room_join=True, room=room_name, agent=True))
                .to_jwt()
            )
            assignment = agent.JobAssignment(job=job, url=url or self.url, token=token)
            await worker.ws.send_bytes(agent.ServerMessage(assignment=assignment).SerializeToString())
            self._job_workers[job_id] = worker_id
        return JobHandle(job_id, worker_id, room_name, response.available, response.participant_identity)

    async def terminate_job(self, job_id: str) -> None:
        """Send `JobTermination` for an assigned job to the worker that holds it."""
        worker = self._workers.get(self._job_workers.get(job_id, ""))
        if worker is None:
            raise RuntimeError(f"job {job_id} is not assigned to a connected worker")
        msg = agent.ServerMessage(termination=agent.JobTermination(job_id=job_id))
        await worker.ws.send_bytes(msg.SerializeToString())

    # -- waiting ---------------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
        """Return once `predicate()` holds; it is re-checked after every recorded change."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"stand-in: {what or 'condition'} not met in {timeout}s; state={json.dumps(self.state())}"
            ) from None

    async def wait_registered(self, count: int = 1, timeout: float = 10.0) -> Registration:
        """Wait until `count` registrations have been issued in total; return the newest."""
        await self.wait_for(lambda: len(self.registrations) >= count, timeout, f"{count} registration(s)")
        return self.registrations[-1]

    async def wait_job_status(self, job_id: str, status: int, timeout: float = 10.0) -> None:
        """Wait for an `UpdateJobStatus` of `job_id` with `status` (an `agent.JobStatus` value)."""
        await self.wait_for(
            lambda: any(u.job_id == job_id and u.status == status for u in self.job_updates),
            timeout,
            f"job {job_id} status {agent.JobStatus.Name(status)}",
        )

    # -- protocol --------------------------------------------------------------------------------

    async def _agent_ws(self, request: web.Request) -> web.StreamResponse:
        if self._refuse:
            status = self._refuse.pop(0)
            return self._reject(status, "refused on demand")
        problem = self._check_token(request.headers.get("Authorization", ""))
        if problem:
            return self._reject(401, problem)

        worker = _Worker(f"AW_{next(self._ids)}", web.WebSocketResponse(timeout=2.0), request)
        await worker.ws.prepare(request)
        self._workers[worker.worker_id] = worker
        try:
            first = await worker.ws.receive()
            hello = self._record(worker, first.data) if first.type == WSMsgType.BINARY else None
            if hello is None or not hello.HasField("register"):
                await worker.ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=b"expected register")
                return worker.ws
            register = hello.register
            if self._echo:
                self._echo -= 1
                text = (f"401 Unauthorized: api key {self._api_key} rejected "
                        f"(Authorization: {request.headers.get('Authorization', '')})")
                self.echoed.append(text)
                await worker.ws.send_str(text)
                await worker.ws.close()
                return worker.ws
            if self._delay:
                await asyncio.sleep(self._delay)
                if worker.ws.closed:  # dropped while the response was held back
                    return worker.ws
            response = agent.RegisterWorkerResponse(
                worker_id=worker.worker_id,
                server_info=models.ServerInfo(version="standin", protocol=16, region="local"),
            )
            await worker.ws.send_bytes(agent.ServerMessage(register=response).SerializeToString())
            worker.agent_name, worker.registered = register.agent_name, True
            self.registrations.append(
                Registration(time.time(), worker.worker_id, register.agent_name, register.version)
            )
            self._record_event(
                "standin.registered", worker_id=worker.worker_id, agent_name=register.agent_name
            )
            async for raw in worker.ws:
                msg = self._record(worker, raw.data) if raw.type == WSMsgType.BINARY else None
                if msg is not None:
                    self._on_message(worker, msg)
        except ConnectionResetError:
            pass  # the worker went away mid-handshake; the worker-side logs say why
        finally:
            self._workers.pop(worker.worker_id, None)
            for owner, answer in list(self._pending.values()):
                if owner == worker.worker_id and not answer.done():
                    answer.set_exception(ConnectionError(f"worker {owner} disconnected"))
            self._notify()
        return worker.ws

    def _check_token(self, header: str) -> str:
        """Return why the worker's bearer token is unacceptable, or "" if it is fine."""
        if not header.startswith("Bearer "):
            return "missing bearer token"
        try:
            claims = jwt.decode(header[len("Bearer ") :], self._api_secret, algorithms=["HS256"])
        except jwt.PyJWTError as e:
            return f"invalid token: {type(e).__name__}"
        if claims.get("iss") != self._api_key:
            return "token issuer is not the API key"
        if not (claims.get("video") or {}).get("agent"):
            return "token lacks the video.agent grant"
        return ""

    def _on_message(self, worker: _Worker, msg: agent.WorkerMessage) -> None:
        if msg.WhichOneof("message") == "migrate_job":  # a reconnected worker still runs these jobs
            self._job_workers.update(dict.fromkeys(msg.migrate_job.job_ids, worker.worker_id))
        elif msg.WhichOneof("message") == "availability":
            pending = self._pending.get(msg.availability.job_id)
            if pending and pending[0] == worker.worker_id and not pending[1].done():
                pending[1].set_result(msg.availability)

    def _reject(self, status: int, reason: str) -> web.Response:
        self.rejections.append(Rejection(time.time(), status, reason))
        self._record_event("standin.rejected", status=status, reason=reason)
        self._notify()
        return web.Response(status=status, text=reason)

    def _record(self, worker: _Worker, data: bytes) -> agent.WorkerMessage | None:
        """Parse, store and log one worker message; None (and a logged event) if it is not one."""
        try:
            msg = agent.WorkerMessage.FromString(data)
        except DecodeError:
            self._record_event("standin.undecodable", worker_id=worker.worker_id, size=len(data))
            return None
        kind = msg.WhichOneof("message") or "empty"
        self.messages.append(Received(time.time(), worker.worker_id, kind, msg))
        fields = _to_dict(getattr(msg, kind)) if kind != "empty" else {}
        self._record_event(kind, worker_id=worker.worker_id, **fields)
        self._notify()
        return msg

    def _record_event(self, kind: str, **fields: Any) -> None:
        if self._log_file is not None:
            self._log_file.write(json.dumps({"at": time.time(), "type": kind, **fields}) + "\n")
            self._log_file.flush()

    def _notify(self) -> None:
        # waiters hold the old event; swapping before set() wakes exactly the current waiters
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- control API -----------------------------------------------------------------------------

    async def _control_state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _control_action(self, request: web.Request) -> web.Response:
        action, q = request.match_info["action"], request.query
        try:
            if action == "drop":  # ?code=<websocket close code>|abort, default 1001 (going away)
                code = q.get("code", str(WSCloseCode.GOING_AWAY.value))
                return web.json_response(
                    {"dropped": await self.drop_all(None if code == "abort" else int(code))}
                )
            if action == "dispatch":
                handle = await self.dispatch_job(q.get("room", "r1"), q.get("job_id"), q.get("metadata", ""))
                return web.json_response(asdict(handle))
            if action == "terminate":
                await self.terminate_job(q["job_id"])
                return web.json_response({"terminated": q["job_id"]})
            if action == "refuse":
                self.refuse_next(int(q.get("n", "1")), int(q.get("status", "503")))
                return web.json_response({"refusing": len(self._refuse)})
            if action == "delay":
                self.set_delay(float(q["seconds"]))
                return web.json_response({"delay": self._delay})
        except (KeyError, ValueError) as e:
            return web.json_response({"error": f"bad query parameter: {e}"}, status=400)
        except (RuntimeError, ConnectionError, TimeoutError) as e:
            return web.json_response({"error": str(e) or type(e).__name__}, status=409)
        return web.json_response({"error": f"unknown action {action!r}"}, status=404)


def _to_dict(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


async def _serve(args: argparse.Namespace, log_file: IO[str] | None) -> int:
    standin = LiveKitStandIn(args.api_key, args.api_secret, host=args.host, port=args.port, log_file=log_file)
    try:
        url = await standin.start()
    except OSError as e:
        print(f"livekit_standin: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"READY {url}", flush=True)
    await stop.wait()
    await standin.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: serve until SIGTERM/SIGINT; prints ``READY <url>`` once listening."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.livekit_standin", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7880)
    # the environment keeps the secret out of `ps`; the flags are for convenience in tests
    for flag, env in (("--api-key", "LIVEKIT_API_KEY"), ("--api-secret", "LIVEKIT_API_SECRET")):
        parser.add_argument(
            flag, default=os.environ.get(env), required=env not in os.environ, help=f"default: ${env}"
        )
    parser.add_argument("--log-file", help="append one JSON line per worker message and stand-in event")
    args = parser.parse_args(argv)
    if not args.log_file:
        return asyncio.run(_serve(args, None))
    with open(args.log_file, "a", encoding="utf-8") as log_file:
        return asyncio.run(_serve(args, log_file))


if __name__ == "__main__":
    sys.exit(main())
