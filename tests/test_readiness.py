"""``READY=1`` and ``/readyz`` 200 mean "a session can start now": never before the models are in, even when
LiveKit registers the worker first.

The daemon runs in this process (``knotd.daemon.Daemon``, as ``knotd run`` builds it) against the LiveKit
stand-in and a real notify socket; the test holds the Whisper load open (the ``whisper`` future that
``knotd run`` starts before the livekit import), so the registration certainly comes first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from concurrent.futures import Future

import aiohttp
import pytest

from knotd.config import load_settings
from knotd.daemon import Daemon
from knotd.speech.models import load_whisper
from knotd.systemd import Notifier
from tests.conftest import API_KEY, API_SECRET, write_config

pytestmark = pytest.mark.models


async def readyz(daemon: Daemon) -> tuple[int, dict]:
    address = daemon.boot.status_address
    assert address is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{address}/readyz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            return resp.status, json.loads(await resp.text())


async def wait_readyz(daemon: Daemon, predicate, timeout: float = 60.0) -> tuple[int, dict]:
    async with asyncio.timeout(timeout):
        while True:
            if daemon.boot.status_address is not None:
                code, body = await readyz(daemon)
                if predicate(code, body):
                    return code, body
            await asyncio.sleep(0.05)


async def test_ready_waits_for_the_models_when_the_worker_registers_first(standin, notify_socket, model_dir,
                                                                          tmp_path):
    """1. The worker registers while Whisper is still loading. 2. Whisper finishes.

    Result: registered but loading, /readyz is 503 "loading models (registered as worker …)" and no READY=1
    has been sent; once the models are in, READY=1 and /readyz 200. SIGTERM then stops the daemon with 0.
    """
    config = write_config(tmp_path, standin.url, model_dir, 0)
    settings = load_settings(config, {"LIVEKIT_API_KEY": API_KEY, "LIVEKIT_API_SECRET": API_SECRET})
    whisper: Future = Future()  # the Whisper load, held open
    daemon = Daemon(settings, Notifier(notify_socket.path), whisper=whisper)
    run = asyncio.create_task(daemon.run())
    try:
        registration = await standin.wait_registered(1, timeout=60)
        # /readyz once it shows the registration (it would say "ready" if the registration were enough).
        code, body = await wait_readyz(daemon, lambda c, b: registration.worker_id in b["reason"] or c == 200)
        assert (code, body["state"]) == (503, "loading_models")
        assert body["reason"] == f"loading models (registered as worker {registration.worker_id})"
        assert "READY" not in notify_socket.keys()

        whisper.set_result(await asyncio.to_thread(load_whisper, settings))
        ready = await notify_socket.wait_for("READY", timeout=60)
        assert ready.pid == os.getpid()
        code, body = await readyz(daemon)
        assert (code, body["state"]) == (200, "ready")
        assert len(standin.registrations) == 1  # READY came from the models, not from a new registration

        os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler: a stop, as systemd sends it
        assert await asyncio.wait_for(run, 60) == 0
    finally:
        if not run.done():  # a failed assertion: stop the daemon as systemd would, and let the load end
            os.kill(os.getpid(), signal.SIGTERM)
            if not whisper.done():
                whisper.set_exception(RuntimeError("the test ended before the models were in"))
            await asyncio.wait_for(asyncio.gather(run, return_exceptions=True), 60)
