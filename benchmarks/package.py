"""Package numbers: .deb sizes, build times, lintian, and install/start/stop/upgrade/purge times in booted
Debian 12 and Debian 13 containers, and the unit's systemd-analyze exposure score.

    sudo .venv/bin/python benchmarks/package.py [--debs DIR]

Builds the packages (unless --debs names a directory holding knotd_*+deb12_amd64.deb, knotd_*+deb13_amd64.deb
and knotd-model-whisper-base_*_all.deb), then runs the root tests of tests/test_package.py against them and
prints what they measured. Needs root, systemd-nspawn, debootstrap, debhelper, dh-virtualenv and lintian,
like those tests.
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
from tests.nspawn.package import build_debs

RELEASES = ("bookworm", "trixie")
ROWS = [
    ("build_model_s", "build knotd-model-whisper-base (dpkg-buildpackage -A)", "s", ""),
    ("model_deb_mb", "knotd-model-whisper-base .deb", "MB", ""),
    ("build_{r}_s", "build knotd (dpkg-buildpackage -B, venv from PyPI, xz)", "s", "r"),
    ("deb_{r}_mb", "knotd .deb", "MB", "r"),
    ("lintian_{r}_s", "lintian on knotd + model", "s", "r"),
    ("lintian_{r}_info_tags", "lintian I: tags left (E: and W: are 0)", "", "r"),
    ("rootfs_{r}_s", "rootfs ready (debootstrap once, then cached)", "s", "r"),
    ("boot_{r}_s", "container boot to 'running'", "s", "r"),
    ("apt_install_{r}_s", "apt install both .debs (deps from apt cache)", "s", "r"),
    ("systemctl_start_{r}_s", "systemctl start → active (READY=1, real LiveKit)", "s", "r"),
    ("systemctl_stop_{r}_s", "systemctl stop (drain, 0 sessions)", "s", "r"),
    ("apt_upgrade_{r}_s", "apt install of a higher version (stop, unpack, compile, start)", "s", "r"),
    ("apt_purge_{r}_s", "apt purge (running knotd)", "s", "r"),
    ("exposure_container_{r}", "systemd-analyze security (installed, booted)", "", "r"),
    ("exposure_offline", "systemd-analyze security --offline (unit file)", "", ""),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--debs", type=Path, help="measure the packages in this directory instead of building")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/package.py: needs root (dpkg-buildpackage in nspawn, systemd-nspawn)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="knotd-bench-") as tmp:
        numbers: dict[str, float] = {}
        debs = args.debs
        if debs is None:
            debs = Path(tmp) / "dist"
            debs.mkdir()
            for key, release, kw in (("build_model_s", "bookworm", {"indep_only": True}),
                                     ("build_bookworm_s", "bookworm", {"arch_only": True}),
                                     ("build_trixie_s", "trixie", {"arch_only": True})):
                started = time.monotonic()
                build_debs(debs, release, **kw)
                numbers[key] = time.monotonic() - started
        timings = Path(tmp) / "timings.json"
        env = {**os.environ, "KNOTD_TEST_DEBS": str(debs.resolve()), "KNOTD_PACKAGE_TIMINGS": str(timings),
               "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_package.py",
             "-k", "Boot or exposure or lintian"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600, check=False,
        )
        if timings.exists():
            numbers.update({k: v for k, v in json.loads(timings.read_text()).items() if k not in numbers})
        summary = proc.stdout.strip().splitlines()[-1:] or ["(no pytest output)"]

    print(f"knotd package numbers — {os.cpu_count()} cores, {cpu_model()}, {platform.release()}")
    print(f"{'what':<64} {'Debian 12':>10} {'Debian 13':>10}")
    for key, label, unit, per_release in ROWS:
        values = [numbers.get(key.format(r=r)) for r in RELEASES] if per_release else [numbers.get(key), None]
        if all(v is None for v in values):
            continue
        cells = [f"{v:>7.1f} {unit:<2}" if v is not None else f"{'':>10}" for v in values]
        print(f"{label:<64} {cells[0]:>10} {cells[1]:>10}")
    print(f"package tests: {summary[0]}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
