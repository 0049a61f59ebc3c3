"""A spec is parsed once per command; trials receive RunConfig dicts, never the spec (issue 12, item 1)."""

import json
from pathlib import Path

import pytest

import nas_core.config as config
import orchestrator.specs as specs
from orchestrator import plan

ROOT = Path(__file__).resolve().parents[1]
TABLE2 = str(ROOT / "experiments" / "table2.yaml")
RATE = {"flops_per_s": 1e9, "device": "cpu", "dtype": "float32", "workload": "stub", "seconds": 0.0, "steps": 1}


@pytest.fixture()
def counts(monkeypatch):
    """Spies: spec validations (every spec kind's validator builds its configs through _check_configs)
    and RunConfigs built from the protocol table and preset (load_config), i.e. from a spec."""
    n = {"spec": 0, "load_config": 0}

    def spy(name, module, attr):
        real = getattr(module, attr)

        def wrapper(*a, **k):
            n[name] += 1
            return real(*a, **k)
        monkeypatch.setattr(module, attr, wrapper)

    spy("spec", specs, "_check_configs")
    spy("load_config", specs, "load_config")
    # the plan's cost model is not under test here: no FLOP counting, no rate benchmark
    monkeypatch.setattr(plan, "_count", lambda cfg, phase, kind: 1)
    import nas_core.models.perf as perf
    monkeypatch.setattr(perf, "measure_conv_rate", lambda *a, **k: RATE)
    return n


def test_ablate_plan_parses_the_spec_once(home, counts, capsys):
    from orchestrator.cli import main

    # --set made `ablate` parse the spec twice (a relative data folder, three times)
    argv = ["ablate", TABLE2, "--preset", "smoke", "--methods", "unet,nas-scam-p-sync", "--seeds", "2",
            "--set", "train.lr=2e-3", "--set", "protocol=code", "--plan", "--json"]
    spec = specs.load_spec(TABLE2, preset="smoke", methods=["unet", "nas-scam-p-sync"], seeds=2, protocol="code",
                           overrides={"train.lr": 2e-3})
    counts.update(spec=0, load_config=0)
    assert main(argv) == 0  # on the smoke preset's synthetic data, which the plan prepares
    p = json.loads(capsys.readouterr().out)
    assert counts == {"spec": 1, "load_config": 2}  # one parse; one config per method, built by it
    assert [(t["phase"], t["method"], t["seed"]) for t in p["trials"]] == plan.trial_list(spec)
    assert p["protocol"] == "code" and p["common_overrides"]["train.lr"][1] == 2e-3


def test_run_ablation_hands_trials_config_dicts(home, counts, monkeypatch):
    from ray import tune

    from orchestrator import runner, trials
    from orchestrator.settings import get_settings

    settings = get_settings()
    spec = specs.parse_spec({"name": "once", "preset": "smoke", "methods": ["unet", "nas-scam-p-sync"],
                             "seeds": 2, "overrides": {"train.lr": 2e-3}})
    counts.update(spec=0, load_config=0)
    grids = []

    class Grid(list):
        pass

    def fake_tuner(trainable, name, storage, param_space, *a, **k):
        grids.append((name, trainable, param_space))
        return type("T", (), {"fit": lambda self: Grid()})()

    monkeypatch.setattr(runner, "start_ray", lambda *a, **k: False)
    monkeypatch.setattr(runner, "tuner", fake_tuner)
    monkeypatch.setattr(tune, "with_parameters", lambda fn, **kw: (fn, kw))
    runner.run_ablation(spec, settings)
    assert counts == {"spec": 0, "load_config": 0}  # the driver never parses again nor rebuilds from the spec

    assert [name for name, _, _ in grids] == ["stage-search", "stage-train"]
    root = settings.runs_root / "once"
    seen = []
    for name, (fn, kw), space in grids:
        assert fn is trials.ablation_trial and set(space) == {"trial", "ctx"}  # no spec in Tune's config
        table = kw["trials"]
        assert space["trial"] == tune.grid_search(list(table))
        for t in table.values():
            json.dumps(t)  # plain data
            for r in t["runs"]:
                genotype = root / t["carry"] / "genotype.json" if r["phase"] == "train" and t["carry"] else None
                # the same config the spec's layers give for this (method, seed) and genotype
                assert r["config"] == specs.build_config(spec, r["method"], r["seed"], data_root=settings.data_root,
                                                         genotype=genotype).to_dict()
                seen.append((r["phase"], r["method"], r["seed"]))
    assert seen == plan.trial_list(spec)
    assert grids[1][2]["trial"]["grid_search"][-1] == "train__nas-scam-p-sync__seed1"

    # a trial builds its configs from the dicts alone: spec parsing is not reachable from it
    ran = []
    monkeypatch.setattr(specs, "parse_spec", lambda *a, **k: pytest.fail("a trial parsed a spec"))
    monkeypatch.setattr(trials, "_unpack", lambda root: None)
    monkeypatch.setattr(trials, "_phase", lambda tracker, m, s, phase, cfg, out_dir, carry=(), log_model=True,
                        tags=None:
                        ran.append((phase, cfg, out_dir.name, [d.name for d in carry])) or
                        type("R", (), {"test": {"dsc": {"Average": 0.5}}})())
    monkeypatch.setattr(tune, "report", lambda *a, **k: None)
    _, (_, kw), space = grids[1]
    trials._ablation_trial(kw["trials"]["train__nas-scam-p-sync__seed1"], space["ctx"])
    (phase, cfg, out, carry), = ran
    assert (phase, out, carry) == ("train", "train__nas-scam-p-sync__seed1", ["search__nas-scam-p-sync__seed0"])
    assert isinstance(cfg, config.RunConfig) and cfg.seed == 1 and cfg.train.lr == 2e-3
    assert cfg.model.genotype == str(root / "search__nas-scam-p-sync__seed0" / "genotype.json")


def test_hpo_trial_config_is_the_base_dict_with_its_sample():
    spec = specs.parse_spec({"kind": "hpo", "preset": "smoke", "space": {
        "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}})
    base = plan.hpo_base(spec, Path("/data"))
    sampled = config.config_from_dict(config.apply_overrides(base, {"train.lr": 3e-3}))
    assert sampled == specs.build_config(spec, "unet", 0, data_root=Path("/data"), extra={"train.lr": 3e-3})
    assert sampled.train.lr == 3e-3 and base["train"]["lr"] != 3e-3  # the base is left as it was
