"""One source of truth per protocol: the tables in nas_core/config.py, checked against the dataclasses,
against the resolved config of every Table 2 trial and against method.md's protocol table."""

import re
from pathlib import Path

import pytest

from nas_core.config import PROTOCOLS, RunConfig, diff_from_protocol, flatten, load_config
from orchestrator.cli import build_parser
from orchestrator.commands.ablate import _load
from orchestrator.plan import IDENTITY, trial_list
from orchestrator.specs import METHODS, build_config, run_name

ROOT = Path(__file__).resolve().parents[1]
METHOD_MD = ROOT.parent / "shared" / "docs" / "method.md"
TABLE2 = ROOT / "experiments" / "table2.yaml"


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_each_table_is_complete_and_is_what_load_config_applies(protocol):
    fields = set(flatten(RunConfig().to_dict()))
    assert set(flatten(PROTOCOLS[protocol])) == fields  # no field left to a dataclass default
    cfg = load_config(overrides=[f"protocol={protocol}"])
    assert flatten(cfg.to_dict()) == flatten(PROTOCOLS[protocol])
    assert diff_from_protocol(cfg) == {}
    moved = load_config(overrides=[f"protocol={protocol}", "train.lr=0.5"])
    assert diff_from_protocol(moved) == {"train.lr": (PROTOCOLS[protocol]["train"]["lr"], 0.5)}


@pytest.mark.parametrize("name", ["paper.yaml", "code.yaml"])
def test_protocol_yaml_files_only_pick_the_table(name):
    cfg = load_config(ROOT / "experiments" / name)
    assert diff_from_protocol(cfg) == {} and cfg.protocol == name.split(".")[0]


# ---- method.md section 5: each row mapped explicitly to RunConfig fields
def _number(text: str, after: str = "") -> float:
    m = re.search(re.escape(after) + r"\s*([0-9.]+(?:e-?[0-9]+)?)", text)
    assert m, f"no number after {after!r} in {text!r}"
    return float(m.group(1))


ROWS = {
    "search epochs": lambda cell: {"search.epochs": int(_number(cell))},
    "w-only warm-up": lambda cell: {"search.warmup_epochs": int(_number(cell, "first"))},
    "alternation after warm-up": lambda cell: {
        "search.alternation": "iteration" if "per iteration" in cell else "epoch" if "per epoch" in cell else cell},
    "lr w / lr alpha": lambda cell: dict(zip(("search.lr_w", "search.lr_alpha"),
                                             (float(x) for x in cell.split("/")))),
    "optimiser state": lambda cell: {"search.reset_optimizer_each_epoch": "rebuilt every search epoch" in cell},
    'retrain ("rebuild")': lambda cell: {"train.epochs": int(_number(cell)), "train.lr": _number(cell, "lr")},
    "loss": lambda cell: {"loss.name": "exp_log" if cell.startswith("exponential logarithmic")
                          else "exp_log_dice" if cell.startswith("the Dice term only") else cell},
    "augmentation": lambda cell: {"augment.pipeline": "paper" if "elastic" in cell
                                  else "code" if cell.startswith("Gaussian blur only") else cell},
    "zero op on sigmoid edges": lambda cell: {"model.zero_op": {"0": "paper", "0.5": "code"}[cell]},
}


def _method_md_expectations() -> dict[str, dict[str, object]]:
    """{protocol: {dotted field: value}} read from method.md (section 5's table, sections 5a and 6)."""
    if not METHOD_MD.is_file():
        pytest.skip(f"{METHOD_MD} is absent (the shared docs are not checked out beside the repository)")
    text = METHOD_MD.read_text()
    section = text[text.index("## 5. Optimisation"):text.index("### 5a.")]
    rows = [[c.replace("`", "").strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    assert [h.split()[0] if h else "" for h in header] == ["", "paper", "code"], header
    expected: dict[str, dict[str, object]] = {"paper": {}, "code": {}}
    seen = set()
    for name, paper, code in body:
        assert name in ROWS, f"method.md section 5 has a row {name!r} that the test does not map to fields"
        seen.add(name)
        expected["paper"].update(ROWS[name](paper))
        expected["code"].update(ROWS[name](code))
    assert seen == set(ROWS), f"rows missing from method.md: {set(ROWS) - seen}"
    # section 6 (the paper's split, random by image) and 5a (the release's hard-coded sizes)
    train, val, test = re.search(r"Split (\d+) / (\d+) / (\d+)", text).groups()
    val_c, test_c = re.search(r"hard-codes (\d+) validation and (\d+) test images", text).groups()
    expected["paper"].update({"data.split": f"{train},{val},{test}", "data.split_by": "image"})
    expected["code"].update({"data.split": f"{train},{val_c},{test_c}", "data.split_by": "image"})
    # section 6: "standard color normalization" (Macenko here) vs none in the release
    assert "standard color normalization" in text and "the release none" in text
    expected["paper"]["data.stain"], expected["code"]["data.stain"] = "macenko", "none"
    # section 6 / 5a: 256 px crops at stride 128 for both
    for p in expected.values():
        p.update({"data.crop_size": 256, "data.stride": 128})
    # section 5: "retraining keeps the best-validation checkpoint"; the paper and the release train in float32
    for p in expected.values():
        p.update({"amp": False})
    return expected


def _trial_configs(spec, tmp_path):
    for phase, method, seed in trial_list(spec):
        genotype = None
        if phase == "train" and METHODS[method].needs_search:
            genotype = tmp_path / run_name("search", method, spec.seed_list[0]) / "genotype.json"
        yield phase, method, seed, build_config(spec, method, seed, data_root=tmp_path, genotype=genotype)


@pytest.mark.parametrize("protocol", ["paper", "code"])
def test_every_table2_trial_is_its_protocol_table_as_in_method_md(protocol, tmp_path):
    expected = _method_md_expectations()[protocol]
    argv = ["ablate", str(TABLE2)] + (["--set", "protocol=code"] if protocol == "code" else [])
    spec = _load(build_parser().parse_args(argv), "ablation")
    assert spec.protocol == protocol and spec.repeat == "retrain" and spec.std == "population"
    n = 0
    for phase, method, seed, cfg in _trial_configs(spec, tmp_path):
        n += 1
        where = f"{protocol} {phase} {method} seed {seed}"
        # exactly the protocol table, apart from the fields that name the trial
        assert set(diff_from_protocol(cfg)) <= set(IDENTITY), (where, diff_from_protocol(cfg))
        flat = flatten(cfg.to_dict())
        for key, value in expected.items():
            assert flat[key] == value, f"{where}: {key} = {flat[key]!r}, method.md says {value!r}"
        assert cfg.model.name == METHODS[method].model and cfg.seed == seed
    # retrain repeats (the release): 4 searches on seed 0, then 8 methods x 3 seeds retrains
    assert n == 4 + 8 * 3


def test_protocols_train_in_float32_with_tf32_and_amp_is_opt_in():
    import torch

    from nas_core.engine.device import set_float32_precision

    for protocol in PROTOCOLS:
        cfg = load_config(overrides=[f"protocol={protocol}"])
        assert (cfg.amp, cfg.tf32) == (False, True)
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch < 2.9 has no fp32_precision switches")
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        set_float32_precision(torch.device("cpu"), False)  # CPU: untouched
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
        set_float32_precision(torch.device("cuda"), True)  # the flags are process-wide, set without a GPU too
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        set_float32_precision(torch.device("cuda"), False)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee", "ieee")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
