"""The systemd notification protocol (sd_notify), without a dependency.

Why not the ``sdnotify`` package: version 0.3.2 encodes messages as Latin-1 and silently drops any
``STATUS=`` text that is not (an LWN-style "draining: 1 Sitzung …" would vanish), swallows every exception
with a bare ``except:`` and ships only an sdist. libsystemd's own approach is small enough to copy: a fresh
``AF_UNIX``/``SOCK_DGRAM`` socket per message, a leading ``@`` meaning the abstract namespace.

The notifier never raises to its caller: systemd being gone must not take the daemon down. A failed send
is logged once per kind of error. It never blocks either: it runs on the event loop, and a datagram socket
whose reader has fallen behind (its queue holds `net.unix.max_dgram_qlen` messages, 10 by default) blocks a
plain send — that froze a daemon's whole loop, its LiveKit worker included, in a test whose reader paused;
such a message is dropped and counted in `knotd_sd_notify_dropped_total`.

``Ticker`` sends the periodic messages from the main loop: ``WATCHDOG=1``,
and ``EXTEND_TIMEOUT_USEC=`` while the daemon drains, so the unit's ``TimeoutStopSec`` needs no step with
``drain_timeout_s`` (the drain bounds itself; a wedged loop stops the extensions and systemd's timeout wins).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import MutableMapping

import structlog

from knotd import metrics

log = structlog.get_logger(__name__)


class Notifier:
    """Sends sd_notify messages to ``NOTIFY_SOCKET``; a no-op when the daemon is not run by systemd.

    Args:
        address: the value of ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket), or None.
        watchdog_usec: the value of ``WATCHDOG_USEC`` when it applies to this process, else None.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self.watchdog_usec = watchdog_usec
        self._warned: set[str] = set()

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read NOTIFY_SOCKET and the watchdog settings once, and remove them from the environment.

        livekit job threads and any subprocess must never notify on the daemon's behalf (the unit has
        ``NotifyAccess=main``; with ``all`` a child's WATCHDOG=1 could hide a wedged main loop).
        """
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None)
        usec = env.pop("WATCHDOG_USEC", None)
        pid = env.pop("WATCHDOG_PID", None)
        watchdog = None
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout systemd enforces, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines. Returns whether it was sent."""
        if self._address is None:
            return False
        payload = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.send(payload, socket.MSG_DONTWAIT)
            return True
        except OSError as err:
            kind = type(err).__name__
            metrics.SD_NOTIFY_DROPPED.labels(error=kind).inc()
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning("sd_notify_failed", error=kind, errno=err.errno)
            return False

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for more time for the current start or stop job (EXTEND_TIMEOUT_USEC)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


EXTEND_EVERY_S = 5.0
EXTEND_WINDOW_S = 20.0  # each extension asks for this long; the next one comes EXTEND_EVERY_S later


class Ticker:
    """Periodic sd_notify messages from the main loop: the watchdog ping, and stop-timeout extensions.

    A blocked main loop sends nothing, so systemd's watchdog (and its stop timeout) see it.

    Args:
        notifier: where to send; without a watchdog and until ``extend_stop_timeout(True)`` it stays idle.
    """

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._extending = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_watchdog = float("-inf")
        self._last_extend = float("-inf")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="knotd:systemd_ticker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def extend_stop_timeout(self, on: bool) -> None:
        """While on, send ``EXTEND_TIMEOUT_USEC=`` every few seconds (a drain in progress)."""
        self._extending = on
        self._wake.set()

    def tick(self) -> None:
        """Send what is due now."""
        now = time.monotonic()
        interval = self.notifier.watchdog_interval_s
        if interval is not None and now - self._last_watchdog >= interval:
            self._last_watchdog = now
            self.notifier.watchdog()
        if self._extending and now - self._last_extend >= EXTEND_EVERY_S:
            self._last_extend = now
            self.notifier.extend_timeout(EXTEND_WINDOW_S)

    def _period(self) -> float | None:
        periods = [p for p in (self.notifier.watchdog_interval_s, EXTEND_EVERY_S if self._extending else None)
                   if p is not None]
        return min(periods) if periods else None

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self.tick()
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow stop()'s cancel when a wake-up races it.
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({woken}, timeout=self._period())
            finally:
                woken.cancel()


def _socket_address(address: str) -> str:
    if address.startswith("@"):
        return "\0" + address[1:]
    return address


def _one_line(text: str) -> str:
    return " ".join(text.split())
