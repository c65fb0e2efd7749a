"""Reading the TOML data files knotd ships and operators may replace (guardrail rules, the phase script)."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from knotd.errors import ConfigError


def read_data_file(config_key: str, path: Path | str | None, shipped: str) -> tuple[str, str]:
    """The text of ``path``, or of the shipped ``knotd/data/<shipped>`` when ``path`` is empty, and its name.

    Raises:
        ConfigError: at ``config_key`` when the file cannot be read.
    """
    if not path:
        text = resources.files("knotd").joinpath(f"data/{shipped}").read_text(encoding="utf-8")
        return text, f"<shipped {shipped}>"
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except FileNotFoundError:
        raise ConfigError(config_key, f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(config_key, f"cannot read {path}: {type(err).__name__}") from None


def parse_toml(config_key: str, text: str, source: str) -> dict[str, Any]:
    """TOML text as a dict. Raises ConfigError at ``config_key``, naming ``source``, for invalid TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(config_key, f"invalid TOML: {err}", source) from None
