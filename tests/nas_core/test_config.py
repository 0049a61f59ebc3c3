import dataclasses
import math
import re
import subprocess
import sys

import pytest

from nas_core.config import LIMITS, ConfigError, RunConfig, SearchConfig, config_from_dict, load_config


def test_protocol_defaults_follow_method_md():
    paper = load_config()
    code = load_config(overrides=["protocol=code"])
    assert (paper.search.warmup_epochs, paper.search.lr_w, paper.search.alternation) == (40, 1e-4, "iteration")
    assert (code.search.warmup_epochs, code.search.lr_w, code.search.alternation) == (20, 1e-3, "epoch")
    assert code.search.reset_optimizer_each_epoch and not paper.search.reset_optimizer_each_epoch
    assert (paper.zero_op, code.zero_op) == ("paper", "code")
    assert (paper.loss_name, code.loss_name) == ("exp_log", "exp_log_dice")
    assert (paper.train.lr, code.train.lr) == (1e-4, 1e-3)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("protocol: code\nsearch:\n  lr_w: 1e-2\n  epochs: 7\n")
    cfg = load_config(f, overrides=["search.epochs=9", "model.name=unet"], preset="smoke")
    assert cfg.search.lr_w == 0.01 and cfg.search.epochs == 9 and cfg.model.name == "unet"
    assert cfg.data.crop_size == 32  # from the preset


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("search.lr_ww=1", "search.lr_ww"),
        ("search.epochs=ten", "search.epochs"),
        ("model.search=async", "model.search"),
        ("protocol=other", "protocol"),
        ("data.crop_size=100", "data.crop_size"),
        ("noequals", "noequals"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(overrides=[override])


def test_round_trip_through_dict():
    cfg = load_config(overrides=["seed=3", "model.genotype=/x.json"])
    assert config_from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg, RunConfig)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


# ---------------------------------------------------------------- limits, finite floats, registries (issue 22)
def _keys_of(tp) -> list[str]:
    """Dotted RunConfig keys whose annotation includes ``tp`` (Optional[tp] too)."""
    import dataclasses
    import typing

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif tp in (typing.get_args(hint) or (hint,)):
                yield f"{prefix}{f.name}"

    return list(walk(RunConfig))


def test_every_integer_key_has_a_limit():
    # a new int field gets a bound in LIMITS (the folds have their own check, _validate_folds)
    assert set(_keys_of(int)) - {"data.folds", "data.fold"} == set(LIMITS)


@pytest.mark.parametrize("key", sorted(LIMITS))
def test_each_limit_is_applied_naming_the_key(key):
    low, high = LIMITS[key]
    for value, bound in ((low - 1, f"must be >= {low}"), (high + 1, f"must be <= {high}")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} {bound} .*got {value}$"):
            load_config(preset="smoke", overrides=[f"{key}={value}"])


def test_a_huge_epoch_count_is_refused_before_anything_grows_with_it():
    # the search's validation epochs were listed before any bound: 10**9 epochs took GBs and minutes
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))\n"
            "from nas_core.config import ConfigError, config_from_dict, load_config\n"
            "for run in (lambda: load_config(overrides=['search.epochs=1000000000', 'search.val_every=1']),\n"
            "            lambda: config_from_dict({'search': {'epochs': 10**9, 'warmup_epochs': 1}})):\n"
            "    try:\n"
            "        run()\n"
            "    except ConfigError as exc:\n"
            "        print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert out.returncode == 0 and len(lines) == 2, out.stderr[-2000:]
    assert all(line.startswith("search.epochs must be <= 100000") for line in lines), lines


@pytest.mark.parametrize("key", _keys_of(float))
@pytest.mark.parametrize("raw", ["1e400", "-1e400", ".inf", ".nan"])
def test_float_keys_take_finite_numbers_only(key, raw):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected a finite number"):
        load_config(overrides=[f"{key}={raw}"])
    *parents, leaf = key.split(".")
    for value in (math.inf, math.nan, 10**400):  # JSON's 1e400 is inf; a huge int overflows a float
        data = {leaf: value}
        for p in reversed(parents):
            data = {p: data}
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: expected a finite number"):
            config_from_dict(data)


def test_an_unknown_loss_is_refused_listing_the_registry():
    from nas_core.losses import LOSSES

    with pytest.raises(ConfigError, match=r"loss\.name: 'dice_typo' is not a registered loss") as err:
        load_config(overrides=["loss.name=dice_typo"])
    assert all(name in str(err.value) for name in LOSSES)
    assert load_config(overrides=["loss.name=bce"]).loss_name == "bce"


def test_a_stride_that_multiplies_the_windows_is_refused():
    with pytest.raises(ConfigError, match=r"data\.stride must be >= data\.crop_size / 8 .*got 31"):
        load_config(overrides=["data.crop_size=256", "data.stride=31"])
    assert load_config(overrides=["data.crop_size=256", "data.stride=32"]).data.stride == 32


def test_the_genotype_window_is_checked_without_listing_epochs(monkeypatch):
    # the O(1) check agrees with the listed validations, and a huge search is not listed to check it
    for epochs in range(1, 30):
        for every in (1, 2, 3, 7):
            for timing in ("start", "end"):
                for after in (0, 1, 5, 20, 28):
                    s = SearchConfig(epochs=epochs, warmup_epochs=0, val_every=every, val_timing=timing,
                                     genotype_after=after)
                    try:
                        config_from_dict({"search": dataclasses.asdict(s)})
                        ok = True
                    except ConfigError as exc:
                        ok = False
                        assert "no validation can give the genotype" in str(exc)
                    assert ok == bool(s.genotype_epochs()), (epochs, every, timing, after)
    with pytest.raises(ConfigError, match=r"validates in epochs 0, 3, \.\.\., 99999 "):
        load_config(overrides=["search.epochs=100000", "search.genotype_after=100000"])

    def listed(self):
        raise AssertionError("validation listed the search's epochs")

    monkeypatch.setattr(SearchConfig, "validation_epochs", listed)
    monkeypatch.setattr(SearchConfig, "genotype_epochs", listed)
    assert load_config(overrides=["search.epochs=100000"]).search.epochs == 100_000


@pytest.mark.parametrize("protocol", ["paper", "code"])
def test_the_small_data_preset_is_the_protocol_with_the_dice_loss_only(protocol):
    from nas_core.config import diff_from_protocol

    cfg = load_config(None, preset="small-data", overrides=[f"protocol={protocol}"])
    assert diff_from_protocol(cfg) == {"loss.name": (load_config(None, overrides=[f"protocol={protocol}"]).loss.name,
                                                     "soft_dice")}
    # a spec's own value still wins over the preset
    assert load_config(None, preset="small-data", overrides=["loss.name=exp_log"]).loss.name == "exp_log"
