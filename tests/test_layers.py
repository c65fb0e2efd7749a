"""The layering in pyproject.toml's import-linter contracts holds (conversation ← agent ← daemon → status)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept():
    """`lint-imports` passes: the conversation core is pure, the agent reports only through its observer,
    the status server reads snapshots only, and no layer imports one above it."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
