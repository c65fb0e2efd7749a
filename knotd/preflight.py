"""What ``knotd check-config`` checks beyond the config file itself: everything ``knotd run`` would find wrong
only at run time. Every file the daemon loads is loaded (the guardrail rules, the phase script), the model
directory is looked at, the status address is bound for a moment, and the state directory is written to.
Each problem is a ``ConfigError`` naming the key, so the operator sees one line and exit 2.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from pathlib import Path

from knotd.config import ListenAddress, Settings
from knotd.conversation.guardrails import Guardrail
from knotd.conversation.phases import PhaseScript
from knotd.datafiles import describe_os_error
from knotd.errors import ConfigError, ModelError
from knotd.speech.models import check_model_dir


def check_runtime(settings: Settings) -> list[str]:
    """Run every check; return notes for the operator (not errors). Raises ConfigError on the first problem."""
    notes = []
    Guardrail.load(settings.guardrails.rules or None)
    PhaseScript.load(settings.session.phases or None)
    check_model(settings.stt.model)
    note = check_listen("status.listen", settings.status.listen)
    if note:
        notes.append(note)
    check_state_dir(settings.session.state_dir)
    return notes


def check_model(path: str) -> None:
    try:
        check_model_dir(Path(path))
        for name in ("model.bin", "config.json", "tokenizer.json"):
            _check_readable(Path(path) / name)
    except ModelError as err:
        raise ConfigError("stt.model", str(err)) from None
    except OSError as err:
        raise ConfigError("stt.model", f"cannot read the model in {path}: {describe_os_error(err)}") from None


def _check_readable(path: Path) -> None:
    """A regular file this process may read (opened without blocking: a FIFO must not hang the check)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path.name} is not a regular file")
        os.read(fd, 1)
    finally:
        os.close(fd)


def check_listen(key: str, listen: ListenAddress) -> str | None:
    """Bind ``listen`` for a moment. An address in use is a note (a running knotd holds it), not an error."""
    try:
        infos = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, socket.gaierror) else "not a valid host name"
        raise ConfigError(key, f"cannot resolve {listen.host!r}: {reason}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"{listen} is in use now (a running knotd?); `knotd run` needs it free"
            raise ConfigError(key, f"cannot listen on {listen}: {describe_os_error(err)}") from None
    return None


def check_state_dir(path: str) -> None:
    """The state directory (or, if it does not exist yet, the nearest existing parent) takes a file."""
    directory = Path(path)
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        if not directory.is_dir():
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        fd, probe = tempfile.mkstemp(prefix=".knotd-check-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError("session.state_dir", f"cannot write to {directory}: {describe_os_error(err)}") from None
