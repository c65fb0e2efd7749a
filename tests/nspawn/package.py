"""Helpers for the package boot test: build or repack the .deb, read the install commands from the docs,
run the LiveKit stand-in on the host, and query a unit inside the container.

Used by tests/test_package.py and benchmarks/package.py; nothing here asserts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.nspawn.container import Container

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "packaging" / "deb" / "build.sh"
INSTALL_DOC = ROOT / "docs" / "install.md"
DEB_NAME = re.compile(r"knotd_[^\s/]+_amd64\.deb")


def upstream_version() -> str:
    text = (ROOT / "knotd" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match, "no __version__ in knotd/__init__.py"
    return match.group(1)


def build_deb(out_dir: Path, *, version: str | None = None, timeout: float = 900) -> tuple[Path, str]:
    """Run packaging/deb/build.sh into ``out_dir``; returns the .deb and the build's output."""
    env = {**os.environ, "KNOTD_DIST_DIR": str(out_dir)}
    if version:
        env["KNOTD_DEB_VERSION"] = version
    proc = subprocess.run([str(BUILD_SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"build.sh failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    debs = sorted(out_dir.glob("knotd_*_amd64.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"build.sh left {len(debs)} packages in {out_dir}")
    return debs[0], proc.stdout + proc.stderr


def repack_with_version(deb: Path, version: str, out_dir: Path, timeout: float = 300) -> Path:
    """The same package under another version, as an upgrade to test the maintainer scripts with.

    Rebuilding from source would take another 1–2 minutes for an identical tree; what an upgrade
    exercises (prerm/postinst, conffile handling, the restart) only needs a higher version.
    """
    tree = out_dir / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, timeout=timeout)
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: .*$", f"Version: {version}", control.read_text(), flags=re.MULTILINE))
    out = out_dir / f"knotd_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zzstd", "--build", str(tree), str(out)],
                   check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree, ignore_errors=True)
    return out


def doc_commands(block: str) -> list[str]:
    """The shell lines of the ```sh block after ``<!-- boot-test:<block> -->`` in docs/install.md."""
    text = INSTALL_DOC.read_text()
    match = re.search(rf"<!-- boot-test:{re.escape(block)} -->\s*```sh\n(.*?)```", text, re.DOTALL)
    if not match:
        raise LookupError(f"docs/install.md has no boot-test:{block} block")
    return [line for line in match.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def as_root_in(line: str, substitutions: dict[str, str], deb: Path | None = None) -> str:
    """A documented command as the test runs it: as root (no sudo), with the test's values."""
    line = line.replace("sudo ", "")
    for placeholder, value in substitutions.items():
        line = line.replace(placeholder, value)
    if deb is not None and DEB_NAME.search(line):
        line = f"cd {shlex.quote(str(deb.parent))} && " + DEB_NAME.sub(deb.name, line)
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandinProcess:
    """The LiveKit protocol stand-in (tests/livekit_standin.py) as a host process on loopback."""

    def __init__(self, api_key: str, api_secret: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "LIVEKIT_API_KEY": api_key, "LIVEKIT_API_SECRET": api_secret}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.livekit_standin", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        buffer = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read() or b""
            buffer += chunk
            if b"READY " in buffer:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"stand-in not ready in {timeout}s: {buffer!r} {self.log_path.read_text()[-2000:]}")

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_standin/state", timeout=5) as resp:
            return json.load(resp)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


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
