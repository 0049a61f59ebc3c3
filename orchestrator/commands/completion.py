"""`nas-scam completion bash|zsh|fish`: the shell script that makes TAB complete nas-scam's commands,
options and choices (argcomplete asks the parser itself, so completion never lags behind the CLI)."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh", "fish")


def add_parser(sub) -> None:
    from orchestrator.cli import example

    p = sub.add_parser("completion", help="print the shell script that enables tab completion",
                       description="Print a tab-completion script for nas-scam (argcomplete). Load it in the "
                                   "current shell with eval, or add that line to ~/.bashrc (zsh: ~/.zshrc).",
                       epilog=example('eval "$(nas-scam completion bash)"'))
    p.add_argument("shell", nargs="?", default="bash", choices=SHELLS, help="the shell (default bash)")
    p.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    try:
        import argcomplete
    except ImportError:
        raise ValueError("tab completion needs argcomplete: pip install argcomplete") from None
    print(argcomplete.shellcode(["nas-scam"], shell=args.shell), end="")
    return 0
