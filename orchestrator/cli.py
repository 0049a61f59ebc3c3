"""The orchestrator's commands: one sub-command module per area under ``orchestrator/commands``.

``python -m orchestrator.cli`` runs them (the entrypoint of Ray jobs); the console command
``nas-scam`` (nas_scam/cli.py) is this parser plus the API's ``serve``. Each command module exposes
``add_parser(subparsers)`` and sets ``func`` on its parser; every (sub)command has a description and
one example (``example``), which tests/orchestrator/test_cli.py parses. Heavy imports (torch, ray, mlflow)
happen inside the command functions so ``nas-scam --help`` and tab completion stay fast.

Tab completion: argcomplete answers when the shell asks (``_ARGCOMPLETE`` set); ``nas-scam completion
bash`` prints the script to source.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
from collections.abc import Sequence

# order = order in --help
COMMAND_MODULES = [f"orchestrator.commands.{name}"
                   for name in ("model", "data", "engine", "ablate", "serve", "completion")]


def example(*commands: str) -> str:
    """A parser's epilog: ``example:`` and one command line per argument (``build_parser`` keeps the
    line breaks)."""
    return "example:\n" + "\n".join(f"  {c}" for c in commands)


def preset_choices() -> list[str]:
    """The presets every ``--preset`` accepts (nas_core.config.PRESETS; importing it loads no torch)."""
    from nas_core.config import PRESETS

    return sorted(PRESETS)


def subparsers_of(parser: argparse.ArgumentParser):
    """(name, help, subparser) of every sub-command directly under ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name), sub


class _HelpFormatter(argparse.HelpFormatter):
    """Descriptions wrapped to the terminal as usual; an ``example`` epilog keeps its lines."""

    def _fill_text(self, text, width, indent):
        if text.startswith("example:"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every parser of the tree: examples keep their line breaks; a sub-command without a description
    of its own gets its one-line help."""
    parser.formatter_class = _HelpFormatter
    for _, help_text, sub in subparsers_of(parser):
        if not sub.description and help_text:
            sub.description = help_text[:1].upper() + help_text[1:] + "."
        _finish(sub)


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
        epilog=example("nas-scam ablate experiments/table2.yaml --plan --device-profile h200",
                       'eval "$(nas-scam completion bash)"   # tab completion in this shell'),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).add_parser(sub)
    _finish(parser)
    return parser


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer a shell's tab-completion request and exit, when this is one (argcomplete sets
    ``_ARGCOMPLETE``); nothing otherwise, or when argcomplete is not installed."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit status 2."""


def os_error_line(exc: OSError) -> str:
    """One line naming the path: ``/data/out: Read-only file system`` (``str(exc)`` for our own messages)."""
    if exc.filename is None or not exc.strerror:
        return str(exc)
    path = str(exc.filename) if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"{path}: {exc.strerror}"


def no_colour_reset_at_exit() -> None:
    """Drop colorama's exit handler, which writes ``ESC[0m`` to a terminal after our last line.

    Ray's vendored colorama is initialised when Ray's CLI logger is imported (``ray.init`` does), and
    registers ``colorama.initialise.reset_all`` with atexit; nothing of ours prints colour, so the reset
    is only a stray escape code at the end of the output (issue 25)."""
    module = sys.modules.get("colorama.initialise")
    reset_all = getattr(module, "reset_all", None)
    if reset_all is not None:
        atexit.unregister(reset_all)


def main(argv: list[str] | None = None, modules: Sequence[str] = COMMAND_MODULES,
         parser: argparse.ArgumentParser | None = None) -> int:
    """Run one command; ``parser``: ``build_parser(modules)``'s, when the caller built (and amended) it."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = parser or build_parser(modules)
    if argv is None:
        complete(parser)
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
    finally:
        no_colour_reset_at_exit()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
