"""Issue 22, item 1: a trial that dies (killed for memory, SIGKILL, segfault, lost node) fails alone.

Unit tests read Ray's own messages and Tune's result objects; two real smoke ablations (slow, ray) end
with a trial killed, once by Ray's memory monitor (a tiny RAY_memory_usage_threshold in the environment
of the process that starts Ray kills every trial worker at once) and once by SIGKILL from outside while
another trial waits, and must end cleanly: the cause named, Table 2 printed with the cell marked missing,
exit status 1, no traceback. Every process started here is stopped by its group or its id."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from orchestrator import runner, tables
from orchestrator.progress import Progress, failure_reason, tune_callback

ROOT = Path(__file__).resolve().parents[2]

# Ray 2.60's OutOfMemoryError, as Tune saved it in a trial's error.txt (object store lines cut)
OOM_260 = """Failure # 1 (occurred at 2026-12-06_01-56-36)
1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 127.0.0.1, ID: 8819e6970e1ae7b7f71ca421a5377af21e4cd0191965f31a3e0753dc) was 1.43GB used / 23.59GB limit (0.060765)
OOM kill reason: Memory usage 1538871296B exceeded threshold of 253249616B (1.0% of 25324961792B limit)
Ray killed 1 worker(s) based on the killing policy
Considered workers: [
Selected to kill: (Task: job ID=01000000, lease ID=0100, task name=ImplicitFunc.__init__, required resources={CPU_group_0_b95c: 1}, pid=6102, actual memory used=0.04GB, worker ID=5528)
]
Top 10 memory users: PID\tMEM(GB)\tCOMMAND
5432\t0.78\t/work/main/.venv/bin/python .venv/bin/nas-scam ablate experiments/table2.yaml --preset smoke --metho...
5739\t0.07\tray::DashboardAgent
6102\t0.04\tray::IDLE
Refer to the documentation on how to address the out of memory issue: https://docs.ray.io/en/latest/ray-observability/user-guides/debug-apps/debug-memory.html.
"""
# the message of Ray releases before 2.56
OOM_OLD = """Task was killed due to the node running low on memory.
Memory on the node (IP: 10.0.0.7, ID: 9ab) where the task (actor ID: 1f, name=ImplicitFunc.__init__, pid=4242, memory used=2.10GB) was running was 30.10GB / 31.20GB (0.964743), which exceeds the memory usage threshold of 0.95. Ray killed this worker (ID: 77) because it was the most recently scheduled task.

Top 10 memory users:
PID\tMEM(GB)\tCOMMAND
4242\t2.10\tray::ImplicitFunc.train
"""
# a SIGKILL or a segfault of a running trial's worker (ActorDiedError)
DIED = """The actor died unexpectedly before finishing this task.
\tclass_name: ImplicitFunc
\tactor_id: ce9442d0ab7ac4343183a6b501000000
\tpid: 7485
\tip: 127.0.0.1
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the worker crashed unexpectedly due to SIGSEGV or another unexpected error.
"""
USER = """Failure # 1 (occurred at 2026-12-06_01-58-45)
\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=9425, ip=127.0.0.1, actor_id=6d0a, repr=trainable)
  File "/work/main/orchestrator/trials.py", line 122, in ablation_trial
    _ablation_trial(trial, config["ctx"])
ValueError: data.crop_size must be a multiple of 16
"""


def test_a_memory_kill_is_one_line_naming_the_node_the_worker_and_the_largest_processes():
    line = failure_reason(OOM_260)
    assert "\n" not in line
    assert line.startswith("killed for memory by Ray's memory monitor: node 127.0.0.1 at 1.43GB of 23.59GB "
                           "(threshold 1.0%)")
    assert "the trial's worker (pid 6102) held 0.04GB" in line
    assert "largest: pid 5432 0.78GB (python nas-scam ablate experiments/ta...)" in line
    assert "pid 5739 0.07GB (ray::DashboardAgent)" in line
    old = failure_reason(OOM_OLD)
    assert old.startswith("killed for memory by Ray's memory monitor: node 10.0.0.7 at 30.10GB of 31.20GB "
                          "(threshold 0.95)") and "(pid 4242) held 2.10GB" in old


def test_a_dead_worker_a_lost_node_and_a_user_error_each_read_as_what_they_are():
    assert failure_reason(DIED) == ("the trial's worker process died (pid 7485, exit SYSTEM_ERROR): killed (SIGKILL, "
                                    "the kernel's OOM killer) or crashed (SIGSEGV); the worker log may say more")
    assert failure_reason("The actor died because its node has died. Node Id: 3f").startswith(
        "the node running the trial was lost")
    assert failure_reason(USER) == "ValueError: data.crop_size must be a multiple of 16"
    wrapped = RuntimeError("Trial raised a RayTaskError:\n  ... 40 lines ...")
    wrapped.cause = ValueError("loss.name 'dice2' is unknown")
    assert failure_reason(wrapped) == "ValueError: loss.name 'dice2' is unknown"
    # error.txt keeps every failure of a retried trial: the last one is the cause
    assert failure_reason(OOM_260 + USER.replace("# 1", "# 2")).startswith("ValueError")
    assert failure_reason(USER + OOM_260.replace("# 1", "# 2")).startswith("killed for memory")


def test_the_progress_line_reads_the_failure_tune_just_wrote(tmp_path):
    # Tune calls back before its storage holds the error (get_error() is None then); the trial's local
    # error.txt already does
    class Trial:
        status, last_result, error_file = "RUNNING", {}, str(tmp_path / "error.txt")

        def __str__(self):
            return "train__unet__seed0"

        def get_error(self):
            return None

    Path(Trial.error_file).write_text(USER + OOM_260.replace("# 1", "# 2"))
    trial, out = Trial(), io.StringIO()
    cb = tune_callback(Progress(1, 1, out=out))
    cb.on_trial_start(0, [trial], trial)
    cb.on_trial_error(0, [trial], trial)
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("FAILED    train__unet__seed0: killed for memory by Ray's memory monitor: node 127.0.0.1")


def test_a_trial_that_failed_before_its_first_report_is_named_by_its_folder():
    names = {"train__unet__seed0": {}, "train__cbam__seed0": {}}
    never_reported = SimpleNamespace(config=None, path="/runs/x/tune/stage-train/train__cbam__seed0")
    assert runner._result_trial(never_reported, names) == "train__cbam__seed0"
    reported = SimpleNamespace(config={"trial": "train__unet__seed0"}, path="/elsewhere/odd-dirname")
    assert runner._result_trial(reported, names) == "train__unet__seed0"


def test_a_worker_death_in_the_middle_of_a_task_is_the_actors_error_not_the_whole_runs():
    """Ray Tune 2.60 raised "RuntimeError: Caught unexpected exception" out of fit() for an OutOfMemoryError
    of a running trial's task: the shim hands it on as an actor error, which Tune retries or fails alone."""
    from ray.air.execution._internal.actor_manager import RayActorManager
    from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError

    runner._trial_deaths_fail_the_trial()
    runner._trial_deaths_fail_the_trial()  # once per process, however often a tuner is built
    assert RayActorManager._actor_task_failed.trial_deaths_fail_the_trial
    seen = []
    actor = SimpleNamespace(actor_id="a1", _on_error=lambda a, exc: seen.append(("actor", exc)))
    task = SimpleNamespace(_tracked_actor=actor, _on_error=lambda a, exc: seen.append(("task", exc)))
    manager = SimpleNamespace(_failed_actor_ids=set(), _cleanup_actor=lambda tracked_actor: None)
    RayActorManager._actor_task_failed(manager, tracked_actor_task=task, exception=OutOfMemoryError(OOM_260))
    assert [k for k, _ in seen] == ["actor", "task"] and manager._failed_actor_ids == {"a1"}
    exc = seen[0][1]
    assert isinstance(exc, RayActorError) and str(exc).startswith("OutOfMemoryError: Failure # 1")
    assert failure_reason(exc).startswith("killed for memory by Ray's memory monitor: node 127.0.0.1")
    # a user's error stays a task error (Tune counts it, retries it, shows its cause)
    seen.clear()
    user = RayTaskError("train", "Traceback ...", ValueError("boom"))
    RayActorManager._actor_task_failed(manager, tracked_actor_task=task, exception=user)
    assert seen == [("task", user)]


def test_only_the_errors_of_a_gone_worker_become_the_actors_error():
    """The shim is narrow: an error that is not a dead worker, raylet or node (a lost object, Ray's own
    system error) reaches Tune as Ray raised it."""
    from ray.air.execution._internal.actor_manager import RayActorManager
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError

    runner._trial_deaths_fail_the_trial()
    seen = []
    actor = SimpleNamespace(actor_id="a1", _on_error=lambda a, exc: seen.append(("actor", exc)))
    task = SimpleNamespace(_tracked_actor=actor, _on_error=lambda a, exc: seen.append(("task", exc)))
    manager = SimpleNamespace(_failed_actor_ids=set(), _cleanup_actor=lambda tracked_actor: None)
    for gone in (WorkerCrashedError(), NodeDiedError("node n1 died")):
        seen.clear()
        RayActorManager._actor_task_failed(manager, tracked_actor_task=task, exception=gone)
        assert isinstance(seen[0][1], RayActorError) and type(gone).__name__ in str(seen[0][1])
    lost = ObjectLostError("ab" * 14, None, "")
    seen.clear()
    with pytest.raises(RuntimeError, match="Caught unexpected exception") as raised:  # Ray's own handling
        RayActorManager._actor_task_failed(manager, tracked_actor_task=task, exception=lost)
    assert raised.value.__cause__ is lost and seen == []


def test_a_failed_trial_names_only_its_unfinished_runs(tmp_path):
    (tmp_path / "search__nas-scam-p-sync__seed0").mkdir()
    (tmp_path / "search__nas-scam-p-sync__seed0" / "result.json").write_text("{}")
    runs = [{"name": "search__nas-scam-p-sync__seed0"}, {"name": "train__nas-scam-p-sync__seed0"}]
    assert runner.unfinished_runs(tmp_path, runs) == ["train__nas-scam-p-sync__seed0"]


def test_missing_cells_are_marked_and_the_failures_tag_stays_json():
    rec = {"method": "unet", "seed": 0, "Average": 0.5, "Epithelial": 0.6, "Lymphocyte": 0.4,
           "Macrophage": 0.3, "Neutrophil": 0.2}
    table = tables.with_flags(tables.compare(tables.summarize([rec])), [rec])
    marked = tables.with_missing(table, {("", "unet"): 2, ("", "cbam"): 1})
    text = tables.to_text(marked)
    assert "U-Net [missing 1/2 runs]  1  ours    50.00 ± n/a" in text
    cbam = [ln for ln in text.splitlines() if ln.startswith("CBAM")]
    assert cbam and cbam[0].split()[:5] == ["CBAM", "[missing", "1/1", "runs]", "0"] and cbam[0].count("-") == 5
    assert list(dict.fromkeys(marked["method"])) == ["unet", "cbam"]  # Table 2's order
    # nothing finished at all: the table still shows what was asked for
    empty = tables.with_flags(tables.compare(tables.summarize([])), [])
    assert "U-Net [missing 1/1 runs]  0" in tables.to_text(tables.with_missing(empty, {("", "unet"): 1}))

    failures = [{"stage": "train", "trial": f"train__unet__seed{i}", "method": "unet", "seed": i,
                 "error": "killed for memory by Ray's memory monitor: " + "x" * 600} for i in range(40)]
    tag = runner._failed_tag(failures)
    assert len(tag) <= 5000 and [f["trial"] for f in json.loads(tag)] == [f["trial"] for f in failures]
    report = runner.failure_report(failures[:2], "run it again with --resume")
    assert report.splitlines()[0].startswith("FAILED train__unet__seed0: killed for memory")
    assert report.splitlines()[-1] == ("2 trials failed, their cells marked missing in Table 2; run it again "
                                       "with --resume")


# ---------------------------------------------------------------- real smoke ablations
SPEC = {"name": "dies", "methods": ["unet"], "seeds": 1, "preset": "smoke",
        "epochs": {"train": 2, "train_iters": 2},
        "data": {"synthetic_images": 6, "synthetic_size": 64, "crop_size": 32, "stride": 32},
        "resources": {"cpu": 1}}


def _cli(args: list[str], home: Path, log: Path, **env) -> subprocess.Popen:
    env = {**os.environ, "NAS_SCAM_PROGRESS": "0", "RAY_AUTH_MODE": "disabled", "NAS_SCAM_HOME": str(home),
           "NAS_SCAM_RAY_NUM_CPUS": "1", **env}
    for var in ("NAS_SCAM_RAY_ADDRESS", "NAS_SCAM_MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(var, None)
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "nas_scam.cli", *args], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, timeout: float = 600) -> None:
    try:
        proc.wait(timeout)
    finally:
        try:  # the driver's session holds the local Ray it started: end exactly that group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parent(home: Path, name: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{home}/mlflow/mlflow.db")
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("nas_scam_kind") == "ablation"]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("command", ["ablate", "run-spec"])
def test_a_trial_killed_for_memory_fails_alone_and_the_run_ends_cleanly(tmp_path, command):
    """`run-spec` is the API's job entrypoint (`--submit` runs `ablate` itself inside the job)."""
    home, log = tmp_path / "home", tmp_path / f"{command}.log"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    # every trial worker is over a threshold of 0.01% of the node's memory: Ray's memory monitor kills
    # each one, the retry (max_failures: 1) too. (0.1 is not enough on a 24 GB machine using 6% of it.)
    proc = _cli([command, str(spec)] + (["--no-model"] if command == "ablate" else []), home, log,
                RAY_memory_usage_threshold="0.0001")
    _wait(proc)
    out = log.read_text(errors="replace")
    assert proc.returncode == 1, out[-5000:]
    assert "Traceback" not in out and "TypeError" not in out and "Caught unexpected exception" not in out, out[-5000:]
    cause = "FAILED train__unet__seed0: killed for memory by Ray's memory monitor: node 127.0.0.1 at "
    assert cause in out, out[-5000:]
    assert "the trial's worker (pid " in out
    assert "U-Net [missing 1/1 runs]  0  ours" in out  # Table 2 printed, the cell the spec asked for marked
    assert out.rstrip().splitlines()[-1].startswith("1 trial failed, its cells marked missing in Table 2; ")
    if command == "ablate":
        assert "retrying  train__unet__seed0 from its last checkpoint after: killed for memory" in out
        assert "run the same command with --resume" in out
    else:
        outcome = json.loads((home / "runs" / "outcome.json").read_text())
        assert [f["trial"] for f in outcome["failures"]] == ["train__unet__seed0"]
        assert outcome["failures"][0]["error"].startswith("killed for memory by Ray's memory monitor")
    parent, kids = _parent(home, "dies")
    assert parent.info.status == "FINISHED"
    failed = json.loads(parent.data.tags["failed_trials"])
    assert [(f["trial"], f["method"], f["seed"]) for f in failed] == [("train__unet__seed0", "unet", 0)]
    assert failed[0]["error"].startswith("killed for memory")
    assert all(r.info.status != "RUNNING" for r in kids)
    assert (home / "runs" / "dies" / "table2" / "table2.md").is_file()


def _holding(root: psutil.Process, path: Path) -> list[psutil.Process]:
    """The descendants of ``root`` that have ``path`` open (a trial's worker writes its log there)."""
    found = []
    for p in root.children(recursive=True):
        try:
            if any(os.path.realpath(f.path) == str(path) for f in p.open_files()):
                found.append(p)
        except psutil.Error:
            pass  # ended between listing and asking
    return found


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_trial_fails_alone_while_the_other_trials_run_on(tmp_path):
    home, log = tmp_path / "home", tmp_path / "ablate.log"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "name": "sigkill", "methods": ["unet", "cbam"], "max_failures": 0,
                                    "max_concurrent": 1, "epochs": {"train": 3, "train_iters": 4}}))
    proc = _cli(["ablate", str(spec), "--no-model"], home, log)
    trial_log = Path(os.path.realpath(home)) / "runs" / "sigkill" / "logs" / "train__unet__seed0.log"
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            # the U-Net trial's worker (it writes the trial's log), once its run has begun: its MLflow
            # child run is open before the engine makes the run folder
            if (trial_log.parent.parent / "train__unet__seed0").is_dir():
                for p in _holding(psutil.Process(proc.pid), trial_log):
                    p.send_signal(signal.SIGKILL)
                    killed = p.pid
            time.sleep(0.2)
        _wait(proc)
    finally:
        if proc.poll() is None:
            _wait(proc, 0)
    out = log.read_text(errors="replace")
    assert killed is not None, f"no U-Net trial worker to kill:\n{out[-5000:]}"
    assert proc.returncode == 1, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    assert f"FAILED train__unet__seed0: the trial's worker process died (pid {killed}" in out, out[-5000:]
    assert "finished  train__cbam__seed0" in out  # the other trial ran on
    text = out[out.index("Table 2 (sigkill)"):]
    assert "U-Net [missing 1/1 runs]  0  ours" in text
    cbam = next(ln for ln in text.splitlines() if ln.startswith("CBAM"))
    assert "missing" not in cbam and " 1  ours " in cbam and "±" in cbam  # numbers, no mark
    parent, kids = _parent(home, "sigkill")
    assert [f["trial"] for f in json.loads(parent.data.tags["failed_trials"])] == ["train__unet__seed0"]
    (unet,) = [r for r in kids if r.info.run_name == "train__unet__seed0"]
    # the run the worker had open ends FAILED with the cause, not RUNNING or "ended without closing"
    assert unet.info.status == "FAILED" and unet.data.tags["error"].startswith("the trial's worker process died")
