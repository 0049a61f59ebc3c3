"""Issue 22, item 2: each trial asks Ray for the memory its plan estimates (``plan.run_memory``), ``--plan``
shows it, and a spec whose trial no node can hold is refused before anything starts."""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from nas_core.config import config_from_dict
from orchestrator import plan, runner
from orchestrator.cli import main
from orchestrator.settings import get_settings
from orchestrator.specs import parse_spec, trial_config

SMOKE = {"name": "mem", "methods": ["unet"], "seeds": 1, "preset": "smoke",
         "epochs": {"train": 1, "train_iters": 1},
         "data": {"synthetic_images": 4, "synthetic_size": 64, "crop_size": 32, "stride": 32},
         "resources": {"cpu": 1}}
GiB = 2 ** 30


def _cfg(method="unet", crop=32, **overrides):
    spec = parse_spec({**SMOKE, "methods": [method], "data": {**SMOKE["data"], "crop_size": crop},
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
    spec.write_text(yaml.safe_dump({**SMOKE, "methods": ["unet", "cbam"]}))
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
    trials = plan.expand(parse_spec({**SMOKE, "methods": ["unet", "cbam"]}), tmp_path, get_settings().data_root)
    assert plan.trial_memory(trials, get_settings().data_root) == by_run


def _prepared():
    from nas_core.data import ensure_dataset

    cfg = config_from_dict(trial_config(parse_spec(SMOKE), "unet", 0, data_root=get_settings().data_root))
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
        spec.write_text(yaml.safe_dump(SMOKE))
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
