"""What every benchmark prints about the machine it ran on (imported by the scripts; prints nothing itself)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """One line: CPUs and model, kernel, Python."""
    return (f"{os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")
