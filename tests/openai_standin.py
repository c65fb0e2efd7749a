"""An OpenAI-compatible ``/v1/chat/completions`` stand-in for tests: streaming SSE, with failure modes.

It answers ``POST /v1/chat/completions`` with ``stream: true`` the way OpenAI and llama.cpp's server do
(``data: {chat.completion.chunk}`` lines, a usage chunk when asked for, then ``data: [DONE]``) and records
every request body. ``GET /v1/models`` lists the one model. Modes (set ``standin.mode`` between requests):

- ``normal``: stream ``reply`` (or ``reply_fn(body)``) in word chunks;
- ``http_500``: answer 500 with an OpenAI-style error body;
- ``stall``: accept the request and send nothing until the stand-in closes;
- ``slow_first_token``: send the headers, wait ``first_token_delay_s``, then stream normally;
- ``keepalive``: send the headers, then only SSE comments (``: keep-alive``) every 0.1 s, never text;
- ``drop``: send the first chunk, then cut the connection.

It does not implement non-streaming completions, tools, authentication or any other endpoint. Run as
``python -m tests.openai_standin --port 8011`` it serves until interrupted (handy with ``knotd demo``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any, Self

from aiohttp import web

MODES = ("normal", "http_500", "stall", "slow_first_token", "keepalive", "drop")
DEFAULT_REPLY = "Guten Tag. Ich bin die Stand-in-Antwort. Wie kann ich helfen?"


class OpenAIStandin:
    """One stand-in server on 127.0.0.1 (port 0 unless given); use as ``async with OpenAIStandin() as s``.

    Args:
        model: the model name it reports.
        reply: the text streamed in ``normal`` mode.
        words_per_chunk: how many words each SSE chunk carries.
    """

    def __init__(self, *, model: str = "standin-model", reply: str = DEFAULT_REPLY, words_per_chunk: int = 3,
                 port: int = 0) -> None:
        self.model = model
        self.reply = reply
        self.reply_fn: Callable[[dict[str, Any]], str] | None = None
        self.words_per_chunk = words_per_chunk
        self.mode = "normal"
        self.first_token_delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        self.authorization: list[str | None] = []
        self._port = port
        self._runner: web.AppRunner | None = None
        self._released = asyncio.Event()
        self.base_url = ""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> str:
        """Bind and serve; returns the base URL (``http://127.0.0.1:<port>/v1``)."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        return self.base_url

    async def close(self) -> None:
        self._released.set()  # let stalled handlers finish so shutdown does not wait on them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.authorization.append(request.headers.get("Authorization"))
        mode = self.mode
        if mode == "http_500":
            return web.json_response(
                {"error": {"message": "stand-in failure", "type": "server_error", "code": 500}}, status=500
            )
        if mode == "stall":
            await self._released.wait()
            return web.Response(status=503)
        if not body.get("stream"):
            return web.json_response({"error": {"message": "only stream=true is implemented"}}, status=400)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        if mode == "keepalive":
            while not self._released.is_set():
                await response.write(b": keep-alive\n\n")
                try:
                    await asyncio.wait_for(self._released.wait(), timeout=0.1)
                except TimeoutError:
                    pass
            return response
        if mode == "slow_first_token":
            try:
                await asyncio.wait_for(self._released.wait(), timeout=self.first_token_delay_s)
            except TimeoutError:
                pass
        text = self.reply_fn(body) if self.reply_fn else self.reply
        request_id = f"chatcmpl-standin-{len(self.requests)}"
        pieces = _pieces(text, self.words_per_chunk)
        for index, piece in enumerate(pieces):
            delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
            await self._send(response, self._chunk(request_id, [{"index": 0, "delta": delta, "finish_reason": None}]))
            if mode == "drop":
                assert request.transport is not None
                request.transport.close()
                return response
        await self._send(response, self._chunk(request_id, [{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            words = len(text.split())
            usage = {"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words}
            await self._send(response, {**self._chunk(request_id, []), "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _chunk(self, request_id: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model, "choices": choices}

    @staticmethod
    async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
        await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())


def _pieces(text: str, words_per_chunk: int) -> list[str]:
    words = text.split(" ")
    return [" ".join(words[i:i + words_per_chunk]) + (" " if i + words_per_chunk < len(words) else "")
            for i in range(0, len(words), words_per_chunk)]


async def _serve(port: int, mode: str, reply: str) -> None:
    standin = OpenAIStandin(port=port, reply=reply)
    standin.mode = mode
    print(f"serving {await standin.start()} mode={mode}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await standin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--mode", choices=MODES, default="normal")
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.mode, args.reply))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
