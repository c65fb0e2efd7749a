"""Helpers for the package boot test: build or repack the .deb, read the install commands from the docs,
run the LiveKit stand-in on the host, and query a unit inside the container.

Used by tests/test_package.py and benchmarks/package.py; nothing here asserts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.nspawn.container import Container

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "packaging" / "deb" / "build.sh"
INSTALL_DOC = ROOT / "docs" / "install.md"
DEB_NAME = re.compile(r"knotd_[^\s/]+_amd64\.deb")
MODEL_DEB_NAME = re.compile(r"(?:\./)?knotd-model-whisper-base_[^\s/]+_all\.deb")
T = TypeVar("T")


def upstream_version() -> str:
    text = (ROOT / "knotd" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match, "no __version__ in knotd/__init__.py"
    return match.group(1)


def build_debs(out_dir: Path, release: str, *, arch_only: bool = False, indep_only: bool = False,
               timeout: float = 1800) -> tuple[list[Path], str]:
    """Run packaging/deb/build.sh (dpkg-buildpackage on debian/) for ``release`` into ``out_dir``.

    Returns the packages built (knotd with ``arch_only``, knotd-model-whisper-base with ``indep_only``,
    else both) and the build's output.
    """
    env = {**os.environ, "KNOTD_DIST_DIR": str(out_dir)}
    args = [str(BUILD_SCRIPT), "--release", release]
    args += ["--arch-only"] if arch_only else ["--indep-only"] if indep_only else []
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"build.sh failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return sorted(out_dir.glob("*.deb")), proc.stdout + proc.stderr


def repack_with_version(deb: Path, version: str, out_dir: Path, timeout: float = 300) -> Path:
    """The same package under another version, as an upgrade to test the maintainer scripts with.

    Rebuilding from source would take minutes for an identical tree; what an upgrade exercises
    (prerm/postinst, conffile handling, the restart) only needs a higher version. Uncompressed: it only
    travels into the test container.
    """
    tree = out_dir / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=timeout)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.MULTILINE))
    out = out_dir / f"knotd_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(tree), str(out)],
                   check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree, ignore_errors=True)
    return out


def lintian(debs: list[Path], timeout: float = 1800) -> list[str]:
    """lintian's tags for ``debs`` (overrides applied): E:, W:, I: ... lines, without the overridden ones."""
    proc = subprocess.run(["lintian", "--tag-display-limit", "0", "--display-info", *map(str, debs)],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode not in (0, 1, 2):  # 1/2: tags were emitted
        raise RuntimeError(f"lintian failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [line for line in proc.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]


def doc_commands(block: str) -> list[str]:
    """The shell lines of the ```sh block after ``<!-- boot-test:<block> -->`` in docs/install.md."""
    text = INSTALL_DOC.read_text()
    match = re.search(rf"<!-- boot-test:{re.escape(block)} -->\s*```sh\n(.*?)```", text, re.DOTALL)
    if not match:
        raise LookupError(f"docs/install.md has no boot-test:{block} block")
    return [line for line in match.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def as_root_in(line: str, substitutions: dict[str, str], deb: Path | None = None, model_deb: Path | None = None) -> str:
    """A documented command as the test runs it: as root (no sudo), with the test's values and package files.

    ``deb`` and ``model_deb`` are paths inside the container; the command runs in ``deb``'s directory.
    """
    line = line.replace("sudo ", "")
    for placeholder, value in substitutions.items():
        line = line.replace(placeholder, value)
    if model_deb is not None:
        line = MODEL_DEB_NAME.sub(str(model_deb), line)
    if deb is not None and DEB_NAME.search(line):
        line = f"cd {shlex.quote(str(deb.parent))} && " + DEB_NAME.sub(deb.name, line)
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveKitProcess:
    """A real livekit-server (tests/livekit_server.py) on the host's loopback, driven from synchronous tests.

    The boot tests are synchronous, and the container reaches the host's loopback (shared network), so the
    server runs as a host process on its own event loop; ``registered_workers()`` reads its log.
    """

    def __init__(self, api_key: str, api_secret: str, log_path: Path) -> None:
        from tests.livekit_server import LiveKitServer

        self.log_path = log_path
        self._loop = asyncio.new_event_loop()
        self._server = LiveKitServer(api_key, api_secret, log_path)

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> None:
        self._loop.run_until_complete(self._server.start())

    def stop(self) -> None:
        try:
            self._loop.run_until_complete(self._server.stop())
        finally:
            self._loop.close()

    def token(self, identity: str, room: str, *, agent_name: str | None = None) -> str:
        """A join token for ``room``; with ``agent_name``, joining dispatches that agent to the room."""
        return self._server.token(identity, room, agent_name=agent_name)

    def registered_workers(self) -> set[str]:
        """Worker ids the server logged as registered."""
        ids = set()
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"worker registered"' in line:
                ids.add(json.loads(line).get("workerID", ""))
        return ids


def unit_properties(box: Container, *names: str, unit: str = "knotd.service") -> dict[str, str]:
    """``systemctl show`` properties of a unit in the container."""
    args = " ".join(f"-p {n}" for n in names)
    out = box.sh(f"systemctl show {unit} {args}")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal_cursor(box: Container) -> str:
    out = box.sh("journalctl -n 0 --show-cursor --quiet")
    match = re.search(r"-- cursor: (\S+)", out)
    return match.group(1) if match else ""


def journal_since(box: Container, cursor: str, unit: str = "knotd.service") -> str:
    """knotd's journal lines (the message text only) written after ``cursor``."""
    after = f"--after-cursor={shlex.quote(cursor)}" if cursor else ""
    return box.sh(f"journalctl -u {unit} {after} --no-pager -o cat")


def exposure_score(security_output: str) -> float:
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security_output)
    if not match:
        raise ValueError(f"no exposure level in:\n{security_output[-1000:]}")
    return float(match.group(1))


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``probe`` until it returns something other than None (or False/""), and return that.

    Raises:
        TimeoutError: ``timeout`` seconds passed first; names ``what`` and the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f}s (last seen: {value!r})")
        time.sleep(interval)


class CallerInRoom:
    """A caller (tests/room_caller.py, the livekit rtc SDK) in a room of ``livekit``, for synchronous tests.

    The caller lives on an event loop in its own thread, so it stays connected (and the session with it) while
    the test blocks on commands in the container. Use as a context manager: joined on entry, left on exit.
    """

    def __init__(self, livekit: LiveKitProcess, identity: str, room: str, agent_name: str,
                 timeout: float = 60) -> None:
        self._token = livekit.token(identity, room, agent_name=agent_name)
        self._url = livekit.url
        self._identity = identity
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"caller:{identity}", daemon=True)
        self.caller = None

    def _run(self, coro, timeout: float):  # noqa: ANN001, ANN202 - a coroutine and its result
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> CallerInRoom:
        from tests.room_caller import Caller

        async def join() -> Caller:
            caller = Caller(self._identity)  # its rtc.Room binds to this (the thread's) loop
            await caller.join(self._url, self._token, microphone=False)
            return caller

        self._thread.start()
        try:
            self.caller = self._run(join(), self._timeout)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.caller is not None:
                self._run(self.caller.leave(), self._timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(self._timeout)
            if not self._thread.is_alive():
                self._loop.close()
