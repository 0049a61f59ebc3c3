"""`nas-scam` behaves like the CLIs people know: --version, help on every option, examples that exist."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_core.config import load_config
from nas_core.search_space.genotype import Genotype, GenotypeError
from nas_scam.cli import build_parser, main
from orchestrator.cli import version
from tests.helpers import _one_line_error

ROOT = Path(__file__).resolve().parents[2]


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


# ---------------------------------------------------------------- issue 25 item 6: CLI manners, round 2
def _example_argv(parser: argparse.ArgumentParser) -> list[list[str]]:
    """The command lines of a parser's ``example:`` epilog, as argv lists (after ``nas-scam``)."""
    import shlex

    out = []
    for line in (parser.epilog or "").splitlines()[1:]:
        text = line.split("nas-scam ", 1)[1].split("#", 1)[0].rstrip().removesuffix(')"')
        out.append(shlex.split(text))
    return out


@pytest.mark.parametrize("path,parser", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_subcommand_has_a_description_and_an_example_that_parses(path, parser):
    assert parser.description and len(parser.description) > 20, f"{' '.join(path)}: no description"
    assert (parser.epilog or "").startswith("example:\n  "), f"{' '.join(path)}: no example"
    examples = _example_argv(parser)
    assert examples and all(argv[:len(path) - 1] == list(path[1:]) for argv in examples), examples
    # the example parses with the real parser (files it names need not exist: parsing opens none)
    for argv in examples:
        assert build_parser().parse_args(argv).func
    # --help keeps the example's line breaks
    assert "\nexample:\n  " in parser.format_help()


def test_preset_is_a_choice_of_the_known_presets_everywhere():
    from nas_core.config import PRESETS

    seen = []
    for path, parser in ALL:
        for action in parser._actions:
            if "--preset" in action.option_strings:
                seen.append(" ".join(path[1:]))
                assert action.choices is not None and sorted(action.choices) == sorted(PRESETS), path
    assert {"search", "train", "ablate", "hpo"} <= set(seen)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate", "experiments/table2.yaml", "--preset", "smok"])


def test_the_parser_is_built_without_torch_or_pydantic():
    # argcomplete builds it on every TAB, --help on every call: it must stay a fraction of a second
    code = ("import sys\nfrom nas_scam.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'pydantic', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_completion_script_and_tab_completion_of_commands_and_choices(capsys):
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete " in script and "nas-scam" in script and "_ARGCOMPLETE" in script
    exe = Path(sys.executable).with_name("nas-scam")
    if not exe.exists():
        pytest.skip("the nas-scam console script is not installed in this environment")

    def tab(line: str) -> set[str]:
        # what the script above asks the program when TAB is pressed after `line` (argcomplete's protocol)
        env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_SHELL": "bash", "COMP_LINE": line,
               "COMP_POINT": str(len(line)), "_ARGCOMPLETE_IFS": "\n"}
        out = subprocess.run(f"'{exe}' 8>&1 9>/dev/null 1>/dev/null 2>/dev/null", shell=True, env=env,
                             capture_output=True, text=True, timeout=60, cwd=ROOT).stdout
        return {w.strip() for w in out.split("\n") if w.strip()}

    assert tab("nas-scam abl") == {"ablate"}
    assert tab("nas-scam ablate experiments/table2.yaml --preset ") == {"smoke", "small-data"}
    assert tab("nas-scam data prepare x --stain ") == {"none", "reinhard", "macenko"}


@pytest.mark.parametrize("argv,stain", [([], "macenko"), (["--protocol", "code"], "none"),
                                        (["--stain", "reinhard"], "reinhard")])
def test_data_prepare_defaults_to_the_protocols_stain(monkeypatch, tmp_path, argv, stain):
    import nas_core.data.prepare as prep
    from nas_core.config import protocol_table

    assert protocol_table("paper")["data"]["stain"] == "macenko"
    seen = {}

    class Stop(Exception):
        pass

    def fake_prepare(source, out, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(prep, "prepare", fake_prepare)
    with pytest.raises(Stop):
        main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "c"), *argv])
    assert seen["stain"] == stain


def test_one_version_everywhere():
    import tomllib

    import nas_core

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # pyproject reads its version from nas_core.__version__: one place to change it
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "nas_core.__version__"}
    assert version() == nas_core.__version__


def test_the_apis_docs_show_the_package_version():
    from api.main import create_app
    from orchestrator.settings import Settings

    app = create_app(Settings(api_keys=["k"]))
    assert app.openapi()["info"]["version"] == version()


def test_optuna_dashboard_has_an_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("optuna-dashboard") for req in extras["dashboard"])
    assert any(req.startswith("argcomplete") for req in
               tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_no_stray_escape_code_after_the_last_line_on_a_terminal():
    """Ray's vendored colorama (initialised when ray.init imports Ray's CLI logger) writes ESC[0m at exit
    to a terminal stdout; a command's output must end with its own last line."""
    import pty
    import select

    code = ("import ray.autoscaler._private.cli_logger\n"  # what ray.init imports: colorama.init + atexit
            "import sys\nfrom nas_scam.cli import main\nsys.exit(main(['completion', 'bash']))\n")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            cwd=ROOT)
    os.close(slave)
    raw = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            break
        raw += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    assert b"_ARGCOMPLETE" in raw and b"\x1b" not in raw[-50:], raw[-50:]


# ---------------------------------------------------------------- errors: one line naming the file, no silent overwrites
def test_a_list_where_an_op_name_belongs_names_slot_and_edge(tmp_path, capsys):
    d = Genotype.uniform("parallel", "synchronous", "conv3", "conv3").to_dict()
    d["sam"][2][4] = ["conv3", "conv5"]
    with pytest.raises(GenotypeError, match=r"sam slot 2 edge 4: unknown op \['conv3', 'conv5'\]"):
        Genotype.from_json(json.dumps(d))
    d = Genotype.uniform("parallel", "synchronous", "conv3", "conv3").to_dict()
    d["cam"][7][0] = {"op": "conv3"}
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(d))
    rc = main(["model", "info", "nas-scam-p", "--genotype", str(path)])
    _one_line_error(capsys, rc, str(path), "cam slot 7 edge 0")


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A 3-image synthetic dataset, a U-Net checkpoint with 32 px tiles and a 48 px PNG."""
    import cv2

    from nas_core.data.synthetic import write_synthetic
    from nas_core.engine.checkpoint import save_checkpoint
    from nas_core.models import create_model

    root = tmp_path_factory.mktemp("assets")
    write_synthetic(root / "syn", n_images=3, size=64, seed=0)
    torch.manual_seed(0)
    cfg = load_config(overrides=["model.name=unet", "data.crop_size=32", "data.stride=32"])
    ckpt = save_checkpoint(root / "u.pt", model=create_model("unet"), config=cfg.to_dict(), phase="train", epoch=0)
    image = root / "cell.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    return {"syn": root / "syn", "ckpt": ckpt, "image": image}


def _unwritable(tmp_path: Path, kind: str) -> Path:
    """An --out that cannot be created: under a regular file, or in a read-only folder."""
    if kind == "not a folder":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        return blocker / "out"
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro / "out"
    # root writes through chmod; /sys refuses new entries even to root
    probe = Path("/sys/nas-scam-hardening-probe")
    try:
        probe.mkdir()
    except OSError:
        return probe / "out"
    probe.rmdir()
    pytest.skip("no read-only location for root on this machine")


@pytest.mark.parametrize("kind", ["not a folder", "read-only"])
@pytest.mark.parametrize("command", ["train", "search", "predict", "data synth", "data prepare", "evaluate"])
def test_an_unwritable_out_is_one_line_naming_it(home, tmp_path, capsys, tiny_assets, command, kind):
    out = _unwritable(tmp_path, kind)
    argv = {
        "train": ["train", "--preset", "smoke", "--set", "model.name=unet", "--out", str(out)],
        "search": ["search", "--preset", "smoke", "--out", str(out)],
        "predict": ["predict", "--checkpoint", str(tiny_assets["ckpt"]), str(tiny_assets["image"]), "--out", str(out)],
        "data synth": ["data", "synth", "--images", "1", "--size", "64", "--out", str(out)],
        "data prepare": ["data", "prepare", str(tiny_assets["syn"]), "--out", str(out), "--crop-size", "32",
                         "--stride", "32"],
        "evaluate": ["evaluate", "--checkpoint", str(tiny_assets["ckpt"]), "--out", str(out)],
    }[command]
    rc = main(argv)
    err = _one_line_error(capsys, rc)
    assert str(out.parent) in err, err


def test_synth_never_replaces_a_dataset_without_overwrite(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "synth", "--images", "1", "--size", "64", "--seed", "1", "--out", str(out)]) == 0
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    capsys.readouterr()
    rc = main(["data", "synth", "--images", "1", "--size", "64", "--seed", "2", "--out", str(out)])
    _one_line_error(capsys, rc, str(out), "--overwrite")
    assert {p: p.read_bytes() for p in files} == before
    assert main(["data", "synth", "--images", "1", "--size", "64", "--seed", "2", "--out", str(out),
                 "--overwrite"]) == 0
    assert {p: p.read_bytes() for p in files} != before


def test_predict_never_replaces_predictions_without_overwrite(tmp_path, capsys, tiny_assets):
    out = tmp_path / "pred"
    argv = ["predict", "--checkpoint", str(tiny_assets["ckpt"]), str(tiny_assets["image"]), "--out", str(out)]
    assert main(argv) == 0
    geo = out / "cell.geojson"
    geo.write_text("earlier")  # stands for an earlier prediction
    capsys.readouterr()
    _one_line_error(capsys, main(argv), "cell_labels.png", "--overwrite")
    assert geo.read_text() == "earlier"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(geo.read_text())["type"] == "FeatureCollection"


def test_a_genotype_nested_past_the_parser_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)  # was a RecursionError traceback
    rc = main(["model", "info", "nas-scam-p", "--genotype", str(deep)])
    _one_line_error(capsys, rc, str(deep), "nested far too deeply")


def test_a_seed_past_32_bits_is_refused(home, tmp_path, capsys):
    rc = main(["train", "--preset", "smoke", "--set", "model.name=unet", "--set", "seed=1099511627776",
               "--out", str(tmp_path / "out")])
    _one_line_error(capsys, rc, "seed must be <= 2147483647", "got 1099511627776")
