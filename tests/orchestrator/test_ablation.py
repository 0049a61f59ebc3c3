"""`nas-scam ablate`: bad input stops before any trial; a real 2 x 2 smoke ablation; kill and resume."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]

# tiny but complete: crops 32, a 1-epoch search of 1 iteration, 2 retrain epochs of 2 iterations,
# 6 synthetic images of 64 px (the supernet on CPU is the slow part)
TINY = {
    "name": "smoke2x2", "methods": ["unet", "nas-scam-p-sync"], "seeds": 2, "preset": "smoke",
    "epochs": {"search": 1, "warmup": 0, "train": 2, "search_iters": 1, "train_iters": 2},
    "data": {"synthetic_images": 6, "synthetic_size": 64, "crop_size": 32, "stride": 32},
    "resources": {"cpu": 1},
}
# repeat: retrain (the default, the release's): one search, then both seeds retrain its genotype
EXPECTED_RUNS = {("unet", "0", "train"), ("unet", "1", "train"), ("nas-scam-p-sync", "0", "search"),
                 ("nas-scam-p-sync", "0", "train"), ("nas-scam-p-sync", "1", "train")}


def _spec(tmp_path, **changes) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump({**TINY, **changes}))
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, env, words", [
    (["--methods", "unet,nas-scam-q"], {}, "unknown method 'nas-scam-q'"),
    (["--seeds", "-2"], {}, "seeds: seed count must be between 1 and 1000, got -2"),
    (["--data", "/nonexistent/monusac"], {}, "data folder /nonexistent/monusac does not exist"),
    ([], {"NAS_SCAM_MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}, "http://127.0.0.1:{port} is unreachable"),
    ([], {"NAS_SCAM_RAY_ADDRESS": "127.0.0.1:{port}"}, "Ray address 127.0.0.1:{port} is unreachable"),
])
def test_bad_input_is_reported_before_any_trial(home, tmp_path, monkeypatch, capsys, extra, env, words):
    port = _free_port()
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(port=port))
    get_settings.cache_clear()
    rc = main(["ablate", str(_spec(tmp_path)), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and words.format(port=port) in err and "Traceback" not in err, err
    assert not (home / "runs" / "smoke2x2").exists()  # no parent run, no Tune state: nothing started
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def _cli(*args, env=None, **kw) -> subprocess.Popen:
    env = {**os.environ, "NAS_SCAM_PROGRESS": "0", "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    # the driver's session holds the local Ray it started: end exactly that group
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _runs(home: Path, name: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{home}/mlflow/mlflow.db")
    exp = c.get_experiment_by_name(name)
    return c, exp, c.search_runs([exp.experiment_id], max_results=1000) if exp else []


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_ablation_runs_tracks_and_tables(home, tmp_path):
    t0 = time.monotonic()
    proc = _cli("ablate", str(_spec(tmp_path)), env={"NAS_SCAM_HOME": str(home)})
    out = _finish(proc)
    print(f"smoke 2x2 ablation wall time: {time.monotonic() - t0:.1f} s\n{out[-3000:]}")
    assert proc.returncode == 0, out[-5000:]
    assert "Table 2" in out and "NAS-SCAM-P, synchronous search" in out and "65.01 ± 1.07" in out
    # what a person sees: a line per trial event and an ETA, none of Tune's or the workers' chatter
    # repeat: retrain (the default): a search stage of one trial, then the 4 retrains
    assert "started   train__unet__seed0" in out and "4/4 train trials done" in out and "ETA" in out
    for noise in ("Trial status", "(ablation_trial pid", "snapshotting", "Checkpoint successfully", "\x1b[",
                  "tensorboard", "Saving pytorch model by Pickle"):
        assert noise not in out, noise
    assert len(out.splitlines()) <= 45, out
    assert (home / "runs" / "smoke2x2" / "logs" / "train__unet__seed0.log").is_file()

    c, exp, runs = _runs(home, "smoke2x2")
    parents = [r for r in runs if r.data.tags.get("nas_scam_kind") == "ablation"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    keys = [(r.data.tags["method"], r.data.tags["seed"], r.data.tags["phase"]) for r in kids]
    assert sorted(keys) == sorted(EXPECTED_RUNS)  # one child per (method, seed, phase), no duplicates
    assert all(r.info.status == "FINISHED" for r in kids)
    assert {a.path for a in c.list_artifacts(parent, "table2")} >= {"table2/table2.md", "table2/table2.png"}
    # the parent states its repeat scope and spread, and holds the plan made before the trials ran
    assert (parents[0].data.tags["repeat"], parents[0].data.tags["std"]) == ("retrain", "population")
    assert {"plan.json", "plan.md"} <= {a.path for a in c.list_artifacts(parent)}
    plan = json.loads(Path(c.download_artifacts(parent, "plan.json", str(tmp_path / "plan"))).read_text())
    assert sorted((t["method"], str(t["seed"]), t["phase"]) for t in plan["trials"]) == sorted(EXPECTED_RUNS)
    assert "population std (ddof=0)" in out and "repeat=retrain" in out

    for r in kids:
        rid = r.info.run_id
        assert r.data.params["seed"] == r.data.tags["seed"] and r.data.params["model.name"] in ("unet", "nas-scam-p")
        steps = [m.step for m in c.get_metric_history(rid, "train_loss")]
        assert steps == ([1] if r.data.tags["phase"] == "search" else [1, 2])  # 1-based epochs
        arts = {a.path for a in c.list_artifacts(rid)} | {a.path for a in c.list_artifacts(rid, "figures")}
        assert "figures/learning_curve.png" in arts  # orchestrator.curves, every phase
        if r.data.tags["phase"] == "search":
            assert {"genotype.json", "alpha_history.npz", "figures/genotype_cells.png", "figures/alpha_summary.png",
                    "figures/alpha_final_sam_down1-down4.png", "figures/alpha_evolution_cam_up1-up4.png"} <= arts
            geno = json.loads(Path(c.download_artifacts(rid, "genotype.json", str(tmp_path / rid))).read_text())
            assert geno["combine"] == "parallel" and len(geno["sam"]) == 8
        else:
            # the one 64 px test image lacks some classes: a class neither predicted nor present is NaN
            # (nas_core/metrics.py), which a 2-epoch model's predictions can make either way
            for cls in ("Average", "Epithelial", "Lymphocyte", "Macrophage", "Neutrophil"):
                v = r.data.metrics[f"test_dsc_{cls}"]
                assert v != v or 0.0 <= v <= 100.0, (cls, v)  # in %
            assert 0.0 <= r.data.metrics["test_dsc_Average"] <= 100.0
            assert "metrics.json" in arts
    models = c.search_logged_models(experiment_ids=[exp.experiment_id])
    train_ids = {r.info.run_id for r in kids if r.data.tags["phase"] == "train"}
    assert {m.source_run_id for m in models} == train_ids
    # Table 2 on the parent; each (method, seed)'s best model registered under its method
    assert {"avg_dsc/unet", "avg_dsc/nas-scam-p-sync", "dsc/Neutrophil/unet"} <= set(parents[0].data.metrics)
    for name in ("nas-scam-unet", "nas-scam-p-sync"):
        versions = c.search_model_versions(f"name = '{name}'")
        assert sorted(v.tags["seed"] for v in versions) == ["0", "1"]

    # the table rebuilt from MLflow alone matches the printed one
    table_out = tmp_path / "rebuilt"
    rebuilt = subprocess.run([sys.executable, "-m", "orchestrator.cli", "table", "smoke2x2", "--out", str(table_out)],
                             cwd=ROOT, env={**os.environ, "NAS_SCAM_HOME": str(home)}, capture_output=True,
                             text=True, timeout=120)
    assert rebuilt.returncode == 0, rebuilt.stderr
    printed = out[out.index("Table 2"):].splitlines()[2:8]
    assert all(line in rebuilt.stdout for line in printed)


# a random control, one axis and 2 patient folds (issue 23): 12 images of 64 px make 4 synthetic
# patients, so each fold tests 2 and keeps one for validation and one for training
GRID = {**TINY, "name": "grid", "methods": ["unet", "random-s-shared"], "seeds": 1,
        "axes": {"train.lr": [1.0e-4, 1.0e-3]},
        "data": {**TINY["data"], "synthetic_images": 12, "folds": 2, "split_by": "patient"},
        "epochs": {"train": 1, "train_iters": 2}, "max_concurrent": 2}


@pytest.mark.slow
@pytest.mark.ray
def test_grid_with_a_random_control_an_axis_and_folds_runs_end_to_end(home, tmp_path):
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(GRID))
    env = {"NAS_SCAM_HOME": str(home)}
    plan = _finish(_cli("ablate", str(spec), "--plan", env=env), timeout=300)
    assert "grid: 2 methods x 1 seeds x train.lr in [0.0001, 0.001] x 2 patient folds" in plan, plan[-3000:]
    assert "total: 8 runs" in plan

    out = _finish(_cli("ablate", str(spec), env=env))
    assert "Traceback" not in out and "8/8 train trials done" in out, out[-5000:]
    for variant in ("train.lr=0.0001", "train.lr=0.001"):
        assert f"[{variant}] U-Net (2 folds)" in out and f"[{variant}] Random-S, shared (control) (2 folds)" in out
    root = home / "runs" / "grid"
    for lr in ("0.0001", "0.001"):
        for fold in (0, 1):
            run = root / f"train__random-s-shared__seed0__fold{fold}__train.lr={lr}"
            geno = json.loads((run / "genotype.json").read_text())  # drawn per seed: the same in every cell
            assert geno == json.loads((root / "train__random-s-shared__seed0__fold0__train.lr=0.0001"
                                       / "genotype.json").read_text())
            assert geno["search"] == "shared" and len({tuple(c) for c in geno["sam"]}) == 1
            result = json.loads((run / "result.json").read_text())
            assert len(result["test"]["images"]) == 6  # 2 test patients of 3 images
    assert (root / "table2" / "per_fold.csv").is_file()

    # MLflow children carry the grid's identity as tags
    c, exp, runs = _runs(home, "grid")
    kids = [r for r in runs if r.data.tags.get("phase") == "train"]
    assert len(kids) == 8
    assert {(r.data.tags["fold"], r.data.tags["axis.train.lr"]) for r in kids} == {
        (f, lr) for f in ("0", "1") for lr in ("0.0001", "0.001")}
    assert all(r.data.tags["variant"] == f"train.lr={r.data.tags['axis.train.lr']}" for r in kids)

    assert "random-s-shared - unet [train.lr=0.001]:" in out  # the paired comparison under Table 2
    # the paired comparison, over the 12 test images of both folds
    cmp = subprocess.run([sys.executable, "-m", "orchestrator.cli", "compare", "grid", "random-s-shared", "unet",
                          "--variant", "train.lr=0.001", "--resamples", "500"], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    assert "over 12 paired test images" in cmp.stdout and "Average" in cmp.stdout
    # the report of a grid: variants grouped, paired table, area ratios, DSC by fold
    rep = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", "grid"], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (root / "report" / "report.md").read_text()
    assert "[train.lr=0.001] Random-S, shared (control)" in md and "random-s-shared - unet" in md
    assert "## Predicted vs true area" in md and "## DSC by fold" in md


@pytest.mark.slow
@pytest.mark.ray
def test_killed_driver_resumes_without_rerunning_finished_trials(home, tmp_path):
    spec = _spec(tmp_path, name="resume2x2")
    env = {"NAS_SCAM_HOME": str(home)}
    proc = _cli("ablate", str(spec), env=env)
    finished = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1.0)
            # the driver writes its state after creating the store: a client opened earlier would race it
            # through MLflow's table creation (two alembic migrations on one sqlite file)
            if not (home / "runs" / "resume2x2" / "ablation.json").exists():
                continue
            try:
                c, exp, runs = _runs(home, "resume2x2")
            except Exception:  # the store is being created
                continue
            done = [r for r in runs if r.data.tags.get("phase") == "train" and r.info.status == "FINISHED"]
            if done:
                finished = done[0]
                break
    finally:
        if proc.poll() is not None:  # the driver must still be running to be killed: say why it is not
            print(f"driver exited {proc.returncode}:\n{proc.stdout.read()[-5000:]}")
        os.kill(proc.pid, signal.SIGKILL)  # the driver only
        proc.wait(timeout=30)
        time.sleep(3)
        _kill_group(proc)
    assert finished is not None, "no trial finished before the deadline"
    c, exp, runs = _runs(home, "resume2x2")
    assert not all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("phase") == "train") or \
        len([r for r in runs if r.data.tags.get("phase") == "train"]) < 4, "killed too late to test resume"
    fid = finished.info.run_id
    result_json = home / "runs" / "resume2x2" / finished.info.run_name / "result.json"
    stamp = result_json.stat().st_mtime_ns
    history = [(m.step, m.timestamp) for m in c.get_metric_history(fid, "train_loss")]

    out = _finish(_cli("ablate", str(spec), "--resume", env=env))
    assert "Table 2" in out, out[-5000:]
    c, exp, runs = _runs(home, "resume2x2")
    kids = [r for r in runs if "phase" in r.data.tags]
    keys = sorted((r.data.tags["method"], r.data.tags["seed"], r.data.tags["phase"]) for r in kids)
    assert keys == sorted(EXPECTED_RUNS)  # resumed trials reused their runs: still one per key
    assert all(r.info.status == "FINISHED" for r in kids)
    again = c.get_run(fid)
    assert again.info.end_time == finished.info.end_time  # the finished trial's run was not touched
    assert [(m.step, m.timestamp) for m in c.get_metric_history(fid, "train_loss")] == history
    assert result_json.stat().st_mtime_ns == stamp  # nor its run folder
    for r in kids:
        if r.data.tags["phase"] == "train":  # every epoch logged exactly once, across the kill
            assert [m.step for m in c.get_metric_history(r.info.run_id, "train_loss")] == [1, 2]
    lines = out[out.index("Table 2"):].splitlines()
    assert sum(1 for line in lines if " 2  ours " in line) == 2  # both methods with n = 2 seeds


@pytest.mark.slow
@pytest.mark.ray
def test_an_hpo_trial_that_survives_asha_finishes_with_its_test_metrics(home, tmp_path):
    # ASHA stopped every trial at max_t = epochs, i.e. at its last epoch report and before the test
    # evaluation: trials ended KILLED without test metrics. A single trial meets no rung cut-off.
    spec = tmp_path / "hpo.yaml"
    spec.write_text(yaml.safe_dump({
        "kind": "hpo", "name": "hpo1", "method": "unet", "preset": "smoke", "num_samples": 1,
        "metric": "val_dsc", "mode": "max", "grace_period": 1, "reduction_factor": 2,
        "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        "overrides": {"train.val_every": 1, "train.epochs": 2}, "resources": {"cpu": 1, "gpu": 0}}))
    proc = _cli("hpo", str(spec), env={"NAS_SCAM_HOME": str(home)})
    out = _finish(proc)
    assert proc.returncode == 0, out[-5000:]
    c, exp, runs = _runs(home, "hpo1")
    trials = [r for r in runs if r.data.tags.get("phase", "").startswith("hpo-")]
    assert len(trials) == 1, [r.data.tags for r in runs]
    (trial,) = trials
    assert trial.info.status == "FINISHED"
    dsc = {k: v for k, v in trial.data.metrics.items() if k.startswith("test_dsc_")}
    assert "test_dsc_Average" in dsc and all(0.0 <= v <= 100.0 for v in dsc.values()), trial.data.metrics  # %
    assert trial.data.metrics["test_n_images"] >= 1
    best = yaml.safe_load((home / "runs" / "hpo1" / "best_config.yaml").read_text())
    assert 1e-4 <= best["train"]["lr"] <= 1e-2 and best["train"]["epochs"] == 2
