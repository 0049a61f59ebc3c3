"""The orchestrator's commands: one sub-command module per area under ``orchestrator/commands``.

``python -m orchestrator.cli`` runs them (the entrypoint of Ray jobs); the console command
``nas-scam`` (nas_scam/cli.py) is this parser plus the API's ``serve``. Each command module exposes
``add_parser(subparsers)`` and sets ``func`` on its parser. Heavy imports (torch, ray, mlflow) happen
inside the command functions so ``nas-scam --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# order = order in --help
COMMAND_MODULES = [f"orchestrator.commands.{name}" for name in ("model", "data", "engine", "ablate", "serve")]


def version() -> str:
    """The installed distribution's version (the source tree's when run uninstalled)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("nas-scam")
    except PackageNotFoundError:
        from nas_core import __version__

        return __version__


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The parser of the commands that ``modules`` (module names, in --help order) add."""
    parser = argparse.ArgumentParser(
        prog="nas-scam",
        description="NAS-SCAM: searched spatial/channel attention for nuclei segmentation, reproducibly.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).add_parser(sub)
    return parser


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def os_error_line(exc: OSError) -> str:
    """One line naming the path: ``/data/out: Read-only file system`` (``str(exc)`` for our own messages)."""
    if exc.filename is None or not exc.strerror:
        return str(exc)
    path = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{path}: {exc.strerror}"


def main(argv: list[str] | None = None, modules: Sequence[str] = COMMAND_MODULES) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, ValueError) as exc:
        # user-facing errors: the message names the culprit; no stack trace
        print(f"nas-scam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # a read-only or non-folder --out, a full disk, a missing file: handled here once for every command
        print(f"nas-scam {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
