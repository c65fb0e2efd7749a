"""Package numbers: .deb size, build time, install/start/stop/upgrade/purge times in a booted Debian 12,
and the unit's systemd-analyze exposure score.

    sudo .venv/bin/python benchmarks/package.py [--deb dist/knotd_X_amd64.deb]

Builds the .deb (unless --deb is given), then runs the root boot tests of tests/test_package.py against it
and prints what they measured. Needs root, systemd-nspawn and debootstrap, like those tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._machine import cpu_model
from tests.nspawn.package import build_deb

ROWS = [
    ("build_s", "build (venv + model + dpkg-deb zstd)", "s"),
    ("deb_mb", ".deb size", "MB"),
    ("installed_mb", "installed size (Installed-Size)", "MB"),
    ("rootfs_s", "rootfs ready (debootstrap once, then cached)", "s"),
    ("boot_s", "container boot to 'running'", "s"),
    ("apt_install_s", "apt install ./knotd.deb (deps from apt cache)", "s"),
    ("systemctl_start_s", "systemctl start → active (READY=1)", "s"),
    ("systemctl_stop_s", "systemctl stop (drain, 0 sessions)", "s"),
    ("apt_upgrade_s", "apt install of a higher version (stop, unpack, start)", "s"),
    ("apt_purge_s", "apt purge (running knotd)", "s"),
    ("exposure_offline", "systemd-analyze security --offline (unit file)", ""),
    ("exposure_container", "systemd-analyze security (installed, booted)", ""),
]


def _cpu() -> str:
    return cpu_model()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb", type=Path, help="measure this package instead of building one")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/package.py: needs root (build namespace, systemd-nspawn)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="knotd-bench-") as tmp:
        numbers: dict[str, float] = {}
        deb = args.deb
        if deb is None:
            started = time.monotonic()
            deb, _ = build_deb(Path(tmp) / "dist")
            numbers["build_s"] = time.monotonic() - started
        installed_kib = subprocess.run(["dpkg-deb", "-f", str(deb), "Installed-Size"], capture_output=True,
                                       text=True, check=True).stdout.strip()
        numbers["installed_mb"] = int(installed_kib) / 1024
        timings = Path(tmp) / "timings.json"
        env = {**os.environ, "KNOTD_TEST_DEB": str(deb.resolve()), "KNOTD_PACKAGE_TIMINGS": str(timings),
               "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_package.py",
             "-k", "Boot or exposure"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False,
        )
        if timings.exists():
            numbers.update({k: v for k, v in json.loads(timings.read_text()).items() if k != "build_s"})
        summary = proc.stdout.strip().splitlines()[-1:] or ["(no pytest output)"]

    print(f"knotd package numbers — {os.cpu_count()} cores, {_cpu()}, {platform.release()}")
    print(f"{'what':<58} {'value':>9}")
    for key, label, unit in ROWS:
        if key in numbers:
            value = numbers[key]
            print(f"{label:<58} {value:>7.1f} {unit}")
    print(f"boot tests: {summary[0]}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
