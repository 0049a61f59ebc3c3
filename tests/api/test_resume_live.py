"""A run whose Ray head dies (issue 15): it becomes ``lost``, its MLflow runs are closed as FAILED instead
of staying RUNNING forever, and ``POST /v1/runs/{id}/resume`` finishes it on a new head.

A module of its own: it kills and restarts its own Ray head (loopback, 2 CPUs at most), which must not
happen under tests/api/test_live.py's shared head. Every process it starts is stopped by its id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.ray_head import ray_env_vars, ray_head_command, stop_process_group, wait_dashboard
from tests.api.test_live import SMOKE, TERMINAL, Server, free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _start_head(port: int, tmp: Path) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    log = open(tmp / "head.log", "wb")
    proc = subprocess.Popen(ray_head_command(port, min(2, os.cpu_count() or 1), tmp / "ray"), env=ray_env_vars(),
                            cwd=str(tmp), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_dashboard(f"http://127.0.0.1:{port}", proc, timeout=120)
    return proc


def _drivers(spec_path: str) -> list[psutil.Process]:
    """Processes running our job's entrypoint (``run-spec <run_dir>/spec.json``): unique to this test."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if spec_path in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def test_a_run_lost_with_its_head_is_closed_and_resumes(tmp_path):
    tmp = Path(tempfile.mkdtemp(prefix="nsr-", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    heads = [_start_head(port, tmp / "a")]
    server = Server(home, f"http://127.0.0.1:{port}")
    try:
        server.start()
        with server.client() as c:
            rid = c.post("/v1/runs", json={**SMOKE, "name": "lost"}).json()["id"]
            deadline = time.time() + 300  # until a phase is in flight: its MLflow child RUNNING
            while time.time() < deadline:
                metrics = c.get(f"/v1/runs/{rid}/metrics").json()
                if any(r["status"] == "RUNNING" for r in metrics["runs"]):
                    break
                assert c.get(f"/v1/runs/{rid}").json()["status"] not in TERMINAL
                time.sleep(1)
            else:
                pytest.fail(f"run {rid} never had a phase running")

            # the head dies with the job in flight; the driver goes with it (or is stopped here, by pid)
            spec_path = f"{home}/runs/api/{rid}/spec.json"
            stop_process_group(heads[0], grace=5)
            gone, alive = psutil.wait_procs(_drivers(spec_path), timeout=90)
            for p in alive:
                p.kill()
            heads.append(_start_head(port, tmp / "b"))

            run = wait_for(c, rid, TERMINAL, timeout=60)
            assert run["status"] == "lost", run
            metrics = c.get(f"/v1/runs/{rid}/metrics").json()
            assert metrics["parent"]["status"] == "FAILED"
            assert metrics["runs"] and all(r["status"] != "RUNNING" for r in metrics["runs"]), metrics["runs"]

            resumed = c.post(f"/v1/runs/{rid}/resume")
            assert resumed.status_code == 202, resumed.text
            assert resumed.json()["ray_job_id"] == f"nas-scam-{rid}-r1"
            run = wait_for(c, rid, TERMINAL, timeout=600)
            assert run["status"] == "succeeded", c.get(f"/v1/runs/{rid}/logs").json()["logs"][-3000:]
            metrics = c.get(f"/v1/runs/{rid}/metrics").json()
            assert metrics["parent"]["status"] == "FINISHED"
            (train,) = metrics["runs"]  # the same child run, reopened and finished: no duplicate
            assert train["status"] == "FINISHED" and 0.0 <= train["metrics"]["test_dsc_Average"] <= 100.0
            assert c.get(f"/v1/runs/{rid}/table").status_code == 200
    finally:
        server.stop()
        for head in heads:
            stop_process_group(head, grace=15)
        shutil.rmtree(tmp, ignore_errors=True)
