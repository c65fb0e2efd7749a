"""Shared fixtures: the offline Whisper model, free ports, a notify socket, a running `knotd run`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "knotd-test-key"
# A recognisable secret: tests assert it never shows up in logs, /api/status, / or /metrics.
API_SECRET = "knotd-test-secret-7f3a9c1e5b2d8f4a6c0e9b7d"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Whisper base, assembled once from the knotd[models] packages (as `knotd models` does)."""
    from tests.audio import whisper_base_dir

    return whisper_base_dir()


def free_port() -> int:
    """A port that was free a moment ago (benchmarks; tests let servers bind port 0 or use `closed_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback TCP port where nothing listens, held bound (without listening) while the block runs, so no
    other process can take it meanwhile: a connection to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@dataclass
class NotifyMessage:
    pid: int
    fields: dict[str, str]
    at: float


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET; records sender PIDs.

    A reader thread takes every datagram as it arrives, as systemd does: the socket's queue holds only
    net.unix.max_dgram_qlen (10) messages, and knotd drops what does not fit rather than wait.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[NotifyMessage] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            text = data.decode("utf-8")
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            self.messages.append(NotifyMessage(pid, fields, time.monotonic()))

    def poll(self) -> None:
        """Nothing to do: the reader thread collects messages as they arrive (kept for callers)."""

    def keys(self) -> list[str]:
        """The message kinds in order, e.g. ['STATUS', 'STATUS', 'READY', 'STOPPING']."""
        self.poll()
        out = []
        for m in self.messages:
            out.extend(k for k in ("READY", "STOPPING", "WATCHDOG") if k in m.fields)
            if set(m.fields) == {"STATUS"}:
                out.append("STATUS")
        return out

    def statuses(self) -> list[str]:
        self.poll()
        return [m.fields["STATUS"] for m in self.messages if "STATUS" in m.fields]

    async def wait_for(self, key: str, timeout: float = 30.0, count: int = 1) -> NotifyMessage:
        """The `count`-th message carrying `key` (the first by default), once it has arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            found = [m for m in self.messages if key in m.fields]
            if len(found) >= count:
                return found[count - 1]
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no {count} {key}= notification(s) in {timeout}s; got {self.statuses()}")

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.close()


@dataclass
class DaemonProcess:
    """A `knotd run` subprocess. Its status server binds port 0 (no race for a port chosen in advance) and
    `status_url` is the address its "status_server_listening" log line names."""

    proc: asyncio.subprocess.Process
    log_path: Path
    config_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def status_url(self) -> str:
        """``http://host:port`` of the status server; aiohttp.ClientConnectionError before it listens."""
        for line in self.log_text().splitlines():
            if '"status_server_listening"' in line:
                return "http://" + json.loads(line)["address"]
        raise aiohttp.ClientConnectionError("the status server is not listening yet")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def get(self, path: str) -> tuple[int, str]:
        async with aiohttp.ClientSession() as http:
            async with http.get(self.status_url + path, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status, await resp.text()

    async def wait_http(self, path: str, status: int, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                code, body = await self.get(path)
                last = (code, body)
                if code == status:
                    return body
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"{path} never answered {status} (last: {last}); log tail:\n{self.log_text()[-3000:]}")

    async def wait_json(self, path: str, predicate: Callable[[dict], bool], timeout: float = 30.0) -> str:
        """Poll ``path`` (any status) until its JSON body satisfies ``predicate``; return that body."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                last = (await self.get(path))[1]
                if predicate(json.loads(last)):
                    return last
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"{path} never matched (last: {last}); log tail:\n{self.log_text()[-3000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 60.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


def write_config(tmp_path: Path, livekit_url: str, model_dir: Path, status_port: int, *, name: str = "",
                 session: str = "", **sections: str) -> Path:
    """Write `knotd{name}.toml` under `tmp_path` (state in `state{name}/`) with `sections` appended as tables;
    `session` holds extra lines for the [session] table."""
    extra = "\n".join(f"[{table}]\n{textwrap.dedent(body).strip()}\n" for table, body in sections.items())
    worker = sections.pop("worker", None)
    text = textwrap.dedent(f"""
        [livekit]
        url = "{livekit_url}"
        agent_name = "knotencheck"

        [status]
        listen = "127.0.0.1:{status_port}"

        [stt]
        model = "{model_dir}"

        [log]
        format = "json"
        level = "debug"
    """)
    text += f'\n[session]\nstate_dir = "{tmp_path / f"state{name}"}"\n{textwrap.dedent(session).strip()}\n'
    if worker is None:
        text += "\n[worker]\ndrain_timeout_s = 10\nmax_retry = 16\n"
    path = tmp_path / f"knotd{name}.toml"
    path.write_text(text + "\n" + extra)
    return path


@pytest.fixture
async def start_daemon(tmp_path, model_dir, notify_socket):
    """Start `python -m knotd run` as a real subprocess; kills leftovers at teardown."""
    started: list[DaemonProcess] = []

    async def start(livekit_url: str, *, env: dict | None = None, **sections: str) -> DaemonProcess:
        # The first daemon of a test keeps state/ and knotd.toml; more daemons get their own (state-1/, ...).
        name = f"-{len(started)}" if started else ""
        config = write_config(tmp_path, livekit_url, model_dir, 0, name=name, **sections)
        log_path = tmp_path / f"knotd-{len(started)}.log"
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "HF_HUB_OFFLINE": "1",
            "NOTIFY_SOCKET": notify_socket.path,
            "LIVEKIT_API_KEY": API_KEY,
            "LIVEKIT_API_SECRET": API_SECRET,
            **(env or {}),
        }
        log_file = open(log_path, "wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "knotd", "run", "--config", str(config),
            stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=full_env, cwd=str(tmp_path),
        )
        log_file.close()
        daemon = DaemonProcess(proc, log_path, config)
        started.append(daemon)
        return daemon

    yield start
    for d in started:
        if d.proc.returncode is None:
            d.proc.kill()
            await d.proc.wait()


@pytest.fixture
async def standin():
    from tests.livekit_standin import LiveKitStandIn

    server = LiveKitStandIn(API_KEY, API_SECRET)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def livekit_server(tmp_path):
    """A real livekit-server on loopback (built by ./dev.sh), with this suite's API key and secret."""
    from tests.livekit_server import LiveKitServer

    server = LiveKitServer(API_KEY, API_SECRET, tmp_path / "livekit-server.log")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def callers():
    """Make `tests.room_caller.Caller`s; every one still in a room leaves at teardown."""
    from tests.room_caller import Caller

    made: list[Caller] = []

    def make(identity: str, **options) -> Caller:
        caller = Caller(identity, **options)
        made.append(caller)
        return caller

    yield make
    for caller in made:
        await caller.leave()
