"""`nas-scam ablate --submit` as a Ray job on a two-node Ray cluster + an MLflow server, all on loopback."""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import _free_port, _wait_http

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

def _agent_ports() -> list[str]:
    # Ray's per-node agents default to fixed ports (dashboard agent 52365, ...): a second Ray on the
    # machine (a foreign head, another test's) would hold them and the job agent would never answer
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]


def _stop(proc: subprocess.Popen) -> None:
    # each service runs in its own session: end exactly that process group, politely first
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no output)"


def _start_worker(gcs: int, tmp_worker: Path, env: dict, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1",
             "--num-cpus=1", "--num-gpus=0", f"--temp-dir={tmp_worker}", "--disable-usage-stats", *_agent_ports()],
            env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture()
def cluster(tmp_path):
    """Head (1 CPU, dashboard) + worker node (1 CPU) + MLflow server; yields the client env."""
    gcs, dash, mlp = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # not a cluster the shell may name, nor RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 from wherever it came (the
    # embedded Ray's loopback contract: the worker's `ray start` PANICs, "Multi-node Ray clusters are not
    # supported"); conftest already keeps an earlier in-process ray_env.prepare(local=True) from leaving it
    for var in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(var, None)
    # short temp dirs: Ray's socket paths must stay under ~107 bytes
    tmp_head = Path(f"/tmp/nsr-h{gcs}")
    tmp_worker = Path(f"/tmp/nsr-w{gcs}")
    head_log, worker_log = tmp_path / "ray-head.log", tmp_path / "ray-worker.log"
    procs = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlp), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination",
             str(tmp_path / "server-artifacts")], env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with head_log.open("wb") as out:
            procs.append(subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                 "--num-cpus=1", "--num-gpus=0", f"--temp-dir={tmp_head}", "--disable-usage-stats",
                 *_agent_ports()],
                # node addresses are 127.0.0.1 and every client here talks to loopback
                env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT))
        _wait_http(f"http://127.0.0.1:{dash}/api/version", None, None, 120)
        _wait_http(f"http://127.0.0.1:{mlp}/health", None, None, 60)
        procs.append(_start_worker(gcs, tmp_worker, env, worker_log))
        try:
            _wait_nodes(dash, 2, 90, procs[-1])
        except TimeoutError as exc:  # what Ray printed, in the test's output
            raise TimeoutError(f"{exc}\nworker node:\n{_tail(worker_log)}\nhead:\n{_tail(head_log)}") from None
        yield {**env, "NAS_SCAM_HOME": str(tmp_path / "home"),
               "NAS_SCAM_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlp}",
               "NAS_SCAM_RAY_DASHBOARD": f"http://127.0.0.1:{dash}", "NAS_SCAM_PROGRESS": "0"}
    finally:
        for p in reversed(procs):
            _stop(p)


def _wait_nodes(dash: int, n: int, timeout: float, worker: subprocess.Popen) -> None:
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{dash}/nodes?view=summary", timeout=5) as r:
                data = json.loads(r.read())
            alive = [x for x in data["data"]["summary"] if x.get("raylet", {}).get("state") == "ALIVE"]
            if len(alive) >= n:
                return
        except (OSError, KeyError, ValueError):
            pass
        if worker.poll() is not None:
            raise TimeoutError(f"the worker node's `ray start` exited with status {worker.returncode}")
        time.sleep(1)
    raise TimeoutError(f"fewer than {n} Ray nodes alive after {timeout} s")


@pytest.mark.slow
@pytest.mark.ray
def test_submit_runs_the_ablation_as_a_ray_job_on_two_nodes(cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    # the spec must lie inside the uploaded working dir: the shipped one, shrunk by flags; the grid of issue
    # 23 (a random control, one axis, 2 patient folds: 12 images make 4 synthetic patients)
    cmd = [sys.executable, "-m", "orchestrator.cli", "ablate", "experiments/table2.yaml", "--submit",
           "--preset", "smoke", "--methods", "unet,random-s-shared", "--seeds", "1", "--name", "cluster2",
           "--axis", "train.lr=1e-4,1e-3", "--set", "data.folds=2", "--set", "data.split_by=patient",
           "--set", "train.epochs=1", "--set", "train.iters_per_epoch=2", "--set", "data.crop_size=32",
           "--set", "data.stride=32", "--set", "data.synthetic_images=12", "--set", "data.synthetic_size=64",
           "--no-model"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=600)
    print(f"cluster job wall time {time.monotonic() - t0:.1f} s\n{out.stdout[-3000:]}")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "submitted job" in out.stdout and "SUCCEEDED" in out.stdout and "Table 2" in out.stdout
    assert "[train.lr=0.001] Random-S, shared (control) (2 folds)" in out.stdout

    c = MlflowClient(cluster["NAS_SCAM_MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("cluster2")
    runs = c.search_runs([exp.experiment_id])
    kids = [r for r in runs if r.data.tags.get("phase") == "train"]
    assert sorted((r.data.tags["method"], r.data.tags["fold"], r.data.tags["axis.train.lr"]) for r in kids) == sorted(
        (m, f, lr) for m in ("unet", "random-s-shared") for f in ("0", "1") for lr in ("0.0001", "0.001"))
    assert all(r.info.status == "FINISHED" and "test_dsc_Average" in r.data.metrics for r in kids)
    # 1-CPU trials ran two at a time, hence on both nodes
    assert len({r.data.tags["ray_node_id"] for r in kids}) == 2
    parent = [r for r in runs if r.data.tags.get("nas_scam_kind") == "ablation"][0]
    assert "table2/table2.md" in {a.path for a in c.list_artifacts(parent.info.run_id, "table2")}
    # artifacts went through the server, not into a local folder of the client
    assert not (Path(cluster["NAS_SCAM_HOME"]) / "mlflow" / "artifacts").exists()


def test_submit_refuses_an_unreachable_dashboard(tmp_path):
    port = _free_port()
    env = {**os.environ, "NAS_SCAM_HOME": str(tmp_path), "NAS_SCAM_RAY_DASHBOARD": f"http://127.0.0.1:{port}"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "ablate", "experiments/table2.yaml", "--submit"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"Ray dashboard http://127.0.0.1:{port} is unreachable" in out.stderr
