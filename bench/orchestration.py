"""A trial through Ray Tune vs the same work called directly: wall times, overhead, and what causes it.

    .venv/bin/python bench/orchestration.py --quick     # tiny unet trial, 3 reps, no end-to-end row (1-2 min)
    .venv/bin/python bench/orchestration.py             # smoke-preset unet trial, 3 reps, + `nas-scam ablate`
    .venv/bin/python bench/orchestration.py --method nas-scam-p-sync --reps 5 --no-model

Prints numbers and ratios, never passes or fails. The unit of work is one Table 2 trial (one method,
one seed; a NAS-SCAM method runs its search then its retrain) of the smoke preset on the synthetic
data, with the RunConfig that ``orchestrator.specs.build_config`` builds for a trial. The dataset is
prepared once, untimed (``runner.prepare_data``, as the driver does before any trial), and two direct
runs (without, then with MLflow) warm the process up before timing. Rows per repetition, interleaved (rep 1 of every row, then rep 2,
...), medians reported:
- direct: ``run_search``/``run_train`` called in this process, no tracking;
- direct + MLflow: the same, plus the trial's MLflow logging through ``phases.run_phase`` (child
  run, params, per-epoch metrics, results, learning curve, the model unless --no-model), as a trial
  records it, but no Ray;
- direct + MLflow, new process: the same in a fresh interpreter (``--child``), timed from spawn to exit,
  with the work's own time inside it: what any process isolation costs, Ray or not;
- ray.init: ``runner.start_ray`` on a local cluster (loopback, ``--ray-cpus`` CPUs, no dashboard);
- Tune trial (Ray up): ``runner.tuner(trials.ablation_trial, ...)`` with a one-point grid, as
  ``run_ablation`` builds it. Split with Tune's own ``time_total_s`` of the trial (time inside the
  trainable up to its last report) into "outside the trainable" (Tune controller, the trial actor's
  process start and imports, teardown) and "inside the trainable" (the work, MLflow, checkpoints and
  ``tune.report``, on a cold worker);
- ray.shutdown;
- nas-scam ablate (default mode only): ``runner.run_ablation`` end to end, which starts and stops its
  own Ray and adds the parent run and Table 2 (printed, written, logged).
Every trial runs with 1 CPU and OMP_NUM_THREADS (default 1) torch threads, the direct rows too. The
MLflow store (sqlite, as the project's default) and every output live in a temporary folder. The last
line prints each path's test DSC: equal values confirm the same computation; the amount of work (and so
the timing) does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# before torch is imported (here and in every Ray worker, which inherit the driver's environment)
THREADS = int(os.environ.setdefault("OMP_NUM_THREADS", "1"))
os.environ.setdefault("NAS_SCAM_PROGRESS", "0")
os.environ.pop("RAY_ADDRESS", None)  # always a local cluster: this measures our start-up too

# quick: the test suite's tiny trial; default: the smoke preset as `nas-scam ablate --preset smoke` runs it
SIZES = {
    "quick": {"epochs": {"search": 1, "warmup": 0, "train": 2, "search_iters": 1, "train_iters": 2},
              "data": {"synthetic_images": 6, "synthetic_size": 64, "crop_size": 32, "stride": 32}},
    "default": {},
}


def make_spec(method: str, seed: int, quick: bool, name: str = "bench"):
    from orchestrator.specs import AblationSpec

    return AblationSpec(name=name, methods=[method], seeds=[seed], repeat="full", preset="smoke",
                        resources={"cpu": 1, "gpu": 0}, max_failures=0, **SIZES["quick" if quick else "default"])


def make_settings(tmp: Path, ray_cpus: int):
    from orchestrator.settings import Settings

    # every path explicit: NAS_SCAM_* variables of the caller must not point the benchmark elsewhere
    return Settings(home=tmp / "home", data_dir=tmp / "data", runs_dir=tmp / "runs",
                    mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", mlflow_artifacts_dir=tmp / "artifacts",
                    ray_address=None, ray_num_cpus=ray_cpus)


# ---------------------------------------------------------------- the direct paths
def direct_trial(spec, method: str, seed: int, root: Path, data_root: Path, track=None, log_model: bool = True):
    """What ``trials.ablation_trial`` does for stage "full", in this process; ``track``: a ``tracking.Tracker``
    with its parent run open, or None for no tracking."""
    from orchestrator.specs import build_config, get_method, run_name

    search_dir = None
    if get_method(method).needs_search:
        search_dir = root / run_name("search", method, seed)
        _direct_phase("search", build_config(spec, method, seed, data_root=data_root), search_dir, method, seed,
                      track, log_model)
    genotype = search_dir / "genotype.json" if search_dir else None
    cfg = build_config(spec, method, seed, data_root=data_root, genotype=genotype)
    return _direct_phase("train", cfg, root / run_name("train", method, seed), method, seed, track, log_model)


def _direct_phase(phase: str, cfg, out_dir: Path, method: str, seed: int, track, log_model: bool):
    from nas_core.engine import run_search, run_train
    from orchestrator.phases import run_phase

    if track is None:
        return (run_search if phase == "search" else run_train)(cfg, out_dir, resume=True)
    # a trial's phase without Ray: the same recorder, no Tune report or checkpoint
    return run_phase(track, method, seed, phase, cfg, out_dir, log_model=log_model)[1]


# ---------------------------------------------------------------- the Ray paths
def tune_trial(spec, method: str, seed: int, root: Path, settings, track, log_model: bool) -> dict:
    """One ``ablation_trial`` through ``runner.tuner`` on the running Ray: its final metrics."""
    from ray import tune

    from orchestrator import plan
    from orchestrator.runner import trial_name, tuner
    from orchestrator.trials import ablation_trial

    ctx = {**track.ctx(), "runs_dir": str(root), "data_root": str(settings.data_root), "log_model": log_model}
    one = spec.model_copy(update={"methods": [method], "seeds": [seed], "repeat": "full"})
    (trial,) = plan.expand(one, root, settings.data_root)
    space = {"trial": tune.grid_search([trial.name]), "ctx": ctx}
    tc = tune.TuneConfig(trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    trainable = tune.with_parameters(ablation_trial, trials={trial.name: trial.to_dict()})
    grid = tuner(trainable, "stage-full", root / "tune", space, tc, {"cpu": 1, "gpu": 0}, 0, False).fit()
    res = grid[0]
    if res.error is not None:
        raise RuntimeError(f"the Tune trial failed: {res.error}")
    return res.metrics


@contextlib.contextmanager
def quiet(log: Path):
    """Tune's progress tables, Ray's and MLflow's logs go to ``log`` (fd level: worker output too)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def timed(times: dict, key: str, fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    times.setdefault(key, []).append(time.perf_counter() - t)
    return out


def one_rep(r: int, a, spec, settings, tmp: Path, times: dict, dsc: dict) -> None:
    import ray

    from orchestrator import runner, tracking

    def parent(label: str) -> tracking.Tracker:
        # untimed, like the parent run a driver opens once for all its trials
        track = tracking.Tracker.connect(settings.tracking_uri, "bench", settings.artifacts_root)
        track.open_parent(f"{label}-r{r}", "bench", {}, "")
        return track

    rep = tmp / f"rep{r}"
    res = timed(times, "direct", direct_trial, spec, a.method, a.seed, rep / "direct", settings.data_root)
    dsc["direct"] = res.test["dsc"]["Average"]
    res = timed(times, "direct + MLflow", direct_trial, spec, a.method, a.seed, rep / "direct-mlflow",
                settings.data_root, parent("direct-mlflow"), not a.no_model)
    dsc["+ MLflow"] = res.test["dsc"]["Average"]

    # the same as a fresh interpreter (what any process isolation pays, Ray or not)
    job = {"method": a.method, "seed": a.seed, "quick": a.quick, "tmp": str(tmp), "ray_cpus": a.ray_cpus,
           "root": str(rep / "fresh"), **parent("fresh").ctx(), "log_model": not a.no_model}
    out = timed(times, "direct + MLflow, new process", subprocess.run,
                [sys.executable, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE, text=True, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    times.setdefault("  the work in it (cold)", []).append(child["work_s"])
    dsc["new process"] = child["dsc"]

    track = parent("tune")
    started = timed(times, "ray.init", runner.start_ray, settings, 1, 0)
    try:
        if not started:
            raise RuntimeError("a Ray was already running in this process; the benchmark needs its own")
        metrics = timed(times, "Tune trial (Ray up)", tune_trial, spec, a.method, a.seed, rep / "tune", settings,
                        track, not a.no_model)
    finally:
        timed(times, "ray.shutdown", ray.shutdown)
    times.setdefault("  inside the trainable", []).append(metrics["time_total_s"])
    times.setdefault("  outside the trainable", []).append(times["Tune trial (Ray up)"][-1] - metrics["time_total_s"])
    dsc["Tune"] = metrics["test_Average"] / 100

    if a.e2e:
        e2e = spec.model_copy(update={"name": f"e2e-r{r}"})
        out = timed(times, "nas-scam ablate (run_ablation)", runner.run_ablation, e2e, settings,
                    log_model=not a.no_model)
        if out.failures:
            raise RuntimeError(f"run_ablation: {out.failures}")


def child(job: dict) -> None:
    """``--child``: the direct + MLflow trial in this fresh interpreter; prints its work time and DSC."""
    from orchestrator import tracking

    settings = make_settings(Path(job["tmp"]), job["ray_cpus"])
    track = tracking.Tracker.attach(settings.tracking_uri, job["experiment_id"], job["parent_run_id"])
    t = time.perf_counter()
    res = direct_trial(make_spec(job["method"], job["seed"], job["quick"]), job["method"], job["seed"],
                       Path(job["root"]), settings.data_root, track, job["log_model"])
    print(json.dumps({"work_s": time.perf_counter() - t, "dsc": res.test["dsc"]["Average"]}), flush=True)


# ---------------------------------------------------------------- report
def header(a) -> str:
    import mlflow
    import ray
    import torch
    from step import machine  # bench/step.py: CPU model, logical CPUs, torch threads, torch version

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{machine(torch.device('cpu'))}; ray {ray.__version__}; mlflow {mlflow.__version__}\n"
            f"load average before the run: {load} (a shared machine: rows are interleaved, medians)\n"
            f"trial: method {a.method}, seed {a.seed}, smoke preset{' (quick: tiny)' if a.quick else ''}, "
            f"1 CPU per trial, local Ray with {a.ray_cpus} CPUs, log_model={not a.no_model}, reps {a.reps}")


def report(times: dict, dsc: dict) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    base, tracked = med["direct"], med["direct + MLflow"]
    lines = [f"{'row':34s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'vs direct':>9s} {'- direct s':>10s}"]
    for k, v in times.items():
        ratio = f"{med[k] / base:8.2f}x" if not k.startswith(("  ", "ray.")) else " " * 9
        extra = f"{med[k] - base:+10.2f}" if not k.startswith(("  ", "ray.")) else " " * 10
        lines.append(f"{k:34s} {med[k]:9.2f} {min(v):7.2f} {max(v):7.2f} {ratio} {extra}")
    tune, fresh = med["Tune trial (Ray up)"], med["direct + MLflow, new process"]
    cold = med["ray.init"] + tune + med["ray.shutdown"]
    lines += ["", "where the time goes (medians, seconds):",
              f"  MLflow tracking               {tracked - base:+7.2f}  (direct + MLflow vs direct)",
              f"  a new Python process          {fresh - tracked:+7.2f}  (interpreter, imports "
              f"{fresh - med['  the work in it (cold)']:.2f}; cold first steps "
              f"{med['  the work in it (cold)'] - tracked:+.2f})",
              f"  Ray Tune per trial, Ray up    {tune - fresh:+7.2f}  (Tune trial vs new process; "
              f"{tune / fresh:.2f}x)",
              f"  Tune trial vs direct + MLflow {tune - tracked:+7.2f}  ({tune / tracked:.2f}x; outside the "
              f"trainable {med['  outside the trainable']:.2f}, inside beyond direct "
              f"{med['  inside the trainable'] - tracked:+.2f})",
              f"  Ray start-up / shut-down       {med['ray.init']:6.2f} / {med['ray.shutdown']:.2f}",
              f"  one trial from a cold Ray      {cold:6.2f}  ({cold / base:.2f}x direct, "
              f"{cold / tracked:.2f}x direct + MLflow)"]
    e2e = med.get("nas-scam ablate (run_ablation)")
    if e2e is not None:
        rest = e2e - med["ray.init"] - tune - med["ray.shutdown"]
        lines.append(f"  run_ablation beyond that      {rest:+7.2f}  (preflight, parent run, Table 2)")
    same = "equal" if len({round(v, 9) for v in dsc.values()}) == 1 else "differ"
    lines.append(f"test DSC Average of the same work (last rep, {same}): "
                 + ", ".join(f"{k} {v:.6f}" for k, v in dsc.items()))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="unet", help="a Table 2 method id (NAS-SCAM ones search, then retrain)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--no-model", action="store_true", help="skip mlflow.pytorch.log_model (as `ablate --no-model`)")
    ap.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the run_ablation row")
    ap.add_argument("--quick", action="store_true", help="tiny trial, no run_ablation row (1-2 min)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.e2e = False
    if a.reps < 1:
        raise SystemExit(f"--reps {a.reps}: expected at least 1")
    import torch

    torch.set_num_threads(THREADS)
    if a.child:
        return child(json.loads(a.child))
    from orchestrator.runner import prepare_data

    print(header(a), flush=True)
    with tempfile.TemporaryDirectory(prefix="nas-scam-bench-orch-") as d:
        tmp = Path(d)
        log = tmp / "ray-tune-mlflow.log"
        spec, settings = make_spec(a.method, a.seed, a.quick), make_settings(tmp, a.ray_cpus)
        times: dict = {}
        dsc: dict = {}
        try:
            with quiet(log):
                t = time.perf_counter()
                prepare_data(spec, settings, [a.seed])
                direct_trial(spec, a.method, a.seed, tmp / "warmup", settings.data_root)
                # MLflow's first use in a process (store migration, lazy imports) is not per-trial cost
                from orchestrator import tracking

                track = tracking.Tracker.connect(settings.tracking_uri, "bench", settings.artifacts_root)
                track.open_parent("warmup", "bench", {}, "")
                direct_trial(spec, a.method, a.seed, tmp / "warmup-mlflow", settings.data_root, track,
                             not a.no_model)
                warm = time.perf_counter() - t
            print(f"untimed set-up (dataset, one warm-up run without and one with MLflow): {warm:.1f} s", flush=True)
            for r in range(a.reps):
                t = time.perf_counter()
                with quiet(log):
                    one_rep(r, a, spec, settings, tmp, times, dsc)
                print(f"rep {r + 1}/{a.reps}: {time.perf_counter() - t:.1f} s", flush=True)
        except BaseException:
            if log.exists():
                print("---- tail of the Ray/Tune/MLflow log ----\n" + log.read_text(errors="replace")[-6000:],
                      file=sys.stderr)
            raise
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        print()
        print(report(times, dsc))


if __name__ == "__main__":
    main()
