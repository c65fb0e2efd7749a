"""Server-Sent Events for the status page (``/events``): push on every state change, and end on shutdown.

A stream sends ``retry:`` first, then the current events at once, then new events whenever
``DaemonState.wait_changed`` fires (bursts are coalesced), and a comment line as a heartbeat when nothing
changed for a while, so proxies keep the connection and a vanished client is noticed. Browsers reconnect
on their own (``EventSource``); every (re)connection starts with the full current state, so no event ids
are needed.

Open streams would hold ``AppRunner.cleanup()`` for its whole shutdown timeout (60 s by default), so the
app's ``on_shutdown`` closes ``EventStreams`` and every stream returns within one loop iteration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from knotd.state import DaemonState

HEARTBEAT_S = 15.0
COALESCE_S = 0.25  # a turn changes several things at once; send them as one update
RETRY_MS = 2000
MAX_STREAMS = 32


class EventStreams:
    """Counts the open streams, caps them, and ends them all when closed."""

    def __init__(
        self, max_streams: int = MAX_STREAMS, heartbeat_s: float = HEARTBEAT_S, coalesce_s: float = COALESCE_S,
    ) -> None:
        self.max_streams, self.heartbeat_s, self.coalesce_s = max_streams, heartbeat_s, coalesce_s
        self.open = 0
        self._closing = asyncio.Event()

    @property
    def is_closing(self) -> bool:
        return self._closing.is_set()

    async def close(self, _app: web.Application | None = None) -> None:
        """End every open stream (usable directly as an ``on_shutdown`` handler)."""
        self._closing.set()

    async def wait_closed(self) -> None:
        await self._closing.wait()


def encode_event(name: str, data: Any) -> bytes:
    """One SSE event; JSON without newlines fits a single ``data:`` line."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


HEARTBEAT = b": heartbeat\n\n"


async def stream_events(
    request: web.Request, streams: EventStreams, state: DaemonState, render: Callable[[], bytes],
) -> web.StreamResponse:
    """Serve one ``/events`` stream; ``render()`` gives the encoded events for the current state."""
    if streams.is_closing or streams.open >= streams.max_streams:
        reason = "shutting down" if streams.is_closing else "too many open /events streams"
        return web.json_response({"error": reason}, status=503)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream; charset=utf-8", "X-Accel-Buffering": "no"},
    )
    await response.prepare(request)
    streams.open += 1
    closing = asyncio.ensure_future(streams.wait_closed())
    try:
        await response.write(f"retry: {RETRY_MS}\n\n".encode())
        sent: int | None = None
        while not closing.done():
            if sent != state.version:
                sent = state.version  # read before rendering: a change during rendering is sent again
                await response.write(render())
                await asyncio.wait({closing}, timeout=streams.coalesce_s)
                continue
            change = asyncio.ensure_future(state.wait_changed(sent, streams.heartbeat_s))
            await asyncio.wait({change, closing}, return_when=asyncio.FIRST_COMPLETED)
            if not change.done():
                change.cancel()
                await asyncio.wait({change})
            elif change.result() == sent:
                await response.write(HEARTBEAT)
    except ConnectionResetError:
        pass  # the browser went away; nothing to clean up beyond the finally
    finally:
        closing.cancel()
        streams.open -= 1
    return response
