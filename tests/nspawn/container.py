"""Boot a throwaway Debian (12 or 13) with systemd in systemd-nspawn and run commands in it.

The container shares the host's network (no ``--private-network``), so a server on the host's loopback is
reachable from inside and the other way round. ``--volatile=overlay`` keeps every write in a tmpfs that
disappears at power-off: the cached rootfs stays pristine. ``--register=no --keep-unit`` stop nspawn from
asking the host's systemd for a machine registration or a scope (the CI machine's PID 1 is not systemd).

This module does not build the rootfs (tests/nspawn/rootfs.sh does) and knows nothing about knotd.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

ROOTFS_SCRIPT = Path(__file__).resolve().parent / "rootfs.sh"
DEFAULT_CACHE = Path(os.environ.get("KNOTD_CI_CACHE", "/var/cache/knotd-ci"))
# What a login shell in the container would have; the host's environment must not leak in.
CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}


class ContainerError(Exception):
    """The container could not be booted, or a command in it failed or timed out."""


@dataclass(frozen=True)
class Result:
    """One finished command: its exit code and its output (stdout and stderr merged)."""

    command: str
    returncode: int
    output: str

    def check(self) -> Result:
        if self.returncode != 0:
            raise ContainerError(f"`{self.command}` exited {self.returncode}:\n{self.output[-4000:]}")
        return self


def ensure_rootfs(suite: str = "bookworm", cache: Path = DEFAULT_CACHE, timeout: float = 900) -> Path:
    """The cached rootfs of Debian ``suite`` (bookworm, trixie), debootstrapped first if missing or stale
    (≈2 min once)."""
    proc = subprocess.run([str(ROOTFS_SCRIPT), str(cache), suite], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise ContainerError(f"building the rootfs failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class Container:
    """A booted container; use as a context manager so it is always powered off (or killed).

    Args:
        rootfs: the directory to boot (never written to).
        binds: host directory → container path, bound read-only.
        log_path: where the container's console output goes.
    """

    def __init__(self, rootfs: Path, binds: dict[Path, str], log_path: Path) -> None:
        self.rootfs = rootfs
        self.binds = binds
        self.log_path = log_path
        self.name = f"knotd-ci-{uuid.uuid4().hex[:8]}"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def boot(self, timeout: float = 90) -> float:
        """Boot and wait until systemd reports the system up; returns the seconds it took."""
        started = time.monotonic()
        args = [
            "systemd-nspawn", "--quiet", "-D", str(self.rootfs), f"--machine={self.name}",
            "--register=no", "--keep-unit", "--volatile=overlay", "--console=passive", "-b",
        ]
        args += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        with open(self.log_path, "ab") as log:  # nspawn keeps its own copy of the descriptor
            self._nspawn = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        deadline = started + timeout
        while self.leader is None:
            self._fail_if_nspawn_exited()
            self.leader = _child_named(self._nspawn.pid, "systemd")
            if time.monotonic() > deadline:
                raise ContainerError(f"no systemd inside nspawn after {timeout}s; console:\n{self.console()}")
            time.sleep(0.05)
        while True:
            self._fail_if_nspawn_exited()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ContainerError(f"container did not finish booting in {timeout}s; console:\n{self.console()}")
            # Fails until the container's system bus and manager answer; then waits for boot to finish.
            state = self.run("systemctl is-system-running --wait", timeout=left).output.strip()
            if state in ("running", "degraded"):
                return time.monotonic() - started
            time.sleep(0.1)

    def poweroff(self, timeout: float = 60) -> None:
        """Shut the container down cleanly, or kill it; never raises."""
        if self._nspawn is None:
            return
        if self._nspawn.poll() is None and self.leader is not None:
            self._nsenter(["systemctl", "--no-block", "poweroff"], timeout=10, check_timeout=False)
            try:
                self._nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self._nspawn.poll() is None:
            # Killing the container's PID 1 kills everything in its PID namespace.
            if self.leader is not None:
                _kill(self.leader)
            _kill(self._nspawn.pid, signal.SIGTERM)
            try:
                self._nspawn.wait(15)
            except subprocess.TimeoutExpired:
                _kill(self._nspawn.pid)
                self._nspawn.wait(15)
        self._nspawn = None

    def __enter__(self) -> Self:
        try:
            self.boot()
        except BaseException:
            self.poweroff()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.poweroff()

    # -- commands -------------------------------------------------------------------------------
    def run(self, script: str, *, timeout: float = 120, check: bool = False, stdin: str | None = None) -> Result:
        """Run a shell script (``sh -c``) as root inside the container."""
        result = self._nsenter(["sh", "-c", script], timeout=timeout, stdin=stdin)
        return result.check() if check else result

    def sh(self, script: str, *, timeout: float = 120, stdin: str | None = None) -> str:
        """Run a shell script that must succeed; returns its output."""
        return self.run(script, timeout=timeout, check=True, stdin=stdin).output

    def console(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def _nsenter(self, argv: list[str], *, timeout: float, stdin: str | None = None,
                 check_timeout: bool = True) -> Result:
        if self.leader is None:
            raise ContainerError("container is not booted")
        env_args = ["env", "-i", *(f"{k}={v}" for k, v in CONTAINER_ENV.items())]
        command = " ".join(shlex.quote(a) for a in argv)
        try:
            proc = subprocess.run(
                ["nsenter", "-t", str(self.leader), "-a", *env_args, *argv],
                input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                timeout=timeout, errors="replace", check=False,
            )
        except subprocess.TimeoutExpired as err:
            if not check_timeout:
                return Result(command, -1, "")
            out = err.output.decode(errors="replace") if isinstance(err.output, bytes) else (err.output or "")
            raise ContainerError(f"`{command}` timed out after {timeout:.0f}s:\n{out[-4000:]}") from None
        return Result(command, proc.returncode, proc.stdout)

    def _fail_if_nspawn_exited(self) -> None:
        assert self._nspawn is not None
        if self._nspawn.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {self._nspawn.returncode}; console:\n{self.console()}")


def _child_named(parent: int, name: str) -> int | None:
    """The PID of a descendant of ``parent`` whose command name is ``name`` (breadth-first)."""
    queue = [parent]
    while queue:
        pid = queue.pop(0)
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == name:
                    return child
            except OSError:
                continue
            queue.append(child)
    return None


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
