from pathlib import Path
"""The driver's progress lines: one per trial event, an overall line with an ETA, no ANSI; no Ray started."""
import io
import logging

import pytest

from orchestrator.progress import Progress, fmt_duration, quiet_logging, strip_ansi


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _progress(total=4, concurrency=2):
    clock, out = Clock(), io.StringIO()
    return Progress(total, concurrency, out=out, clock=clock), clock, out


def test_epoch_lines_name_the_trial_phase_epoch_and_metric():
    p, clock, out = _progress()
    assert p.trial_started("full__unet__seed0") == "started   full__unet__seed0"
    line = p.trial_result("full__unet__seed0", {"phase": "train", "epoch": 2, "epochs": 4, "val_dsc": 0.4567,
                                                "train_loss": 0.91234})
    assert line == "  full__unet__seed0: train epoch 3/4, val DSC 45.67%, loss 0.9123"
    # the trial's final report (phase "done") is not an epoch: the finished line carries the DSC
    assert p.trial_result("full__unet__seed0", {"phase": "done", "test_Average": 50.0}) is None
    assert out.getvalue().count("\n") == 2


def test_eta_comes_from_measured_trial_times_and_concurrency():
    p, clock, out = _progress(total=4, concurrency=2)
    p.trial_started("a"), p.trial_started("b")
    assert p.overall() == "0/4 trials done, elapsed 0s, ETA after the first trial"
    clock.t += 60
    p.trial_finished("a", {"test_Average": 41.5})
    p.trial_started("c")
    # b has run 60 s of a 60 s mean (0 left), c 0 s (60 left), one trial pending (60): 120 s over 2 slots
    assert p.eta() == 60.0
    clock.t += 30
    p.trial_failed("b", "RuntimeError: CUDA out of memory\n  at line 3", " (worker log: /x)")
    lines = out.getvalue().splitlines()
    assert lines[-3] == "finished  a in 1m00s: test DSC 41.50% | 1/4 trials done, elapsed 1m00s, ETA 1m00s"
    assert lines[-2] == "started   c"
    # c: 30 s of 60 left, d pending 60 -> 90 s over 2 slots
    assert lines[-1] == ("FAILED    b: RuntimeError: CUDA out of memory (worker log: /x) | "
                         "2/4 trials done, 1 failed, elapsed 1m30s, ETA 45s")
    clock.t += 40
    p.trial_finished("c", {}), p.trial_started("d")
    clock.t += 10
    p.trial_finished("d", {"test_Average": 12.0})
    assert out.getvalue().splitlines()[-1].endswith("| 4/4 trials done, 1 failed, elapsed 2m20s")


def test_without_a_concurrency_limit_the_width_is_the_most_trials_seen_at_once():
    p, clock, _ = _progress(total=6, concurrency=None)
    for name in "abc":
        p.trial_started(name)
    clock.t += 30
    p.trial_finished("a", {})
    # b, c at 30 s of 30 (0 left), 3 pending x 30 s over the 3 slots seen
    assert p.peak == 3 and p.eta() == 30.0


def test_a_whole_smoke_ablation_stays_short():
    # 2 baselines (4 train epochs) + 2 NAS-SCAM trials (3 search + 4 train epochs): the line budget of
    # the smoke run in the issue, before the table
    p, clock, out = _progress(total=4, concurrency=2)
    for name, phases in (("unet0", [("train", 4)]), ("nas0", [("search", 3), ("train", 4)]),
                         ("unet1", [("train", 4)]), ("nas1", [("search", 3), ("train", 4)])):
        p.trial_started(name)
        for phase, k in phases:
            for e in range(k):
                p.trial_result(name, {"phase": phase, "epoch": e, "epochs": k, "val_dsc": 0.1})
        clock.t += 20
        p.trial_finished(name, {"test_Average": 10.0})
    text = out.getvalue()
    assert len(text.splitlines()) == 4 + 22 + 4
    assert "ETA" in text and "\x1b" not in text and "\r" not in text


def test_strip_ansi_keeps_text_and_the_last_state_of_rewritten_lines():
    raw = ("\x1b[36m(ablation_trial pid=1)\x1b[0m train 1/4:   0%|  | 0/8\r"
           "\x1b[36m(ablation_trial pid=1)\x1b[0m train 1/4: 100%|##| 8/8\n\x1b[1;31mError\x1b[0m: boom\n")
    assert strip_ansi(raw) == "(ablation_trial pid=1) train 1/4: 100%|##| 8/8\nError: boom\n"
    assert strip_ansi("a\rb\r\nwindows line\r\n") == "b\nwindows line\n"
    assert fmt_duration(3725) == "1h02m" and fmt_duration(59.6) == "1m00s" and fmt_duration(-3) == "0s"


def test_quiet_logging_moves_ray_and_mlflow_chatter_to_a_file(tmp_path):
    # in a fresh interpreter, as the CLI runs it: logging handlers are process-wide, and what other tests
    # left on Ray's and MLflow's loggers (streams of earlier captures) must not decide this test
    log = tmp_path / "logs" / "driver.log"
    code = f"""
import logging
from orchestrator.progress import quiet_logging
import ray, mlflow
before = [(h, h.level) for h in logging.getLogger("ray").handlers]
with quiet_logging({str(log)!r}):
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("ray.tune.execution.experiment_state").warning("Experiment state snapshotting ...")
    logging.getLogger("ray._private.worker").error("the cluster is gone")
assert [(h, h.level) for h in logging.getLogger("ray").handlers] == before, "handlers not restored"
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    text = log.read_text()
    assert "Creating initial MLflow database tables" in text and "snapshotting" in text
    assert "Creating initial" not in out.stderr + out.stdout
    assert "snapshotting" not in out.stderr + out.stdout
    assert "the cluster is gone" in out.stderr  # real errors still reach the terminal


def test_eta_times_pending_trials_like_finished_ones_of_their_method():
    clock, out = Clock(), io.StringIO()
    names = ["full__unet__seed0", "full__nas__seed0", "full__unet__seed1", "full__nas__seed1"]
    p = Progress(0, 1, out=out, clock=clock, names=names)
    assert p.total == 4
    for name, took in (("full__unet__seed0", 10), ("full__nas__seed0", 100)):
        p.trial_started(name)
        clock.t += took
        p.trial_finished(name, {})
    # one slot: unet seed1 like unet seed0 (10 s), nas seed1 like nas seed0 (100 s)
    assert p.eta() == 110.0


def test_a_retried_trial_is_neither_done_nor_failed():
    p, clock, out = _progress(total=2)
    p.trial_started("a")
    line = p.trial_retried("a", "ValueError: boom\ntraceback")
    assert line == "retrying  a from its last checkpoint after: ValueError: boom"
    assert p.overall().startswith("0/2 trials done")


def test_tune_callback_reports_events_and_the_user_error_of_a_failed_trial():
    from orchestrator.progress import tune_callback

    class FakeTrial:
        def __init__(self, name, error=None, status="RUNNING"):
            self.name, self.error, self.last_result, self.status = name, error, {"test_Average": 33.3}, status

        def __str__(self):
            return self.name

        def get_error(self):
            return self.error

    wrapped = RuntimeError("Trial raised a RayTaskError:\n  ... 40 lines ...")
    wrapped.__cause__ = ValueError("data.crop_size must be a multiple of 16")
    p, clock, out = _progress(total=3)
    cb = tune_callback(p, log_dir="/runs/x/logs")
    ok, bad = FakeTrial("full__unet__seed0"), FakeTrial("full__cbam__seed0", wrapped)
    earlier = FakeTrial("full__scse__seed0", status="TERMINATED")  # finished before a --resume
    cb.on_trial_start(0, [earlier, ok, bad], ok), cb.on_trial_start(0, [earlier, ok, bad], bad)
    cb.on_trial_result(0, [], ok, {"phase": "train", "epoch": 0, "epochs": 2, "val_dsc": 0.25})
    cb.on_trial_complete(0, [], ok)
    cb.on_trial_error(0, [], bad)
    lines = out.getvalue().splitlines()
    assert lines[2] == "  full__unet__seed0: train epoch 1/2, val DSC 25.00%"
    assert lines[3].startswith("finished  full__unet__seed0 in 0s: test DSC 33.30% | 2/3 trials done")
    assert lines[4].startswith("FAILED    full__cbam__seed0: ValueError: data.crop_size must be a multiple of 16 "
                               "(worker log: /runs/x/logs) | 3/3 trials done, 1 failed")


def test_quiet_logging_creates_no_run_folder_without_records(tmp_path):
    with quiet_logging(tmp_path / "runs" / "x" / "logs" / "driver.log"):
        pass
    assert not (tmp_path / "runs").exists()  # a spec rejected before any run leaves nothing behind


# ---------------------------------------------------------------- issue 25: the ETA from the plan's costs
def _eta_progress(stages, slots=2, stage=0):
    from orchestrator.progress import Eta

    clock, out = Clock(), io.StringIO()
    eta = Eta(stages, slots, stage_start=0.0)
    names = list(stages[stage][1])
    return Progress(len(names), None, f"{stages[stage][0]} trials", out=out, clock=clock, names=names, eta=eta), \
        eta, clock, out


def test_plan_eta_is_known_before_any_trial_ends_for_the_stage_and_the_whole_run():
    stages = [("search", {"search__nas__seed0": 100.0}),
              ("train", {"train__unet__seed0": 20.0, "train__unet__seed1": 20.0,
                         "train__nas__seed0": 60.0, "train__nas__seed1": 60.0})]
    p, eta, clock, out = _eta_progress(stages)
    # the search alone (100 s), then the retrains on 2 slots: 20+60 | 20+60 = 80 s
    assert p.trial_started("search__nas__seed0") == "started   search__nas__seed0 | ETA 1m40s, whole run 3m00s"
    clock.t += 50
    assert p.eta() == 50.0
    # the plan was 2x short on this machine: every trial is expected to take twice its plan
    clock.t += 150
    line = p.trial_finished("search__nas__seed0", {})
    assert line.endswith("1/1 search trials done, elapsed 3m20s, whole run 2m40s"), line
    assert eta.ratio() == 2.0


def test_plan_eta_learns_each_methods_time_from_its_finished_trials():
    stages = [("train", {"train__unet__seed0": 20.0, "train__unet__seed1": 20.0,
                         "train__nas__seed0": 60.0, "train__nas__seed1": 60.0})]
    p, eta, clock, out = _eta_progress(stages, slots=1)
    p.trial_started("train__unet__seed0")
    clock.t += 10
    p.trial_finished("train__unet__seed0", {})
    # unet seed1 like unet seed0 (10 s); nas at its plan x the measured ratio 10/20: 30 s each
    assert eta.expected("train__unet__seed1") == 10.0 and eta.expected("train__nas__seed0") == 30.0
    assert p.eta() == 70.0
    p.trial_started("train__nas__seed0")
    clock.t += 45
    p.trial_finished("train__nas__seed0", {})
    assert eta.expected("train__nas__seed1") == 45.0  # its own method's time wins over the ratio
    p.trial_started("train__unet__seed1")
    clock.t += 4
    p.trial_failed("train__unet__seed1", "boom")  # ends without teaching a time
    assert p.eta() == 45.0
    lines = out.getvalue().splitlines()
    assert lines[-1] == "FAILED    train__unet__seed1: boom | 3/4 train trials done, 1 failed, elapsed 59s, ETA 45s"


def test_plan_eta_of_running_trials_counts_what_they_have_left_on_the_slots():
    from orchestrator.progress import Eta

    eta = Eta([("train", {"a__seed0": 30.0, "b__seed0": 30.0, "c__seed0": 30.0})], slots=2)
    # a ran 20 of its 30 s, b 5; c waits for the first free slot (a's, at 10 s) and ends at 40 s
    assert eta.left({"a__seed0": 20.0, "b__seed0": 5.0}) == (40.0, 40.0)
    eta.finished("a__seed0", 30.0)
    assert eta.left({"b__seed0": 25.0}) == (30.0, 30.0)


def test_plan_eta_fits_the_fixed_part_and_the_compute_once_their_costs_differ():
    from orchestrator.progress import Eta

    # planned: 6 s start-up + compute 40 (search), 10 (unet), 30 (nas retrain, an upper bound)
    eta = Eta([("search", {"search__nas__seed0": 46.0}),
               ("train", {"train__unet__seed0": 16.0, "train__nas__seed0": 36.0})], overhead=6.0)
    eta.finished("search__nas__seed0", 97.0)
    assert eta.expected("train__nas__seed0") == pytest.approx(36.0 * 97.0 / 46.0)  # one point: the ratio
    eta.finished("train__unet__seed0", 80.0)
    # two points: took = a + b x compute through (40, 97) and (10, 80): b = 17/30, a = 80 - 10 b
    b = 17.0 / 30.0
    assert eta.expected("train__nas__seed0") == pytest.approx(80.0 - 10 * b + 30 * b)
    # times that fall as the compute grows: the fixed part alone (their mean)
    eta = Eta([("train", {"x__seed0": 16.0, "y__seed0": 46.0, "z__seed0": 30.0})], overhead=6.0)
    eta.finished("x__seed0", 50.0), eta.finished("y__seed0", 40.0)
    assert eta.expected("z__seed0") == 45.0


def test_plan_eta_adds_the_measured_gap_between_stages():
    stages = [("search", {"search__nas__seed0": 10.0}), ("train", {"train__unet__seed0": 10.0}),
              ("late", {"late__unet__seed0": 10.0})]
    from orchestrator.progress import Eta

    clock, out = Clock(), io.StringIO()
    eta = Eta(stages, 1, stage_start=5.0)
    search = Progress(1, None, "search trials", out=out, clock=clock, names=["search__nas__seed0"], eta=eta)
    search.trial_started("search__nas__seed0")
    assert eta.left({}, ["search__nas__seed0"]) == (10.0, 40.0)  # 10 + (5 + 10) + (5 + 10)
    clock.t += 10
    search.trial_finished("search__nas__seed0", {})
    clock.t += 20  # Tune builds the next grid
    train = Progress(1, None, "train trials", out=out, clock=clock, names=["train__unet__seed0"], eta=eta)
    train.trial_started("train__unet__seed0")
    assert eta.gaps == [20.0] and eta.left({"train__unet__seed0": 0.0}, ["train__unet__seed0"]) == (10.0, 40.0)


def test_plan_eta_adds_the_measured_turnaround_between_trials_of_a_stage():
    stages = [("train", {"a__seed0": 10.0, "b__seed0": 10.0, "c__seed0": 10.0})]
    p, eta, clock, out = _eta_progress(stages, slots=1)
    p.trial_started("a__seed0")
    clock.t += 10
    p.trial_finished("a__seed0", {})
    assert p.eta() == 20.0  # b and c, 10 s each, no turnaround seen yet
    clock.t += 4  # Tune starts the next trial's worker
    p.trial_started("b__seed0")
    assert eta.turns == [4.0] and p.eta() == 10.0 + 4.0 + 10.0


def test_plan_eta_from_a_built_plan_dict():
    from orchestrator.progress import Eta

    plan = {"stages": [{"stage": "search", "trials": {"s__seed0": 12.0}, "wall_s": 12.0},
                       {"stage": "train", "trials": {"t__seed0": 8.0, "t__seed1": 8.0}, "wall_s": 8.0}],
            "parallel": {"slots": 2}, "trial_overhead_s": 6.0}
    eta = Eta.from_plan(plan)
    assert eta.slots == 2 and eta.overhead == 6.0 and eta.left({}) == (12.0, 12.0 + 5.0 + 8.0)


# ---------------------------------------------------------------- issue 25 item 1: no silent waits
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_show_on_a_terminal_only(monkeypatch):
    import sys

    from nas_core.data.prepare import progress_bar

    monkeypatch.setenv("NAS_SCAM_PROGRESS", "1")
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe, a log file: quiet
    bar = progress_bar(range(3), desc="work", unit="image")
    assert bar.disable and list(bar) == [0, 1, 2] and sys.stderr.getvalue() == ""
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert list(progress_bar(range(3), desc="work", unit="image")) == [0, 1, 2]
    assert "work:" in term.getvalue() and "/3 [" in term.getvalue() and "image/s" in term.getvalue()
    monkeypatch.setenv("NAS_SCAM_PROGRESS", "0")  # trials and tests: never
    assert progress_bar(range(3), desc="work").disable
    monkeypatch.setenv("NAS_SCAM_PROGRESS", "1")
    assert progress_bar(range(3), desc="work", enabled=False).disable


def test_data_generation_and_preparation_count_images_on_a_terminal(tmp_path, monkeypatch):
    import sys

    from nas_core.data.prepare import ensure_synthetic, prepare

    monkeypatch.setenv("NAS_SCAM_PROGRESS", "1")
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    src = ensure_synthetic(tmp_path, n_images=3, size=64, seed=0)
    assert "generate 3 synthetic images of 64 px" in term.getvalue() and "image" in term.getvalue()
    prepare(src, tmp_path / "cache", crop_size=32, stride=32, split="1,1,1")
    text = term.getvalue()
    assert "prepare " in text and "/3 [" in text and "class buckets of the train crops" in text


def test_evaluate_and_predict_advance_per_batch_of_windows():
    import numpy as np
    import torch

    from nas_core.engine.evaluate import predict_probs, window_count

    class Counter:
        def __init__(self):
            self.steps = []

        def update(self, n):
            self.steps.append(n)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Sigmoid())
    image = np.zeros((80, 100, 3), np.uint8)
    bar = Counter()
    predict_probs(model, image, tile=32, stride=16, batch=8, bar=bar)
    n = window_count(80, 100, tile=32, stride=16)
    assert sum(bar.steps) == n and bar.steps[0] == 8 and len(bar.steps) == -(-n // 8)
    # the training loop's validations call evaluate_split without a bar: trials print epoch lines instead
    import inspect

    from nas_core.engine.evaluate import evaluate_split
    assert inspect.signature(evaluate_split).parameters["progress"].default is False


def test_the_ablation_says_what_it_starts_before_it_starts_it(home, monkeypatch, capsys):
    from orchestrator import runner
    from orchestrator.cli import main

    ROOT = Path(__file__).resolve().parents[2]
    seen = []

    def fake_run(spec, settings, **kw):
        seen.append(capsys.readouterr().out)
        raise ValueError("stopped by the test")

    monkeypatch.setattr(runner, "run_ablation", fake_run)
    rc = main(["ablate", str(ROOT / "experiments" / "table2.yaml"), "--preset", "smoke", "--methods",
               "unet,nas-scam-p-sync", "--seeds", "2"])
    assert rc == 2 and "stopped by the test" in capsys.readouterr().err
    first, second = seen[0].splitlines()
    assert first == f"ablation {ROOT / 'experiments' / 'table2.yaml'}: checking the spec ..."
    assert second.startswith("ablation 'table2': 5 trials (search 1, then train 4); preparing the data, "
                             "starting a local Ray (")
    assert "opening the MLflow parent run in sqlite:///" in second
