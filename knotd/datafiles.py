"""Reading knotd's TOML files (the config, and the data files operators may replace: guardrail rules, the phase
script), and saying where in them a key stands, so every error names the key and ``file:line``."""

from __future__ import annotations

import errno
import os
import re
import stat
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from knotd.errors import ConfigError

# Config, rules and scripts are a few KiB; anything far larger is a mistake (or /dev/zero).
MAX_DATA_FILE_BYTES = 1 << 20

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
        return read_small_file(path).decode("utf-8"), str(path)
    except FileNotFoundError:
        raise ConfigError(config_key, f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(config_key, f"cannot read {path}: not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(config_key, f"cannot read {path}: {describe_os_error(err)}") from None


def read_small_file(path: Path, limit: int = MAX_DATA_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; never blocks on a FIFO or reads a device.

    Raises:
        OSError: cannot be opened, is not a regular file (EINVAL), or is larger than ``limit`` (EFBIG).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit // 1024} KiB")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit // 1024} KiB")
        return data
    finally:
        os.close(fd)


def describe_os_error(err: OSError) -> str:
    """``strerror`` of an OSError, for a person ("Permission denied", "Too many levels of symbolic links")."""
    return err.strerror or type(err).__name__


def parse_toml(config_key: str, text: str, source: str) -> dict[str, Any]:
    """TOML text as a dict. Raises ConfigError at ``config_key``, naming ``source``, for invalid TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(config_key, f"invalid TOML: {err}", source) from None
    except RecursionError:
        raise ConfigError(config_key, "invalid TOML: arrays or tables nested too deeply", source) from None


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
