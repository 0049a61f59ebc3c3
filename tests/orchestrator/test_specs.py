import re
import time
from pathlib import Path

import pytest
import yaml

from nas_core.config import LIMITS, nest_dotted
from orchestrator.specs import (IDENTITY_KEYS, METHODS, PAPER_METHODS, AblationSpec, HpoSpec, RunSpec, SpecError, build_config,
                                load_spec, parse_spec, run_name)

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_specs_load():
    t2 = load_spec(ROOT / "experiments" / "table2.yaml")
    assert isinstance(t2, AblationSpec)
    assert t2.methods == list(PAPER_METHODS) and t2.seed_list == [0, 1, 2]
    assert (t2.repeat, t2.std) == ("retrain", "population")
    hpo = load_spec(ROOT / "experiments" / "hpo.yaml", preset="smoke")
    assert isinstance(hpo, HpoSpec)
    assert set(hpo.space) == {"train.lr", "loss.name", "augment.strength", "train.per_class"}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_builds_its_config(method, tmp_path):
    spec = parse_spec({"methods": [method], "preset": "smoke", "seeds": [4]})
    geno = tmp_path / "g.json" if METHODS[method].search else None  # searched or drawn
    cfg = build_config(spec, method, 4, data_root=tmp_path, genotype=geno)
    assert cfg.model.name == METHODS[method].model and cfg.seed == 4
    assert cfg.data.cache_dir == str(tmp_path)
    if METHODS[method].search:
        assert cfg.model.search == METHODS[method].search and cfg.model.genotype == str(geno)


def test_layers_preset_overrides_epochs_and_data(tmp_path):
    spec = parse_spec({"preset": "smoke", "protocol": "code", "methods": ["unet"],
                       "overrides": {"train.lr": "2e-3", "data": {"split_by": "patient"}},
                       "epochs": {"train": 2, "train_iters": 3}, "data": {"crop_size": 32, "stride": 16}})
    cfg = build_config(spec, "unet", 0)
    assert cfg.protocol == "code" and cfg.train.lr == 2e-3  # "2e-3" from YAML is the float a user means
    assert (cfg.train.epochs, cfg.train.iters_per_epoch) == (2, 3)
    assert (cfg.data.crop_size, cfg.data.stride, cfg.data.split_by) == (32, 16, "patient")
    assert cfg.data.synthetic_images == 12  # from the smoke preset
    assert cfg.search.warmup_epochs == 1  # smoke preset beats the code protocol's 20


def test_repeats_default_to_the_release():
    """One search per NAS method and the population std, as the release; the other two are named options."""
    spec = parse_spec({})
    assert (spec.repeat, spec.std) == ("retrain", "population")
    spec = parse_spec({"repeat": "full", "std": "sample"})
    assert (spec.repeat, spec.std) == ("full", "sample")


def test_seed_count_and_explicit_seeds():
    assert parse_spec({"seeds": 2}).seed_list == [0, 1]
    assert parse_spec({"seeds": [3, 7]}).seed_list == [3, 7]
    assert run_name("search", "nas-scam-p-sync", 1) == "search__nas-scam-p-sync__seed1"


@pytest.mark.parametrize("data, field, words", [
    ({"methods": ["unet", "nas-scam-x"]}, "methods", "unknown method 'nas-scam-x'"),
    ({"seeds": -1}, "seeds", "seed count must be between 1 and 1000"),
    ({"seeds": [1, 1]}, "seeds", "distinct"),
    ({"bogus": 1}, "bogus", "Extra inputs are not permitted"),
    ({"resources": {"gpu": -0.5}}, "resources.gpu", "greater than or equal to 0"),
    ({"resources": {"cpus": 1}}, "resources.cpus", "Extra inputs"),
    ({"repeat": "twice"}, "repeat", "'full' or 'retrain'"),
    ({"std": "ddof1"}, "std", "'population' or 'sample'"),
    ({"overrides": {"protocol": "code"}}, "overrides.protocol", "set it there"),
    ({"epochs": {"train": 0}}, "epochs.train", "greater than or equal to 1"),
    ({"overrides": {"train.lrr": 1}}, "train.lrr", "unknown config key"),
    ({"preset": "huge"}, "preset", "unknown preset 'huge'"),
    ({"kind": "train", "method": "nas-scam-p-sync"}, "genotype", "needs genotype"),
    ({"kind": "search", "method": "unet"}, "search", "no search phase"),
    ({"kind": "hpo", "space": {"model.name": {"type": "choice", "values": ["unet"]}}}, "model.name",
     "only retraining keys"),
    ({"kind": "hpo", "space": {"train.lr": {"type": "loguniform", "low": 0, "high": 1}}}, "train.lr", "low > 0"),
    # names are identifiers (a folder and an MLflow experiment), integers are integers (issue 15)
    ({"name": "../../x"}, "name", "should match pattern"),
    ({"kind": "search", "method": "nas-scam-p-sync", "name": "/abs/folder"}, "name", "should match pattern"),
    ({"kind": "hpo", "name": "a" * 65, "space": {"train.lr": {"type": "choice", "values": [1e-3]}}}, "name",
     "at most 64 characters"),
    ({"seeds": "3"}, "seeds", "valid integer"),
    ({"seeds": [2**31]}, "seeds", "less than or equal to 2147483647"),
    ({"kind": "hpo", "num_samples": "8", "space": {"train.lr": {"type": "choice", "values": [1e-3]}}},
     "num_samples", "valid integer"),
    ({"overrides": {"data.workers": -3}}, "data.workers", "must be >= 0"),
    # every choice value is built, not only the first
    ({"kind": "hpo", "space": {"train.lr": {"type": "choice", "values": [1e-3, -1.0]}}}, "train.lr=-1.0",
     "train.lr must be > 0"),
])
def test_validation_errors_name_the_field(data, field, words):
    with pytest.raises(SpecError) as err:
        parse_spec(data, "my.yaml")
    msg = str(err.value)
    assert msg.startswith("my.yaml: ") and field in msg and words in msg, msg


def test_load_spec_updates_and_file_errors(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text(yaml.safe_dump({"name": "abl", "methods": ["unet"], "seeds": 3}))
    spec = load_spec(p, seeds=1, preset="smoke", data={"source": "/x"})
    assert spec.seed_list == [0] and spec.preset == "smoke" and spec.data.source == "/x"
    with pytest.raises(SpecError, match="seeds: seed count must be between 1 and 1000"):
        load_spec(p, seeds=-2)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("methods: [unet\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_run_spec_kinds():
    assert isinstance(parse_spec({"kind": "pipeline", "method": "nas-scam-s-shared", "seed": 2}), RunSpec)
    spec = parse_spec({"kind": "train", "method": "nas-scam-s-shared", "genotype": "g.json"})
    assert spec.genotype == "g.json"


def test_a_huge_seed_count_is_refused_without_building_the_list():
    with pytest.raises(SpecError, match="seed count"):
        parse_spec({"seeds": 10**12})



def test_trial_configs_cover_every_method_choice_and_range_end():
    spec = parse_spec({"kind": "hpo", "preset": "smoke", "space": {
        "loss.name": {"type": "choice", "values": ["exp_log", "exp_log_dice", "soft_dice"]},
        "train.epochs": {"type": "int", "low": 2, "high": 9}}})
    labels = [label for label, _ in spec.configs]
    assert len(labels) == 1 + 3 + 2 and labels[0] == "method 'unet'"
    assert sorted(cfg.train.epochs for _, cfg in spec.configs) == [2, 4, 4, 4, 4, 9]  # smoke: 4 epochs
    # the protocol table names the loss (exp_log for paper), so no config leaves it None
    assert {cfg.loss.name for _, cfg in spec.configs} == {"exp_log", "exp_log_dice", "soft_dice"}
    ablation = parse_spec({"methods": ["unet", "nas-scam-p-sync"], "preset": "smoke", "seeds": [5, 6]})
    assert [(label, cfg.seed) for label, cfg in ablation.configs] == [("method 'unet'", 5),
                                                                      ("method 'nas-scam-p-sync'", 5)]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_experiment_file_loads(path):
    # a spec or run config in experiments/ that no longer validates is a broken promise to a user
    from nas_core.config import load_config

    data = yaml.safe_load(path.read_text())
    if data.get("kind") in ("ablation", "hpo", "search", "train", "pipeline"):
        assert load_spec(str(path)).configs
    else:
        assert load_config(path).protocol in ("paper", "code")


# ---------------------------------------------------------------- one check per key, whichever way it came (issue 22)
@pytest.mark.parametrize("key, value", [("data.synthetic_images", 1), ("data.synthetic_size", 8),
                                        ("data.crop_size", 8192), ("data.stride", 8192),
                                        ("search.epochs", 10**8), ("train.iters_per_epoch", 0)])
def test_a_key_is_bounded_the_same_by_every_path(key, value):
    # `data: {synthetic_images: 1}` was refused while `overrides: {data.synthetic_images: 1}` passed
    section, leaf = key.split(".")
    short = {"search.epochs": "epochs.search", "train.iters_per_epoch": "epochs.train_iters"}.get(key, key)
    low, high = LIMITS[key]
    bound = f">= {low}" if value < low else f"<= {high}"
    ways = [(nest_dotted({short: value}), short, f"{'greater' if value < low else 'less'} than or equal to"),
            ({"overrides": {key: value}}, key, f"must be {bound}"),
            ({"overrides": {section: {leaf: value}}}, key, f"must be {bound}")]
    for extra, field, words in ways:
        with pytest.raises(SpecError) as err:
            parse_spec({"kind": "search", "method": "nas-scam-p-sync", **extra}, "my.yaml")
        assert field in str(err.value) and words in str(err.value), str(err.value)
    if section != "search":  # an HPO space holds retraining keys only
        with pytest.raises(SpecError, match=rf"space\.{re.escape(key)}={value}: {re.escape(key)} must be {bound}"):
            parse_spec({"kind": "hpo", "space": {key: {"type": "choice", "values": [value]}}}, "my.yaml")


@pytest.mark.parametrize("key, field", [("model.genotype", "genotype:"), ("model.name", "method:"),
                                        ("model.search", "method:"), ("seed", "seed:")])
@pytest.mark.parametrize("nested", [False, True], ids=["dotted", "nested"])
def test_identity_keys_in_overrides_are_refused_naming_the_field(key, field, nested):
    # they were overwritten by the method, seed and genotype of each trial without a word
    overrides = {key: "/etc/passwd"} if not nested else nest_dotted({key: "/etc/passwd"})
    for data in ({"methods": ["unet"], "overrides": overrides},
                 {"kind": "search", "method": "nas-scam-p-sync", "overrides": overrides}):
        with pytest.raises(SpecError, match=rf"overrides\.{re.escape(key)}: .*use the spec field {field}"):
            parse_spec(data, "my.yaml")
    assert set(IDENTITY_KEYS) == {"model.name", "model.search", "model.genotype", "seed"}


def test_a_search_epoch_count_is_refused_before_it_is_expanded():
    started = time.monotonic()
    with pytest.raises(SpecError, match=r"epochs\.search: Input should be less than or equal to 100000"):
        parse_spec({"kind": "search", "method": "nas-scam-p-sync", "preset": "smoke", "epochs": {"search": 10**9}})
    with pytest.raises(SpecError, match=r"search\.epochs must be <= 100000"):
        parse_spec({"kind": "search", "method": "nas-scam-p-sync", "overrides": {"search.epochs": 10**9}})
    assert time.monotonic() - started < 5
