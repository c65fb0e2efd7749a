"""Hostile input on the status port (loopback only, bounded loops): every answer a 4xx or 503 with the
security headers and no traceback, bounded memory (at most MAX_STREAMS /events streams), /healthz stays 200
and /metrics keeps rendering."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from knotd.config import ListenAddress
from knotd.state import DaemonState
from knotd.status.app import SECURITY_HEADERS, STREAMS_KEY, LoopMonitor, start_status_server
from knotd.status.events import MAX_STREAMS

CSP = SECURITY_HEADERS["Content-Security-Policy"]


@pytest.fixture
async def server():
    state = DaemonState(livekit_url="wss://livekit.example", agent_name="knotencheck", model="whisper base",
                        max_sessions=4)
    state.bind_loop(asyncio.get_running_loop())
    monitor = LoopMonitor()
    monitor.start()
    runner = await start_status_server(state, ListenAddress("127.0.0.1", 0), monitor, allowed_hosts=["knotd-vm1"],
                                       idle_timeout_s=1.0)
    port = runner.addresses[0][1]
    streams = runner.app[STREAMS_KEY]
    yield state, port, streams
    await runner.cleanup()
    await monitor.stop()


async def raw(port: int, data: bytes, *, read_timeout: float = 30.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()


def status_and_headers(answer: bytes) -> tuple[int, str]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    return int(head.split(" ", 2)[1]), head


async def still_serving(port: int) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200 and "knotd_sessions_active" in await r.text()


async def test_host_check_answers_421_to_a_rebound_name(server):
    _, port, _ = server
    for host, expected in [("evil.example", 421), ("evil.example:9464", 421), ("localhost:9464", 200),
                           ("127.0.0.1:9464", 200), ("[::1]:9464", 200), ("KNOTD-VM1:9464", 200)]:
        code, head = status_and_headers(
            await raw(port, f"GET /api/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()))
        assert code == expected, host
        assert CSP in head


async def test_malformed_requests_get_a_plain_4xx_with_the_security_headers(server, caplog):
    _, port, _ = server
    attacks = {
        "garbage": b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n",
        "unknown method": b"BREW /pot HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "long header": b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: " + b"<script>" * 2000 + b"\r\n\r\n",
        "long URL": b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "dot-dot": b"GET /static/../../../etc/passwd HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "encoded dot-dot": b"GET /static/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: localhost\r\n"
                           b"Connection: close\r\n\r\n",
        "NUL": b"GET /static/%00 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "10 MB body": b"POST /api/status HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10485760\r\n"
                      b"Connection: close\r\n\r\n" + b"x" * 65536,
    }
    for name, request in attacks.items():
        answer = await raw(port, request)
        code, head = status_and_headers(answer)
        assert 400 <= code < 500, (name, head)
        assert CSP in head and "nosniff" in head, name
        assert b"<script>" not in answer and b"root:" not in answer, name
    assert "Traceback" not in caplog.text
    await still_serving(port)


async def test_slowloris_and_idle_connections_are_closed(server):
    _, port, _ = server
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
    for _, writer in conns[:50]:
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")  # headers that never end
    await still_serving(port)
    for reader, writer in conns:
        assert await asyncio.wait_for(reader.read(), 60) == b""  # the server hung up
        writer.close()


async def test_500_event_readers_get_at_most_the_cap_and_the_rest_503(server):
    _, port, streams = server
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async def open_stream():
            return await http.get(f"http://127.0.0.1:{port}/events")

        responses = await asyncio.gather(*(open_stream() for _ in range(500)))
        codes = [r.status for r in responses]
        assert codes.count(200) == MAX_STREAMS and codes.count(503) == 500 - MAX_STREAMS
        assert streams.open == MAX_STREAMS
        await still_serving(port)
        for r in responses:
            r.close()


async def test_event_readers_that_never_read_lose_their_slot(server):
    state, port, streams = server
    streams.write_timeout_s, streams.coalesce_s = 1.0, 0.01
    socks = []
    for _ in range(MAX_STREAMS):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        socks.append(sock)  # and never read
    for n in range(400):  # each change sends every stream the page again, with 10 kB of room name
        if streams.dropped >= MAX_STREAMS:
            break
        state.session_started(f"RM_{n}", "<b>" + "x" * 10000, "greeting")
        await asyncio.sleep(0.05)
    assert streams.dropped == MAX_STREAMS and streams.open == 0
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/events") as r:
            assert r.status == 200
    for sock in socks:
        sock.close()


async def test_a_room_name_with_html_and_10_kb_is_escaped_on_the_page(server):
    state, port, _ = server
    state.session_started("RM_html", "<script>alert(1)</script>" + "ü" * 10000, "greeting")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/") as r:
            page = await r.text()
            assert r.status == 200 and r.headers["Content-Security-Policy"] == CSP
        async with http.get(f"http://127.0.0.1:{port}/api/status") as r:
            assert r.status == 200 and (await r.json())["ready"] is False
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    await still_serving(port)
