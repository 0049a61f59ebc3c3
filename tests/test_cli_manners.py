"""`nas-scam` behaves like the CLIs people know: --version, help on every option, examples that exist."""
import argparse
import re
from pathlib import Path

import pytest

from nas_scam.cli import build_parser, main
from orchestrator.cli import version

ROOT = Path(__file__).resolve().parents[1]


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("nas-scam",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


ALL = list(_parsers(build_parser()))


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"nas-scam {version()}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version())


@pytest.mark.parametrize("path,parser", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_option_and_argument_has_help(path, parser):
    assert len(ALL) > 15  # the walk reaches the nested actions (model info, data synth, ...)
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert not missing, f"{' '.join(path)}: no help for {', '.join(missing)}"


@pytest.mark.parametrize("path,parser", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_files_named_in_help_exist(path, parser):
    text = parser.format_help()
    for name in re.findall(r"\b((?:experiments|tests|docker)/[\w./-]+\.(?:ya?ml|json|csv))", text):
        assert (ROOT / name).is_file(), f"`{' '.join(path)} --help` names {name}, which does not exist"


def test_model_info_and_ablate_share_method_names(capsys):
    from nas_core.models import create_model
    from nas_core.models.registry import MODEL_ALIASES, model_names
    from orchestrator.commands.model import MODEL_NAMES
    from orchestrator.specs import METHODS

    assert MODEL_NAMES == model_names()
    # every Table 2 baseline is a registry model of the same name; NAS-SCAM ids add their search mode
    for method in METHODS.values():
        assert method.model in model_names()
        if method.search is None:
            assert method.model == method.id
        elif method.control_of:  # a random control names the searched variant it controls
            assert METHODS[method.control_of].model == method.model
    # the old registry names still build the same model and say their canonical name
    for old, new in MODEL_ALIASES.items():
        assert create_model(old).model_spec["name"] == new
    assert main(["model", "info", "unet-cbam", "--size", "32", "--json"]) == 0
    assert '"name": "cbam"' in capsys.readouterr().out
