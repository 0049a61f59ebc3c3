"""`nas-scam serve` stops what it started: its Ray head (forgotten by a later ray.init()) and its runs,
before the head; it refuses a dashboard port in Ray's worker range. Loopback only; every process started
here is stopped by its id."""

import signal

import pytest

from tests.helpers import (SMOKE, _cli, _descendants, _eventually, _free_port, _kill_tree, _stop_and_check,
                           _wait_http)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_its_ray_head_and_forgets_it(tmp_path, ray_tmp, sig):
    port, dash = _free_port(), _free_port()
    log = tmp_path / "serve.log"
    proc = _cli(["serve", "--port", str(port), "--log-level", "warning"],
                {"NAS_SCAM_HOME": str(tmp_path / "home"), "NAS_SCAM_RAY_DASHBOARD": f"http://127.0.0.1:{dash}",
                 "NAS_SCAM_RAY_NUM_CPUS": "1", "RAY_TMPDIR": str(ray_tmp)}, log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc, log, 240)
        # the head's address, while it runs; `ray start` may write it after the dashboard (and so the API)
        # answers: on a loaded machine it comes late (issue 22)
        _eventually(lambda: (ray_tmp / "ray_current_cluster").is_file(), 60, "ray_current_cluster written", proc, log)
        children = _descendants(proc.pid)
        names = {p.name() for p in children}
        assert {"gcs_server", "raylet"} <= names, names
    except BaseException:
        _kill_tree(proc)
        raise
    _stop_and_check(proc, sig, children)
    # a later ray.init() must not mistake the stopped head for a cluster
    assert not (ray_tmp / "ray_current_cluster").exists()


def test_serve_refuses_a_dashboard_port_in_rays_worker_range(tmp_path):
    log = tmp_path / "serve.log"
    proc = _cli(["serve", "--port", str(_free_port())],
                {"NAS_SCAM_HOME": str(tmp_path / "home"), "NAS_SCAM_RAY_DASHBOARD": "http://127.0.0.1:15234"}, log)
    try:
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 2 and "port 15234 lies in Ray's worker port range 10002-19999" in text, text[-3000:]
    assert "Traceback" not in text and not (tmp_path / "home" / "api" / "ray-head.log").exists()


def test_serve_stops_its_runs_before_its_ray_head(home, monkeypatch, capsys):
    # the head's jobs used to outlive it by minutes, their MLflow runs RUNNING until the next start
    import argparse

    import uvicorn

    from api import serve
    from api.service import RunService
    from orchestrator import ray_env, ray_head

    calls = []

    def interrupted(app, **kwargs):
        calls.append("serve")
        raise KeyboardInterrupt  # Ctrl-C: uvicorn re-raises it after its graceful shutdown

    def no_dashboard(*args, **kwargs):
        raise ray_env.ClusterError("no dashboard")

    monkeypatch.setattr(ray_env, "prepare", lambda local: None)
    monkeypatch.setattr(ray_env, "check_dashboard", no_dashboard)
    monkeypatch.setattr(ray_head, "start_local_ray", lambda settings, cpus: calls.append("start head") or "head")
    monkeypatch.setattr(ray_head, "stop_local_ray", lambda head: calls.append(f"stop {head}"))
    monkeypatch.setattr(uvicorn, "run", interrupted)
    monkeypatch.setattr(RunService, "abandon_active", lambda self, reason, wait_s=15.0: calls.append("stop runs") or ["r1"])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            serve.cmd_serve(argparse.Namespace(host=None, port=None, num_cpus=None, no_local_ray=False,
                                               log_level="warning"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == ["start head", "serve", "stop runs", "stop head"]
    assert "stopped 1 active run(s), now lost (resumable): r1" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.ray
def test_serve_stopped_with_a_run_in_flight_leaves_no_driver_and_no_running_mlflow_run(tmp_path, ray_tmp):
    # the driver went on for about 2 minutes after its head, its MLflow runs RUNNING until the API restarted
    import httpx

    from api.store import RunStore
    from orchestrator import tracking
    from orchestrator.settings import Settings

    port, dash, home = _free_port(), _free_port(), tmp_path / "home"
    log = tmp_path / "serve.log"
    proc = _cli(["serve", "--port", str(port), "--log-level", "warning"],
                {"NAS_SCAM_HOME": str(home), "NAS_SCAM_RAY_DASHBOARD": f"http://127.0.0.1:{dash}",
                 "NAS_SCAM_RAY_NUM_CPUS": "1", "RAY_TMPDIR": str(ray_tmp), "NAS_SCAM_API_KEYS": "k"}, log)
    spec = {**SMOKE, "kind": "ablation", "name": "inflight", "epochs": {**SMOKE["epochs"], "train": 50, "train_iters": 50}}
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", proc, log, 240)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": "k"}, timeout=30) as c:
            created = c.post("/v1/runs", json=spec)
            assert created.status_code == 202, created.text
            rid = created.json()["id"]

            def training() -> bool:
                return any(r["status"] == "RUNNING" for r in c.get(f"/v1/runs/{rid}/metrics").json()["runs"])

            _eventually(training, 300, f"run {rid} training", proc, log)
        children = _descendants(proc.pid)  # the job's driver and its trial among them
    except BaseException:
        _kill_tree(proc)
        raise
    _stop_and_check(proc, signal.SIGTERM, children)
    settings = Settings(home=home)
    rec = RunStore(settings.api_home / "runs.db").get(rid)
    assert rec.status == "lost" and "the server stopped" in rec.message, (rec.status, rec.message)
    c = tracking.client(settings.tracking_uri)
    parent = c.get_run(rec.parent_run_id)
    assert parent.info.status == "FAILED" and "the server stopped" in parent.data.tags["stopped"]
    # the driver, stopped through Ray's job API, may close its trials' runs itself (KILLED)
    runs = c.search_runs([rec.experiment_id], max_results=50)
    assert len(runs) == 2 and all(r.info.status in ("FAILED", "KILLED") for r in runs), \
        [(r.info.run_name, r.info.status, r.data.tags.get("stopped")) for r in runs]
