from pathlib import Path
"""The driver's progress lines: one per trial event, an overall line with an ETA, no ANSI; no Ray started."""
import io
import logging

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
    assert line == "  full__unet__seed0: train epoch 3/4, val DSC 45.67, loss 0.9123"
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
                         cwd=Path(__file__).resolve().parents[1])
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
    assert lines[2] == "  full__unet__seed0: train epoch 1/2, val DSC 25.00"
    assert lines[3].startswith("finished  full__unet__seed0 in 0s: test DSC 33.30% | 2/3 trials done")
    assert lines[4].startswith("FAILED    full__cbam__seed0: ValueError: data.crop_size must be a multiple of 16 "
                               "(worker log: /runs/x/logs) | 3/3 trials done, 1 failed")


def test_quiet_logging_creates_no_run_folder_without_records(tmp_path):
    with quiet_logging(tmp_path / "runs" / "x" / "logs" / "driver.log"):
        pass
    assert not (tmp_path / "runs").exists()  # a spec rejected before any run leaves nothing behind
