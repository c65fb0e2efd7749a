"""Reading knotd's TOML files (the config, and the data files operators may replace: guardrail rules, the phase
script), and saying where in them a key stands, so every error names the key and ``file:line``."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from knotd.errors import ConfigError

_HEADER = re.compile(r"^\[\[?\s*([A-Za-z0-9_.\-]+)\s*\]\]?")


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


class Locator:
    """``file:line`` of keys in TOML text (tomllib keeps no positions).

    Args:
        source: the file's name as errors show it.
        text: its text; empty for built-in defaults (nothing is then found).
    """

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self._lines = text.splitlines()

    def __call__(self, dotted: str) -> str | None:
        """Where ``dotted`` stands: the line of ``key = …`` in its table (``section.key``, ``key`` at the top),
        else the ``[dotted]`` header; None when neither is in the text."""
        table, _, key = dotted.rpartition(".")
        number = self._key_line(table, key) or self._header_line(dotted)
        return f"{self.source}:{number}" if number else None

    def nearest(self, dotted: str) -> str:
        """Like calling it, but falls back to the nearest enclosing table, then to the file."""
        parts = dotted.split(".")
        found = self(dotted)
        for cut in range(len(parts) - 1, 0, -1):
            if found:
                return found
            number = self._header_line(".".join(parts[:cut]))
            found = f"{self.source}:{number}" if number else None
        return found or self.source

    def of_value(self, key: str, value: str) -> str:
        """Where ``key = "value"`` stands in any table (an entry of an array of tables), else the file."""
        wanted = re.compile(rf"""^\s*{re.escape(key)}\s*=\s*["']{re.escape(value)}["']""")
        for number, line in enumerate(self._lines, 1):
            if wanted.match(line):
                return f"{self.source}:{number}"
        return self.source

    def error(self, dotted: str, reason: str) -> ConfigError:
        """A ConfigError at ``dotted``, located as near as the text allows."""
        return ConfigError(dotted, reason, self.nearest(dotted))

    def _key_line(self, table: str, key: str) -> int | None:
        current = ""
        for number, line in enumerate(self._lines, 1):
            stripped = line.strip()
            header = _HEADER.match(stripped)
            if header:
                current = header.group(1)
            elif current == table and re.match(rf"^{re.escape(key)}\s*=", stripped):
                return number
        return None

    def _header_line(self, table: str) -> int | None:
        for number, line in enumerate(self._lines, 1):
            header = _HEADER.match(line.strip())
            if header and header.group(1) == table:
                return number
        return None
