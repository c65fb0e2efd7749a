"""Server-Sent Events for the status page (``/events``): push on every state change, and end on shutdown.

A stream sends ``retry:`` first, then the current events at once, then new events whenever
the snapshot source's ``wait_changed`` fires (bursts are coalesced), and a comment line as a heartbeat when nothing
changed for a while, so proxies keep the connection and a vanished client is noticed. Streams share one
rendering per state, so a change costs one render however many browsers watch. Browsers reconnect on their
own (``EventSource``); every (re)connection starts with the full current state, so no event ids are needed.

Open streams would hold ``AppRunner.cleanup()`` for its whole shutdown timeout (60 s by default), so the
app's ``on_shutdown`` closes ``EventStreams`` and every stream returns within one loop iteration.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web

from knotd.status.snapshot import SnapshotSource

HEARTBEAT_S = 15.0
COALESCE_S = 0.5  # a turn changes several things at once; send them as one update
RETRY_MS = 2000
MAX_STREAMS = 32
# A browser reads at once; a client whose buffers stay full this long is not reading and is dropped, so
# non-readers cannot hold the MAX_STREAMS slots. Small buffers make a non-reader block (and go) soon.
WRITE_TIMEOUT_S = 10.0
WRITE_BUFFER_BYTES = 64 * 1024


class EventStreams:
    """Counts the open streams, caps them, and ends them all when closed."""

    def __init__(
        self, max_streams: int = MAX_STREAMS, heartbeat_s: float = HEARTBEAT_S, coalesce_s: float = COALESCE_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.max_streams, self.heartbeat_s, self.coalesce_s = max_streams, heartbeat_s, coalesce_s
        self.write_timeout_s = write_timeout_s
        self.dropped = 0  # streams ended because the client did not read
        self.open = 0
        self._closing = asyncio.Event()
        self._rendered: tuple[tuple[int, int], bytes] | None = None

    @property
    def is_closing(self) -> bool:
        return self._closing.is_set()

    async def close(self, _app: web.Application | None = None) -> None:
        """End every open stream (usable directly as an ``on_shutdown`` handler)."""
        self._closing.set()

    async def wait_closed(self) -> None:
        await self._closing.wait()

    def render_once(self, key: tuple[int, int], render: Callable[[], bytes]) -> bytes:
        """``render()``, shared by every stream that sends the same state (``key``)."""
        if self._rendered is None or self._rendered[0] != key:
            self._rendered = (key, render())
        return self._rendered[1]


def encode_event(name: str, data: Any) -> bytes:
    """One SSE event; JSON without newlines fits a single ``data:`` line."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


HEARTBEAT = b": heartbeat\n\n"


async def stream_events(
    request: web.Request,
    streams: EventStreams,
    state: SnapshotSource,
    render: Callable[[], bytes],
    *,
    unseen_changes: Callable[[], int] = lambda: 0,
) -> web.StreamResponse:
    """Serve one ``/events`` stream; ``render()`` gives the encoded events for the current state.

    ``unseen_changes()`` counts changes that do not move the state's version (histogram observations). It
    is checked at every heartbeat, so numbers derived from them are at most one heartbeat old.
    """
    if streams.is_closing or streams.open >= streams.max_streams:
        reason = "shutting down" if streams.is_closing else "too many open /events streams"
        return web.json_response({"error": reason}, status=503)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "X-Accel-Buffering": "no"},
    )
    await response.prepare(request)
    if request.transport is not None:
        request.transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
        sock = request.transport.get_extra_info("socket")
        if sock is not None:  # the kernel's buffer too, else it grows to megabytes before a write blocks
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WRITE_BUFFER_BYTES)
    streams.open += 1
    closing = asyncio.ensure_future(streams.wait_closed())

    async def write(data: bytes) -> None:
        await asyncio.wait_for(response.write(data), streams.write_timeout_s)

    try:
        await write(f"retry: {RETRY_MS}\n\n".encode())
        sent: tuple[int, int] | None = None
        while not closing.done():
            current = (state.version, unseen_changes())  # read before rendering: later changes are sent again
            if current != sent:
                sent = current
                await write(streams.render_once(current, render))
                await asyncio.wait({closing}, timeout=streams.coalesce_s)
                continue
            change = asyncio.ensure_future(state.wait_changed(current[0], streams.heartbeat_s))
            await asyncio.wait({change, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not change.done():
                change.cancel()
                await asyncio.wait({change})
            elif (state.version, unseen_changes()) == current:
                await write(HEARTBEAT)
    except ConnectionResetError:
        pass  # the browser went away; nothing to clean up beyond the finally
    except TimeoutError:
        streams.dropped += 1  # not reading: free the slot (aborting the transport ends aiohttp's side too)
        if request.transport is not None:
            request.transport.abort()
    finally:
        closing.cancel()
        streams.open -= 1
    return response
