import pytest

from nas_core.config import ConfigError, RunConfig, config_from_dict, load_config


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
