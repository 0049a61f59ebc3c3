"""`nas-scam`: the orchestrator's commands plus the API's ``serve``, in one parser.

It lives above both packages because ``serve`` needs the API and the API needs the orchestrator:
imports run nas_scam -> api -> orchestrator -> nas_core. Ray jobs run ``python -m orchestrator.cli``
instead, which knows every command but ``serve`` and never imports the API.
"""

from __future__ import annotations

import sys

from orchestrator import cli

# order = order in --help
COMMAND_MODULES = [*cli.COMMAND_MODULES, "api.serve"]
# examples of the commands whose modules do not give one (the API's own command)
EXAMPLES = {"serve": ("NAS_SCAM_API_KEYS=change-me nas-scam serve --port 8000",)}


def build_parser():
    parser = cli.build_parser(COMMAND_MODULES)
    for name, _, sub in cli.subparsers_of(parser):
        if not sub.epilog and name in EXAMPLES:
            sub.epilog = cli.example(*EXAMPLES[name])
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, COMMAND_MODULES, parser=build_parser())


if __name__ == "__main__":
    sys.exit(main())
