"""The real thing: `nas-scam serve` (uvicorn in a subprocess on loopback), a real local Ray head, a real
MLflow store under tmp. Launch smoke runs, follow them to metrics/genotype/table, cancel a running run,
restart the server and still see every run with its true status, and fuzz the OpenAPI schema.

Everything binds 127.0.0.1 on ports chosen free at run time; the Ray head (2 CPUs at most) and every
server are stopped by process group in the fixtures' teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from orchestrator.ray_head import ray_env_vars, ray_head_command, stop_process_group, wait_dashboard
from tests.helpers import error_shape_problems

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
KEY = "live-test-key"
HEADERS = {"X-API-Key": KEY}
SMOKE = {"kind": "ablation", "name": "smoke", "preset": "smoke", "methods": ["unet"], "seeds": 1,
         "resources": {"cpu": 1}}
SEARCH = {"kind": "search", "name": "smoke-search", "method": "nas-scam-p-sync", "preset": "smoke",
          "resources": {"cpu": 1}}
# the grid of issue 23 through the API: one axis and 2 patient folds (12 images: 4 synthetic patients)
GRID = {"kind": "ablation", "name": "smoke-grid", "preset": "smoke", "methods": ["unet", "random-s-shared"],
        "seeds": 1, "axes": {"train.lr": [1.0e-4, 1.0e-3]}, "epochs": {"train": 1, "train_iters": 2},
        "data": {"synthetic_images": 12, "synthetic_size": 64, "crop_size": 32, "stride": 32, "folds": 2,
                 "split_by": "patient"}, "resources": {"cpu": 1}}
# long enough to be caught running; cancelled long before it ends
LONG = {"kind": "train", "name": "long", "method": "unet", "preset": "smoke", "epochs": {"train": 1000},
        "resources": {"cpu": 1}}
TERMINAL = {"succeeded", "failed", "cancelled", "lost"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of our own (--block, its own process group) on loopback; a short temp dir for its sockets."""
    tmp = Path(tempfile.mkdtemp(prefix="nsr-", dir="/tmp"))
    port = free_port()
    log = open(tmp / "head.log", "wb")
    proc = subprocess.Popen(ray_head_command(port, min(2, os.cpu_count() or 1), tmp / "ray"), env=ray_env_vars(),
                            cwd=str(tmp), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_dashboard(url, proc, timeout=120)
        yield url
    finally:
        stop_process_group(proc, grace=15)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api-home")


class Server:
    """`nas-scam serve` as a subprocess; start/stop as often as a test needs."""

    def __init__(self, home: Path, dashboard: str):
        self.home, self.dashboard = home, dashboard
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.last_returncode: int | None = None

    def start(self, local_ray: bool = False, **env_extra: str) -> "Server":
        port = free_port()
        env = dict(os.environ, NAS_SCAM_HOME=str(self.home), NAS_SCAM_API_KEYS=f"{KEY},second",
                   NAS_SCAM_RAY_DASHBOARD=self.dashboard, RAY_AUTH_MODE="disabled", **env_extra)
        env.pop("NAS_SCAM_RAY_ADDRESS", None)
        self.log = open(self.home / f"serve-{port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "nas_scam.cli", "serve", "--port", str(port),
                                      "--log-level", "warning", *([] if local_ray else ["--no-local-ray"])],
                                     env=env, cwd=str(self.home), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + (180 if local_ray else 90)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: {self.logs()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"serve did not answer within 90 s: {self.logs()[-3000:]}")

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=30)
            self.last_returncode = self.proc.returncode
            self.log.close()
            self.proc = None

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=HEADERS, timeout=60)


@pytest.fixture(scope="module")
def server(home, ray_head):
    s = Server(home, ray_head).start()
    try:
        yield s
    finally:
        s.stop()


def wait_for(client: httpx.Client, run_id: str, statuses: set[str], timeout: float) -> dict:
    deadline = time.time() + timeout
    while True:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        if time.time() > deadline:
            logs = client.get(f"/v1/runs/{run_id}/logs").json().get("logs", "")[-3000:]
            raise AssertionError(f"run {run_id} still {run['status']} after {timeout} s; logs:\n{logs}")
        time.sleep(2)


@pytest.fixture(scope="module")
def finished_runs(server):
    """The smoke ablation (Tune path) and a smoke search (single-run path), launched together and awaited."""
    with server.client() as c:
        ids = {}
        for name, spec in (("ablation", SMOKE), ("search", SEARCH), ("grid", GRID)):
            resp = c.post("/v1/runs", json=spec)
            assert resp.status_code == 202, resp.text
            body = resp.json()
            assert body["status"] == "queued" and resp.headers["location"] == f"/v1/runs/{body['id']}"
            assert body["links"]["table"] == f"/v1/runs/{body['id']}/table?format=json"
            ids[name] = body["id"]
        runs = {name: wait_for(c, rid, TERMINAL, timeout=600) for name, rid in ids.items()}
    return runs


def test_readyz_sees_ray_and_mlflow(server):
    # the checks only for a caller with a key; a stranger learns ready or not (issue 15)
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    body = httpx.get(server.url + "/readyz", headers=HEADERS).json()
    assert body == {"status": "ready", "checks": {"ray": "ok", "mlflow": "ok"}}


def test_parser_bombs_get_422_on_a_kept_connection(server):
    """Issue 15: a 5,000-deep JSON body and a 100k-character path were 500s with the connection reset."""
    deep = '{"kind": "ablation", "overrides": ' + '{"a": ' * 5000 + "1" + "}" * 5001
    with server.client() as c:
        for body in (deep, json.dumps({**SMOKE, "data": {"source": f"{server.home}/data/" + "a" * 100_000}})):
            resp = c.post("/v1/runs", content=body, headers={"Content-Type": "application/json"})
            assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error", resp.text
            assert c.get("/healthz").status_code == 200  # same client, same pool: the server still answers
    assert "unhandled error" not in server.logs()


def test_hpo_whose_trials_all_fail_is_failed(server):
    """Issue 15: an HPO run whose only trial failed was reported succeeded (Tune's get_best_result
    returns a lone trial even when it errored). Augmentation probabilities summing past 1 (the paper's
    5 x 0.2, times 10) pass the config and fail in the trial (an unknown loss did, until issue 22)."""
    spec = {"kind": "hpo", "name": "hpo-fails", "method": "unet", "preset": "smoke", "num_samples": 1,
            "space": {"augment.strength": {"type": "choice", "values": [10.0]}}, "resources": {"cpu": 1}}
    with server.client() as c:
        resp = c.post("/v1/runs", json=spec)
        assert resp.status_code == 202, resp.text
        run = wait_for(c, resp.json()["id"], TERMINAL, timeout=300)
        assert run["status"] == "failed", run
        assert "HPO trials failed" in c.get(f"/v1/runs/{run['id']}/logs").json()["logs"]
        assert c.get(f"/v1/runs/{run['id']}/metrics").json()["parent"]["status"] == "FAILED"


def test_smoke_ablation_runs_to_its_table(server, finished_runs):
    run = finished_runs["ablation"]
    with server.client() as c:
        assert run["status"] == "succeeded", c.get(f"/v1/runs/{run['id']}/logs").json()["logs"][-3000:]
        assert run["ray_job_id"] == f"nas-scam-{run['id']}"
        assert run["mlflow"]["parent_run_id"] and len(run["mlflow"]["child_run_ids"]) == 1
        assert run["progress"] == {"total": 1, "finished": 1, "failed": 0, "running": 0, "fraction": 1.0}
        metrics = c.get(f"/v1/runs/{run['id']}/metrics").json()
        (train,) = metrics["runs"]
        assert (train["phase"], train["method"], train["seed"], train["status"]) == ("train", "unet", 0, "FINISHED")
        assert 0.0 <= train["metrics"]["test_dsc_Average"] <= 100.0  # in %
        table = c.get(f"/v1/runs/{run['id']}/table").json()
        avg = next(r for r in table["rows"] if r["class"] == "Average")
        assert (avg["method"], avg["n"], avg["std"]) == ("unet", 1, None)  # one seed: no sample std
        # the same number in the same unit: the metric is the table's mean rounded to 2 decimals
        assert avg["mean"] == pytest.approx(train["metrics"]["test_dsc_Average"], abs=0.005)
        csv = c.get(f"/v1/runs/{run['id']}/table", params={"format": "csv"})
        assert csv.headers["content-type"].startswith("text/csv") and csv.text.startswith("method,label,class")
        md = c.get(f"/v1/runs/{run['id']}/table", params={"format": "md"}).text
        assert "| U-Net | 1 | ours |" in md
        assert c.get(f"/v1/runs/{run['id']}/genotype").status_code == 404  # a baseline has no search
        logs = c.get(f"/v1/runs/{run['id']}/logs").json()
        assert "run-spec" in logs["logs"] and logs["status"] == "succeeded"


def test_grid_ablation_tables_each_variant_over_its_folds(server, finished_runs):
    run = finished_runs["grid"]
    with server.client() as c:
        assert run["status"] == "succeeded", c.get(f"/v1/runs/{run['id']}/logs").json()["logs"][-3000:]
        # 2 methods x 2 variants x 2 folds, counted from the plan
        assert run["progress"] == {"total": 8, "finished": 8, "failed": 0, "running": 0, "fraction": 1.0}
        table = c.get(f"/v1/runs/{run['id']}/table").json()
        avg = [r for r in table["rows"] if r["class"] == "Average"]
        assert sorted((r["method"], r["variant"]) for r in avg) == sorted(
            (m, v) for m in ("unet", "random-s-shared") for v in ("train.lr=0.0001", "train.lr=0.001"))
        assert all(r["n"] == 1 and r["folds"] == 2 for r in avg)
        logs = c.get(f"/v1/runs/{run['id']}/logs").json()["logs"]
        assert "random-s-shared - unet [train.lr=0.001]" in logs  # the paired comparison under Table 2


def test_predict_with_the_smoke_model(server, finished_runs):
    import cv2
    import numpy as np

    run = finished_runs["ablation"]
    image = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    png = cv2.imencode(".png", image)[1].tobytes()
    with server.client() as c:
        geo = c.post("/v1/predict", params={"model": run["id"]}, content=png, headers={"Content-Type": "image/png"})
        assert geo.status_code == 200, geo.text
        body = geo.json()
        assert body["type"] == "FeatureCollection" and body["properties"]["width"] == 96
        assert all(f["geometry"]["type"] == "Polygon" for f in body["features"])
        mask = c.post("/v1/predict", params={"model": run["id"], "format": "png"}, content=png)
        assert mask.headers["content-type"] == "image/png"
        labels = cv2.imdecode(np.frombuffer(mask.content, np.uint8), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (80, 96) and labels.max() <= 4
        bad = c.post("/v1/predict", params={"model": run["id"]}, content=b"not an image")
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_image"


def test_single_search_gives_a_genotype(server, finished_runs):
    run = finished_runs["search"]
    with server.client() as c:
        assert run["status"] == "succeeded", c.get(f"/v1/runs/{run['id']}/logs").json()["logs"][-3000:]
        (item,) = c.get(f"/v1/runs/{run['id']}/genotype").json()["genotypes"]
        assert (item["method"], item["seed"]) == ("nas-scam-p-sync", 0)
        assert item["genotype"]  # the engine's genotype JSON, op names per slot
        assert c.get(f"/v1/runs/{run['id']}/table").status_code == 404  # a search has no test DSC
        metrics = c.get(f"/v1/runs/{run['id']}/metrics").json()
        assert metrics["runs"][0]["phase"] == "search" and metrics["runs"][0]["metrics"]


@pytest.fixture(scope="module")
def cancelled_run(server, finished_runs):
    """A long train run caught running and cancelled: what each step answered (the restart test needs
    one cancelled run whatever order the tests run in)."""
    with server.client() as c:
        rid = c.post("/v1/runs", json=LONG).json()["id"]
        running = wait_for(c, rid, {"running"} | TERMINAL, timeout=180)
        deadline = time.time() + 120  # until its MLflow parent exists, so the cancel has runs to close
        while not c.get(f"/v1/runs/{rid}").json()["mlflow"]["parent_run_id"] and time.time() < deadline:
            time.sleep(1)
        cancelling = c.post(f"/v1/runs/{rid}/cancel").json()
        final = wait_for(c, rid, TERMINAL, timeout=60)
        again = c.post(f"/v1/runs/{rid}/cancel").status_code
        parent = c.get(f"/v1/runs/{rid}/metrics").json()["parent"]
    return {"id": rid, "running": running, "cancelling": cancelling, "final": final, "again": again,
            "parent": parent}


def test_cancel_a_running_run(cancelled_run):
    assert cancelled_run["running"]["status"] == "running"
    assert cancelled_run["cancelling"]["status"] in ("cancelling", "cancelled")
    assert cancelled_run["final"]["status"] == "cancelled"
    assert cancelled_run["again"] == 409
    assert cancelled_run["parent"]["status"] == "KILLED"


def test_restart_keeps_every_run_with_its_true_status(server, finished_runs, cancelled_run):
    with server.client() as c:
        before = {r["id"]: r["status"] for r in c.get("/v1/runs", params={"limit": 200}).json()["items"]}
    assert len(before) >= 3 and "cancelled" in before.values()
    server.stop()
    server.start()
    with server.client() as c:
        after = {r["id"]: r["status"] for r in c.get("/v1/runs", params={"limit": 200}).json()["items"]}
        assert after == before
        rid = finished_runs["ablation"]["id"]
        assert c.get(f"/v1/runs/{rid}/table").status_code == 200
        assert c.get("/v1/runs", params={"status": "cancelled"}).json()["total"] == 1


def test_serve_starts_and_stops_its_own_ray_head(tmp_path):
    """With no cluster answering, `nas-scam serve` starts a loopback Ray head and stops it when it exits."""
    tmp = Path(tempfile.mkdtemp(prefix="nsr-", dir="/tmp"))  # short: Ray's socket paths
    dashboard = f"http://127.0.0.1:{free_port()}"
    server = Server(tmp_path, dashboard)
    try:
        server.start(local_ray=True, RAY_TMPDIR=str(tmp), NAS_SCAM_RAY_NUM_CPUS="1")
        ready = httpx.get(server.url + "/readyz", headers=HEADERS, timeout=30).json()
        assert ready["checks"]["ray"] == "ok", ready
        assert httpx.get(dashboard + "/api/version", timeout=5).status_code == 200
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    assert server.last_returncode == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(dashboard + "/api/version", timeout=2)
    assert "stopping the local Ray head" in server.logs()


def test_fuzz_openapi_finds_no_server_errors(home):
    """schemathesis over every operation of the live server (same home: the real runs are in its store).
    The Ray dashboard is a closed port here, so a valid fuzzed spec gets 503 instead of launching a job:
    503 is the documented answer for an unreachable cluster; any other 5xx, or an error without the
    one error shape, is a failure."""
    from collections import Counter

    import schemathesis
    from hypothesis import HealthCheck, given, settings

    server = Server(home, f"http://127.0.0.1:{free_port()}").start(NAS_SCAM_API_MAX_BODY_BYTES="65536")
    failures: list[str] = []
    seen: Counter = Counter()
    try:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(max_examples=int(os.environ.get("NAS_SCAM_FUZZ_EXAMPLES", "30")), deadline=None,
                      database=None, suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def run(case):
                resp = case.call(base_url=server.url, headers=HEADERS, timeout=60)
                seen[(operation.label, resp.status_code)] += 1
                failures.extend(error_shape_problems(operation.label, operation.path, resp))

            run()
        print("fuzzed (operation, status): count", dict(sorted(seen.items())))
        assert not failures, "\n".join(failures[:10])
        assert sum(seen.values()) >= 100 and len({op for op, _ in seen}) == 13
        assert "unhandled error" not in server.logs()
    finally:
        server.stop()
