"""One source of truth per protocol: the records in nas_core/config.py, checked against the dataclasses,
against the resolved config of every Table 2 trial and against method.md's protocol table; a new
protocol is one record; old saved configs that leave the protocol's names None still load."""

import copy
import re
from pathlib import Path

import pytest

from nas_core.config import (PROTOCOL_NAMED, PROTOCOLS, ConfigError, RunConfig, config_from_dict, diff_from_protocol,
                             flatten, load_config)
from nas_core.data.augment import PIPELINES
from nas_core.search_space.cell import ZERO_OPS
from orchestrator.cli import build_parser
from orchestrator.commands.ablate import _load
from orchestrator.plan import IDENTITY, trial_list
from orchestrator.specs import METHODS, build_config, run_name

ROOT = Path(__file__).resolve().parents[2]
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
    "augmentation": lambda cell: {"augment.pipeline": _pipeline_named_by(cell)},
    "zero op on sigmoid edges": lambda cell: {"model.zero_op": _zero_op_of_value(float(cell))},
}


def _pipeline_named_by(cell: str) -> str:
    """The pipeline of PIPELINES whose methods are the ones the cell names ("Gaussian blur" is
    gaussian_blur), each with the probability the cell gives, if it gives one."""
    words = cell.lower().replace(" ", "_")
    found = [name for name, choices in PIPELINES.items()
             if choices and {m for m, _ in choices} == {m for m in _ALL_METHODS if m in words}]
    assert len(found) == 1, f"method.md's augmentation {cell!r} is not exactly one pipeline of {list(PIPELINES)}"
    p = re.search(r"p = ([0-9.]+)", cell)
    assert p is None or all(q == float(p.group(1)) for _, q in PIPELINES[found[0]]), cell
    return found[0]


_ALL_METHODS = {m for choices in PIPELINES.values() for m, _ in choices}


def _zero_op_of_value(value: float) -> str:
    found = [name for name, v in ZERO_OPS.items() if v == value]
    assert len(found) == 1, f"method.md's zero op value {value} is not exactly one of ZERO_OPS {ZERO_OPS}"
    return found[0]


def _method_md_expectations() -> dict[str, dict[str, object]]:
    """{protocol: {dotted field: value}} read from method.md (section 5's table, sections 5a and 6)."""
    if not METHOD_MD.is_file():
        pytest.skip(f"{METHOD_MD} is absent (the shared docs are not checked out beside the repository)")
    text = METHOD_MD.read_text()
    section = text[text.index("## 5. Optimisation"):text.index("### 5a.")]
    rows = [[c.replace("`", "").strip() for c in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    # one column per protocol record: a new protocol is its record plus its column here
    columns = [h.split()[0] for h in header[1:]]
    assert header[0] == "" and sorted(columns) == sorted(PROTOCOLS), (header, list(PROTOCOLS))
    expected: dict[str, dict[str, object]] = {p: {} for p in columns}
    seen = set()
    for name, *cells in body:
        assert name in ROWS, f"method.md section 5 has a row {name!r} that the test does not map to fields"
        seen.add(name)
        for protocol, cell in zip(columns, cells, strict=True):
            expected[protocol].update(ROWS[name](cell))
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


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_every_table2_trial_is_its_protocol_table_as_in_method_md(protocol, tmp_path):
    expected = _method_md_expectations()[protocol]
    argv = ["ablate", str(TABLE2), "--set", f"protocol={protocol}"]
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


# ---- the names a record gives (loss, zero op, pipeline), old saved configs, a new protocol
def _old_fallbacks(protocol: str) -> dict[str, str]:
    """What RunConfig.zero_op / loss_name / augment_pipeline made of None before the records named them
    (the fallbacks that repeated the table): saved configs with None must still mean this."""
    return {"model.zero_op": protocol, "loss.name": "exp_log" if protocol == "paper" else "exp_log_dice",
            "augment.pipeline": protocol}


@pytest.mark.parametrize("protocol", ["paper", "code"])
def test_an_old_saved_config_with_none_names_loads_to_the_same_values(protocol):
    saved = load_config(overrides=[f"protocol={protocol}"]).portable_dict()
    for dotted in PROTOCOL_NAMED:
        section, key = dotted.split(".")
        saved[section][key] = None
    cfg = config_from_dict(saved)
    named = {dotted: flatten(cfg.to_dict())[dotted] for dotted in PROTOCOL_NAMED}
    assert named == _old_fallbacks(protocol)
    assert (cfg.zero_op, cfg.loss_name, cfg.augment_pipeline) == tuple(_old_fallbacks(protocol).values())
    assert config_from_dict(saved) == load_config(overrides=[f"protocol={protocol}"])
    # older still: no loss/augment sections at all (the dataclass defaults, None) -> the record's names
    del saved["loss"], saved["augment"]
    assert config_from_dict(saved).loss_name == _old_fallbacks(protocol)["loss.name"]
    # and ``--set x=null`` still means the protocol's, an explicit name still wins
    nulls = [f"{dotted}=null" for dotted in PROTOCOL_NAMED]
    assert load_config(overrides=[f"protocol={protocol}", *nulls]) == load_config(overrides=[f"protocol={protocol}"])
    explicit = load_config(overrides=[f"protocol={protocol}", "model.zero_op=code", "augment.pipeline=none"])
    assert (explicit.zero_op, explicit.augment_pipeline) == ("code", "none")


@pytest.mark.parametrize("dotted, value", [("model.zero_op", "half"), ("augment.pipeline", "release"),
                                           ("loss.name", "dice_typo")])
def test_a_name_outside_its_registry_is_refused_listing_the_registry(dotted, value):
    registry = {"model.zero_op": ZERO_OPS, "augment.pipeline": PIPELINES}.get(dotted)
    with pytest.raises(ConfigError, match=rf"{re.escape(dotted)}: '{value}' is not a registered") as err:
        load_config(overrides=[f"{dotted}={value}"])
    assert registry is None or all(name in str(err.value) for name in registry)


def test_a_protocol_is_checked_wherever_a_config_is_built():
    with pytest.raises(ConfigError, match=r"protocol: 'release' is not one of 'paper', 'code'"):
        RunConfig(protocol="release")
    assert RunConfig(protocol="code").loss_name == "exp_log_dice"  # direct construction reads the record too


TINY = ["data.synthetic_images=6", "data.synthetic_size=128", "data.crop_size=32", "data.stride=32",
        "data.split=0.5,0.25,0.25", "search.epochs=2", "search.warmup_epochs=1", "search.iters_per_epoch=1",
        "search.val_every=1", "search.val_timing=end", "train.epochs=1", "train.iters_per_epoch=1",
        "train.val_every=1", "train.val_timing=end"]


def test_a_new_protocol_is_one_record(monkeypatch, tmp_path):
    """A protocol added as one PROTOCOLS entry and nothing else: load_config applies it, saved configs
    round-trip, and a search and a retrain run with the loss, zero op and pipeline it names."""
    from nas_core.engine import load_checkpoint, run_search, run_train
    from nas_core.engine.context import setup_run

    record = copy.deepcopy(PROTOCOLS["paper"])
    record["protocol"] = "hybrid"
    record["model"]["zero_op"], record["loss"]["name"], record["augment"]["pipeline"] = "code", "soft_dice", "code"
    record["search"].update(alternation="epoch", lr_w=5e-4)
    monkeypatch.setitem(PROTOCOLS, "hybrid", record)

    cfg = load_config(overrides=["protocol=hybrid"])
    assert flatten(cfg.to_dict()) == flatten(record) and diff_from_protocol(cfg) == {}
    assert (cfg.zero_op, cfg.loss_name, cfg.augment_pipeline) == ("code", "soft_dice", "code")
    assert config_from_dict(cfg.portable_dict()) == cfg
    nulls = [f"{dotted}=null" for dotted in PROTOCOL_NAMED]
    assert load_config(overrides=["protocol=hybrid", *nulls]) == cfg

    run = load_config(overrides=["protocol=hybrid", *TINY, f"data.cache_dir={tmp_path / 'data'}"])
    ctx = setup_run(run, tmp_path / "ctx")
    assert ctx.loss_fn.__name__ == "soft_dice"
    assert ctx.dataset("train", augment=True).transform.choices == PIPELINES["code"]
    search = run_search(run, tmp_path / "search")
    supernet, meta = load_checkpoint(search.checkpoint_path)
    assert meta["config"]["protocol"] == "hybrid"
    assert {c.zero_value for c in supernet.modules() if hasattr(c, "zero_value")} == {ZERO_OPS["code"]}
    retrain = load_config(overrides=["protocol=hybrid", *TINY, f"data.cache_dir={tmp_path / 'data'}",
                                     f"model.genotype={search.genotype_path}"])
    result = run_train(retrain, tmp_path / "train")
    assert result.best_epoch == 0 and set(result.test["dsc"]) >= {"Average"}
