"""A real livekit-server on loopback, built from its Go module by `./dev.sh` (see `livekit_server_binary`).

Each `LiveKitServer` gets its own API key and secret and its own free ports (signal/HTTP, ICE/TCP, one UDP
mux port), all on 127.0.0.1; a single node needs no Redis. The keys reach the server through the
environment (`LIVEKIT_KEYS`), never its command line. A port taken between picking and binding (another
test grabbed it) makes the server exit: `start()` then tries again with new ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
START_ATTEMPTS = 3


def livekit_server_binary() -> Path:
    """The binary `./dev.sh` built (it exports KNOTD_LIVEKIT_SERVER), or the newest one under .cache/."""
    configured = os.environ.get("KNOTD_LIVEKIT_SERVER")
    if configured:
        path = Path(configured)
    else:
        built = sorted((ROOT / ".cache" / "livekit-server").glob("*/livekit-server"))
        path = built[-1] if built else ROOT / ".cache" / "livekit-server" / "missing"
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"livekit-server not built at {path}: run `./dev.sh test` (it builds it with `go install`)")
    return path


def _free_ports(kind: int, count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, kind)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LiveKitServer:
    """One livekit-server process. `url` is the ws:// URL clients and workers connect to."""

    def __init__(self, api_key: str, api_secret: str, log_path: Path) -> None:
        self.api_key = api_key
        self.api_secret = api_secret
        self.log_path = log_path
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, keep_ports: bool = False) -> None:
        """Start the server and wait until it answers; with `keep_ports`, on the ports it had before."""
        last_error = ""
        for _ in range(START_ATTEMPTS):
            if not keep_ports or not self.port:
                self.port, self._tcp_port = _free_ports(socket.SOCK_STREAM, 2)
                (self._udp_port,) = _free_ports(socket.SOCK_DGRAM, 1)
            config = {
                "port": self.port,
                "bind_addresses": ["127.0.0.1"],
                "rtc": {"tcp_port": self._tcp_port, "udp_port": self._udp_port, "node_ip": "127.0.0.1",
                        "use_external_ip": False, "enable_loopback_candidate": True},
                "logging": {"level": os.environ.get("KNOTD_LIVEKIT_LOG_LEVEL", "info"), "json": True},
            }
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": os.environ.get("HOME", "/root"),
                "LIVEKIT_CONFIG": json.dumps(config),  # YAML is a superset of JSON
                "LIVEKIT_KEYS": f"{self.api_key}: {self.api_secret}",
            }
            with open(self.log_path, "ab") as log:
                self.proc = await asyncio.create_subprocess_exec(
                    str(livekit_server_binary()), "--bind", "127.0.0.1", "--node-ip", "127.0.0.1",
                    stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
                )
            if await self._wait_up(timeout=30.0):
                return
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            await self.stop()
        raise RuntimeError(f"livekit-server did not start in {START_ATTEMPTS} attempts; log tail:\n{last_error}")

    async def _wait_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.returncode is not None:
                    return False
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with http.get(self.http_url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                        if resp.status == 200:
                            return True
                await asyncio.sleep(0.05)
        return False

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server (SIGKILL for a crash); waits for the process to exit."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def restart(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server and start it again on the same ports (what clients and workers reconnect to)."""
        await self.stop(sig)
        await self.start(keep_ports=True)

    def token(self, identity: str, room: str, *, agent_name: str | None = None, name: str = "") -> str:
        """A join token for `room`; with `agent_name`, joining dispatches that agent to the room."""
        from livekit import api

        token = (api.AccessToken(self.api_key, self.api_secret).with_identity(identity).with_name(name or identity)
                 .with_grants(api.VideoGrants(room_join=True, room=room)))
        if agent_name is not None:
            token = token.with_room_config(api.RoomConfiguration(
                agents=[api.RoomAgentDispatch(agent_name=agent_name)]))
        return token.to_jwt()

    def api(self):
        """A `livekit.api.LiveKitAPI` client for this server (close it with `await client.aclose()`)."""
        from livekit import api

        return api.LiveKitAPI(self.http_url, self.api_key, self.api_secret)
