"""`nas-scam ablate SPEC --plan`: what will run, before anything runs (no Ray, no MLflow run); a spec is
parsed once per command and trials receive RunConfig dicts, never the spec; each trial asks Ray for the
memory its plan estimates (``plan.run_memory``), ``--plan`` shows it, and a spec whose trial no node can
hold is refused before anything starts."""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import nas_core.config as config
import orchestrator.specs as specs
from nas_core.config import config_from_dict
from orchestrator import plan, runner
from orchestrator.cli import main
from orchestrator.plan import trial_list
from orchestrator.settings import get_settings
from orchestrator.specs import parse_spec, trial_config

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["ablate", str(ROOT / "experiments" / "table2.yaml"), "--preset", "smoke",
         "--methods", "unet,nas-scam-p-sync", "--seeds", "2", "--plan"]


def test_trial_list_follows_the_repeat_scope():
    retrain = parse_spec({"seeds": 3})
    assert len(trial_list(retrain)) == 4 + 8 * 3  # one search per NAS method, then every seed retrains
    assert [t for t in trial_list(retrain) if t[0] == "search"] == [
        ("search", m, 0) for m in ("nas-scam-s-shared", "nas-scam-p-shared", "nas-scam-s-sync", "nas-scam-p-sync")]
    full = parse_spec({"seeds": 3, "repeat": "full"})
    assert len(trial_list(full)) == (8 + 4) * 3
    assert ("search", "nas-scam-p-sync", 2) in trial_list(full)


def _plan(capsys, *extra):
    assert main([*SMOKE, *extra]) == 0
    return capsys.readouterr().out


@pytest.mark.slow  # counting the supernet's FLOPs takes tens of seconds on a busy 2-core machine
def test_plan_prints_trials_and_numbers_without_running(home, capsys):
    text = _plan(capsys)
    assert "Plan of ablation 'table2': protocol paper, preset smoke" in text
    assert "stain         macenko" in text and "population std (ddof=0)" in text and "precision     float32" in text
    assert "data.split: '120,39,50' -> '0.6,0.2,0.2'" in text  # the preset's diff against the paper table
    assert "crops per epoch: train" in text and "iterations per epoch: w 4, alpha 4, train 8" in text
    assert "GFLOP/s on cpu" in text and "median of 5 warm runs" in text
    assert "runs (5):" in text and "search  search__nas-scam-p-sync__seed0" in text
    # nothing ran: no MLflow store, no run folder
    assert not (home / "mlflow").exists() and not (home / "runs").exists()

    p = json.loads(_plan(capsys, "--json"))
    assert [(t["phase"], t["method"], t["seed"]) for t in p["trials"]] == [
        ("search", "nas-scam-p-sync", 0), ("train", "unet", 0), ("train", "unet", 1),
        ("train", "nas-scam-p-sync", 0), ("train", "nas-scam-p-sync", 1)]
    search, unet = p["trials"][0], p["trials"][1]
    # paper: 1 warm-up epoch of 4 w steps, then 2 epochs of 4 (w step + alpha step)
    assert search["steps"] == {"w": 12, "alpha": 8} and search["iterations_per_epoch"] == {"w": 4, "alpha": 4}
    assert unet["steps"] == {"w": 4 * 8, "alpha": 0} and unet["batch"] == 4
    buckets = p["data"][0]["bucket_sizes"]
    # an epoch draws from the bucketed crops (windows with a nucleus): all training buckets, and the
    # alpha-update buckets built from the validation images' windows
    assert unet["crops_per_epoch"]["train"] == sum(buckets.values())
    assert 0 < unet["crops_per_epoch"]["alpha"] <= p["data"][0]["crops"]["val"]
    # the supernet costs more per step than the U-Net, and every estimate is FLOPs / the measured rate
    assert search["flops"] / 20 > unet["flops"] / 32 > 0
    for t in p["trials"]:
        assert t["time_s"] == pytest.approx(t["flops"] / p["rate"]["flops_per_s"])
        assert set(t["overrides"]) == set(p["common_overrides"])  # only the preset's changes, no others
    assert p["totals"]["flops"] == sum(t["flops"] for t in p["trials"])


@pytest.mark.slow
def test_plan_of_the_code_protocol_shows_the_release(home, capsys):
    p = json.loads(_plan(capsys, "--json", "--set", "protocol=code"))
    assert p["protocol"] == "code"
    lines = {x["item"]: x["value"] for x in p["protocol_lines"]}
    assert lines["stain"] == "none" and lines["loss"].startswith("exp_log_dice")
    assert "alternation per epoch" in lines["search"] and "lr w 0.001 / alpha 0.001" in lines["search"]
    assert "Adam rebuilt every epoch" in lines["search"] and lines["retrain"].startswith("4 epochs, lr 0.001")
    assert p["common_overrides"]["data.split"] == ["120,41,48", "0.6,0.2,0.2"]
    # code: warm-up epoch 0 (w), then epochs 1 and 2 are alpha-epochs (epoch % 3 != 0)
    assert p["trials"][0]["steps"] == {"w": 4, "alpha": 8}


def test_json_needs_plan(home, capsys):
    assert main([*SMOKE[:-1], "--json"]) == 2
    assert "--json goes with --plan" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 25 item 3: a cost a PI can decide on
RATE = {"flops_per_s": 1e11, "device": "cpu", "dtype": "float32", "workload": "stub", "seconds": 0.2, "steps": 3}


@pytest.fixture()
def fast_plan(monkeypatch):
    """The plan's FLOP counts and the machine's rate stubbed: the tests below check what the plan does
    with them, in seconds."""
    from orchestrator import plan

    monkeypatch.setattr(plan, "_count", lambda cfg, phase, kind: 10 ** 9)
    import nas_core.models.perf as perf
    monkeypatch.setattr(perf, "measure_conv_rate", lambda *a, **k: dict(RATE))
    return plan


def _tiny_data(tmp_path) -> Path:
    from nas_core.data.synthetic import write_synthetic

    return write_synthetic(tmp_path / "real", n_images=4, size=96, seed=3)


def test_si_units_are_spelled_out():
    from orchestrator.plan import _hours, _si

    assert _si(8.27e15, "FLOP") == "8.27 PFLOP" and _si(9.56e9, "FLOP/s") == "9.56 GFLOP/s"
    assert _si(1.05e18, "FLOP") == "1.05 EFLOP" and _si(12, "FLOP") == "12 FLOP"
    assert _hours(64.06, "GPU-hours") == "64.1 GPU-hours" and _hours(0.0021, "GPU-hours") == "<0.01 GPU-hours"


def test_plan_says_synthetic_or_counts_the_real_data_and_spells_units(home, fast_plan, tmp_path, capsys):
    argv = ["ablate", str(ROOT / "experiments" / "table2.yaml"), "--preset", "smoke", "--methods", "unet",
            "--seeds", "1", "--plan"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "SYNTHETIC stand-in" in out.out and "pass --data DIR" in out.out
    assert out.err.startswith("planning 'table2': preparing the data")  # said before the work, on stderr
    # no bare SI prefix: every figure carries its unit
    import re
    assert not re.search(r"\d [kMGTPE](?:\s|$|\()", out.out), out.out
    assert "PFLOP" in out.out or "TFLOP" in out.out or "GFLOP" in out.out

    data = _tiny_data(tmp_path)
    assert main([*argv, "--data", str(data), "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["data"][0]["synthetic"] is False and p["data"][0]["source"] == str(data)
    assert p["trials"][0]["crops_per_epoch"]["train"] == sum(p["data"][0]["bucket_sizes"].values())


def test_trials_at_once_follow_resources_and_the_machine(home, monkeypatch):
    from orchestrator import costs
    from orchestrator.settings import get_settings

    GiB = 2 ** 30
    assert costs.slots_on([{"CPU": 8, "GPU": 0, "memory": 64 * GiB}], cpu=1, gpu=0, memory=2 * GiB) == 8
    assert costs.slots_on([{"CPU": 8, "GPU": 0, "memory": 5 * GiB}], cpu=1, gpu=0, memory=2 * GiB) == 2  # memory
    assert costs.slots_on([{"CPU": 16, "GPU": 1, "memory": 64 * GiB}], cpu=2, gpu=0.25, memory=GiB) == 4  # GPU
    assert costs.slots_on([{"CPU": 4, "GPU": 0, "memory": 0}] * 3, cpu=2, gpu=0, memory=GiB) == 6  # per node
    monkeypatch.setattr(costs, "_local_node", lambda: {"CPU": 4.0, "GPU": 0.0, "memory": 64.0 * GiB})
    spec = parse_spec({"preset": "smoke", "methods": ["unet"], "resources": {"cpu": 2}})
    got = costs.machine_slots(spec, get_settings(), GiB)
    assert got["slots"] == 2 and got["where"] == "this machine"
    assert costs.machine_slots(parse_spec({"preset": "smoke", "max_concurrent": 1}), get_settings(), GiB)["slots"] == 1


def test_trials_at_once_on_a_cluster_from_its_dashboard(home, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from orchestrator import costs
    from orchestrator.settings import get_settings

    GiB = 2 ** 30
    body = json.dumps({"data": {"summary": [
        {"raylet": {"state": "ALIVE", "resourcesTotal": {"CPU": 8.0, "GPU": 1.0, "memory": 32.0 * GiB}}},
        {"raylet": {"state": "ALIVE", "resourcesTotal": {"CPU": 8.0, "GPU": 1.0, "memory": 32.0 * GiB}}},
        {"raylet": {"state": "DEAD", "resourcesTotal": {"CPU": 64.0, "GPU": 8.0, "memory": 512.0 * GiB}}}]}})

    class Dashboard(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/nodes?view=summary"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(body.encode() if ok else b"{}")

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("NAS_SCAM_RAY_ADDRESS", "127.0.0.1:6379")
        monkeypatch.setenv("NAS_SCAM_RAY_DASHBOARD", f"http://127.0.0.1:{server.server_port}")
        get_settings.cache_clear()
        spec = parse_spec({"preset": "smoke", "resources": {"cpu": 1, "gpu": 0.5}})
        got = costs.machine_slots(spec, get_settings(), GiB)
        assert got["slots"] == 4 and got["nodes"] == 2 and got["where"].startswith("the cluster at http://127.0.0.1")
    finally:
        server.shutdown()
    # no dashboard: this machine's slots, and the plan says why
    monkeypatch.setenv("NAS_SCAM_RAY_DASHBOARD", "http://127.0.0.1:9")
    get_settings.cache_clear()
    got = costs.machine_slots(spec, get_settings(), GiB)
    assert got["where"] == "this machine" and "did not answer" in got["note"]


def test_makespan_fills_slots_in_order():
    from orchestrator.costs import makespan

    assert makespan([10, 10, 10, 10], 2) == 20
    assert makespan([30, 10, 10, 10], 2) == 30
    assert makespan([10], 2, busy=[25]) == 25 and makespan([10, 10], 1, busy=[5]) == 25
    assert makespan([], 3) == 0


def test_machine_rate_is_a_median_of_warm_runs_kept_per_machine(home, monkeypatch):
    import torch

    import nas_core.models.perf as perf
    from orchestrator import costs
    from orchestrator.settings import get_settings

    rates = iter([1.0, 50e9, 10e9, 90e9, 60e9, 55e9] + [70e9] * 6)  # the first: the warm-up, ignored
    calls = []

    def fake(device, amp=False, seconds=1.0):
        calls.append(torch.get_num_threads())
        return {**RATE, "flops_per_s": next(rates)}

    monkeypatch.setattr(perf, "measure_conv_rate", fake)
    before = torch.get_num_threads()
    r = costs.machine_rate(get_settings(), torch.device("cpu"), threads=1)
    assert r["flops_per_s"] == 55e9 and r["median_of"] == 5 and r["spread"] == [10e9, 90e9]
    assert calls == [1] * 6 and torch.get_num_threads() == before  # measured with a trial's threads
    # kept: a second plan on this machine gives the same rate without measuring
    assert costs.machine_rate(get_settings(), torch.device("cpu"), threads=1)["flops_per_s"] == 55e9
    assert len(calls) == 6 and r["cached"] == str(home / "machine" / "rate.json")
    assert costs.machine_rate(get_settings(), torch.device("cpu"), threads=1, remeasure=True)["flops_per_s"] == 70e9
    assert costs.machine_rate(get_settings(), torch.device("cpu"), threads=1)["flops_per_s"] == 70e9


def test_device_profiles_are_data_that_cite_benchmarks():
    import re

    from orchestrator.costs import load_device_profiles

    import tomllib

    from orchestrator.costs import DEVICE_PROFILES

    # shipped with the package (a non-editable install, the Docker images), not only in the source tree
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert DEVICE_PROFILES.name in package_data[DEVICE_PROFILES.parent.name]
    bench = (ROOT / "BENCHMARKS.md").read_text().replace("`", "")  # headings quote commands in backticks
    for name, prof in load_device_profiles().items():
        assert prof["unit"].endswith("-hours") and "BENCHMARKS.md" in prof["source"], name
        for section in re.findall(r"section '([^']+)'", prof["source"]):
            assert section in bench, (name, section)  # the cited section exists
        for kind, row in prof["steps"].items():
            assert row["how"].startswith(("measured: ", "derived: ")), (name, kind)
            if row["how"].startswith("measured"):
                for precision in ("float32", "tf32", "bf16"):
                    if precision in row:  # a measured figure appears in BENCHMARKS.md as printed there
                        assert f"{row[precision]:.3f}" in bench, (name, kind, precision, row[precision])


def test_gpu_hours_from_the_h200_profile(home, fast_plan):
    from orchestrator import costs

    plan = fast_plan
    prof = costs.device_profile("h200")
    spec = parse_spec({"methods": ["unet", "nas-scam-p-sync"], "seeds": 1})
    from nas_core.config import config_from_dict

    trials = plan.expand(spec, Path("runs"))
    search_cfg = config_from_dict(trials[0].runs[0].config)
    assert search_cfg.data.crop_size == 256 and search_cfg.tf32 and not search_cfg.amp
    row = {"phase": "search", "batch": 4, "steps": {"w": 1000, "alpha": 400}, "eval_windows": 0, "flops_note": ""}
    got = costs.device_hours(prof, row, search_cfg)
    # 1000 w steps of 0.302 s + 400 alpha steps of (0.511 - 0.302) s, TF32, at the measured 256 px batch 4
    assert got["hours"] == pytest.approx((1000 * 0.302 + 400 * (0.511 - 0.302)) / 3600)
    assert got["precision"] == "tf32" and not got["scaled"]
    train_cfg = config_from_dict(trials[-1].runs[0].config)
    row = {"phase": "train", "batch": 4, "steps": {"w": 100, "alpha": 0}, "eval_windows": 40, "flops_note": "max"}
    # the NAS-SCAM retrain before its search: the uniform genotype's 0.066 s x the upper bound 2
    assert costs.device_hours(prof, row, train_cfg)["hours"] == pytest.approx(
        (100 * 0.132 + 40 * 0.132 * 0.33 / 4) / 3600)
    with pytest.raises(costs.ProfileError, match="known: h200"):
        costs.device_profile("tpu")


def test_plan_with_a_device_profile_prints_gpu_hours_and_its_source(home, fast_plan, capsys):
    argv = ["ablate", str(ROOT / "experiments" / "table2.yaml"), "--preset", "smoke", "--methods", "unet",
            "--seeds", "2", "--plan", "--device-profile", "h200"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "on one NVIDIA H200 GPU (--device-profile h200): searches" in text and "GPU-hours" in text
    assert "BENCHMARKS.md, section 'GPU suite: bench/gpu_suite.sh'" in text
    assert "trials at once: " in text and "wall-clock: about" in text
    assert main([*argv[:-2], "--json", "--device-profile", "h200"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["device_profile"]["total_hours"] == pytest.approx(sum(t["device_hours"] for t in p["trials"]))
    assert [s["stage"] for s in p["stages"]] == ["train"] and len(p["stages"][0]["trials"]) == 2
    assert all(c > p["trial_overhead_s"] for c in p["stages"][0]["trials"].values())
    assert main(argv[:-3] + ["--device-profile", "h200"]) == 2  # goes with --plan
    assert "--device-profile goes with --plan" in capsys.readouterr().err


def test_readme_shows_a_plan_excerpt_with_gpu_hours():
    readme = (ROOT / "README.md").read_text()
    excerpt = readme[readme.index("### Reading the plan"):]
    excerpt = excerpt[:excerpt.index("\n## ")]
    assert "--plan --device-profile h200" in excerpt and "GPU-hours" in excerpt and "PFLOP" in excerpt
    assert "trials at once:" in excerpt and "BENCHMARKS.md, section 'GPU suite" in excerpt


# ---------------------------------------------------------------- a spec is parsed once per command
TABLE2 = str(ROOT / "experiments" / "table2.yaml")
STUB_RATE = {"flops_per_s": 1e9, "device": "cpu", "dtype": "float32", "workload": "stub", "seconds": 0.0, "steps": 1}


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
    monkeypatch.setattr(perf, "measure_conv_rate", lambda *a, **k: STUB_RATE)
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


# ---------------------------------------------------------------- each trial's memory (plan.run_memory)
MEM_SMOKE = {"name": "mem", "methods": ["unet"], "seeds": 1, "preset": "smoke",
         "epochs": {"train": 1, "train_iters": 1},
         "data": {"synthetic_images": 4, "synthetic_size": 64, "crop_size": 32, "stride": 32},
         "resources": {"cpu": 1}}
GiB = 2 ** 30


def _cfg(method="unet", crop=32, **overrides):
    spec = parse_spec({**MEM_SMOKE, "methods": [method], "data": {**MEM_SMOKE["data"], "crop_size": crop},
                       "overrides": overrides})
    return config_from_dict(trial_config(spec, method, 0))


def test_a_runs_memory_follows_its_model_crop_batch_and_data():
    unet = _cfg()
    need = plan.run_memory(unet, "train")
    assert need == plan.run_memory(unet, "train")  # shapes and constants only: the same figure every time
    params, saved = plan._saved_activations(unet, "train", "w")
    assert params == 3647524  # the U-Net's parameters, counted on the meta device
    expected = plan.MEMORY_MARGIN * (plan.WORKER_BYTES + plan.STATE_COPIES * 4 * params
                                     + plan.ACTIVATIONS * 1 * 4 * saved)  # per_class 1 x 4 classes
    assert need == int(expected)
    # measured peak of this retrain in a worker-like process: 0.78 GiB; the estimate stays above it
    assert 0.8 * GiB < need < 1.5 * GiB
    # more pixels, a larger batch, more data: more memory
    assert plan.run_memory(_cfg(crop=64), "train") > need
    assert plan.run_memory(_cfg(**{"train.per_class": 2}), "train") > need
    assert plan.run_memory(unet, "train", data_size=GiB) == int(expected + plan.MEMORY_MARGIN * GiB)
    # the search's supernet holds far more activations than the net it retrains
    search = _cfg("nas-scam-p-sync")
    assert plan.run_memory(search, "search") > plan.run_memory(search, "train") > need
    assert plan.fmt_bytes(need) == f"{need / 2 ** 20:.0f} MiB" and plan.fmt_bytes(1.5 * GiB) == "1.5 GiB"


def test_a_trial_asks_ray_for_its_own_memory():
    request = runner.trial_resources(1, 0.5, {"train__unet__seed0": 123_000_000, "train__cbam__seed0": 456})
    assert request({"trial": "train__unet__seed0", "ctx": {}}).bundles == [
        {"CPU": 1, "GPU": 0.5, "memory": 123_000_000}]
    assert request({"trial": "train__cbam__seed0"}).bundles[0]["memory"] == 456


def test_a_trial_must_fit_on_one_node_not_on_the_cluster():
    memory = {"search__nas-scam-p-sync__seed0": 6 * GiB, "train__unet__seed0": GiB, "train__cbam__seed0": 5 * GiB}
    assert runner.memory_problem(memory, [8 * GiB, 2 * GiB]) is None
    problem = runner.memory_problem(memory, [4 * GiB, 4 * GiB])  # 8 GiB in all, 4 on the largest node
    assert problem.startswith("trial search__nas-scam-p-sync__seed0 (and 1 more trials) needs about 6.0 GiB of "
                              "memory, more than any node of the cluster offers (the largest: 4.0 GiB of Ray's "
                              "memory resource")
    assert "data.crop_size" in problem and "per_class" in problem
    assert runner.memory_problem({"train__unet__seed0": GiB}, []).startswith("trial train__unet__seed0 needs")


def test_the_plan_shows_what_each_trial_asks_for(home, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**MEM_SMOKE, "methods": ["unet", "cbam"]}))
    assert main(["ablate", str(spec), "--plan", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    by_run = {t["run"]: t["memory"] for t in p["trials"]}
    assert set(by_run) == {"train__unet__seed0", "train__cbam__seed0"}
    data = plan.data_bytes(_prepared())  # the synthetic dataset the plan prepared
    assert by_run["train__unet__seed0"] == plan.run_memory(_cfg(), "train", data)
    assert p["totals"]["memory"] == max(by_run.values())
    assert any(n.startswith("Memory: what each trial asks Ray for") for n in p["notes"])
    assert main(["ablate", str(spec), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "memory" in text.split("runs (2):")[1].splitlines()[1]  # a column of the runs table
    assert plan.fmt_bytes(by_run["train__unet__seed0"]) in text
    assert f"the largest trial asks Ray for {plan.fmt_bytes(p['totals']['memory'])} of memory" in text
    # what the runner asks for is the same figure, the trial's largest run
    trials = plan.expand(parse_spec({**MEM_SMOKE, "methods": ["unet", "cbam"]}), tmp_path, get_settings().data_root)
    assert plan.trial_memory(trials, get_settings().data_root) == by_run


def _prepared():
    from nas_core.data import ensure_dataset

    cfg = config_from_dict(trial_config(parse_spec(MEM_SMOKE), "unet", 0, data_root=get_settings().data_root))
    return ensure_dataset(cfg.data, get_settings().data_root, cfg.data.seed, progress=False)


@pytest.mark.slow  # two Ray starts: about 30 s on a busy 2-core machine
@pytest.mark.ray
def test_a_trial_no_node_can_hold_is_refused_before_anything_starts(home, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    ray_tmp = Path(tempfile.mkdtemp(prefix="nsm-", dir="/tmp"))  # AF_UNIX socket paths stay short
    try:
        monkeypatch.setenv("NAS_SCAM_RAY_NUM_CPUS", "1")
        monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
        get_settings.cache_clear()
        monkeypatch.setattr(plan, "WORKER_BYTES", 2 ** 50)  # every trial now needs over 1000 TiB
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(MEM_SMOKE))
        for _ in range(2):  # the identical command again: the same refusal, not "pass --resume"
            assert main(["ablate", str(spec)]) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]  # Ray's own INFO lines come first
            assert err.startswith("nas-scam ablate: error: trial train__unet__seed0 needs about 1228.8 TiB of "
                                  "memory, more than any node of the cluster offers"), err
            assert "Traceback" not in err
        assert not (home / "runs" / "mem" / "ablation.json").exists()
        c = MlflowClient(f"sqlite:///{home}/mlflow/mlflow.db")
        exp = c.get_experiment_by_name("mem")
        assert exp is None or not c.search_runs([exp.experiment_id])
        ray = sys.modules.get("ray")
        assert ray is None or not ray.is_initialized()  # the Ray it started for the check is stopped
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
