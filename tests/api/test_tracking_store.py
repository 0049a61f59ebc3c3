"""The API sees every parent run of its tracking store, however it was launched: a run the API did not
launch (``nas-scam ablate`` from a shell) is listed under its MLflow parent run id with origin
"tracking", and its table, metrics, genotypes and model answer as an API run's do; it has no Ray job to
read logs from, cancel or resume (409).

In-process (TestClient, no Ray: the dashboard points at a closed port): a store seeded through the
recorder. Slow: a real tiny CLI ablation, then the API on the same home.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from api.main import create_app
from api.store import RunRecord
from orchestrator import tracking
from orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KEY = "tracking-store-key"
CLASSES = ("Average", "Epithelial", "Lymphocyte", "Macrophage", "Neutrophil")
# the smallest real ablation: one U-Net retrain of 1 epoch x 2 iterations on 6 synthetic 64 px images
CLI_SPEC = {"name": "cli-abl", "methods": ["unet"], "seeds": 1, "preset": "smoke",
            "epochs": {"train": 1, "train_iters": 2},
            "data": {"synthetic_images": 6, "synthetic_size": 64, "crop_size": 32, "stride": 32},
            "resources": {"cpu": 1}}
PNG = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))[1].tobytes()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(home: Path) -> Settings:
    return Settings(home=home, api_keys=[KEY], ray_dashboard=f"http://127.0.0.1:{_closed_port()}")


def _client(settings: Settings) -> TestClient:
    c = TestClient(create_app(settings), raise_server_exceptions=False)
    c.headers["X-API-Key"] = KEY
    return c


def _error(resp, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code, resp.text
    return resp.json()["error"]["message"]


def _tiny_checkpoint(path: Path) -> Path:
    from nas_core.config import load_config
    from nas_core.engine.checkpoint import save_checkpoint
    from nas_core.models import create_model

    cfg = load_config(preset="smoke", base={"model": {"name": "unet"}})
    return save_checkpoint(path, model=create_model("unet"), config=cfg.to_dict(), phase="train", epoch=0)


def _seed_store(settings: Settings, tmp: Path, name: str, dsc: float) -> tuple[str, str, str]:
    """A finished one-retrain ablation written by the recorder, as the CLI's would be: (parent, retrain,
    experiment id)."""
    spec = {**CLI_SPEC, "kind": "ablation", "name": name, "std": "population", "repeat": "retrain"}
    tracking.check_tracking_uri(settings.tracking_uri)
    t = tracking.Tracker.connect(settings.tracking_uri, name, settings.artifacts_root)
    parent = t.open_parent(name, "ablation", spec, yaml.safe_dump(spec))
    rid, _ = t.child("unet", 0, "train", "train__unet__seed0")
    result = types.SimpleNamespace(test={"dsc": dict.fromkeys(CLASSES, dsc)}, best_epoch=0, metrics_path=None,
                                   checkpoint_path=tmp / "none.pt")
    t.log_train_result(rid, result, log_model=False)
    t.log_files(rid, [_tiny_checkpoint(tmp / f"{name}.pt")], "checkpoint")
    t.finish(rid)
    t.finish(parent)
    return parent, rid, t.experiment_id


def test_a_run_the_api_did_not_launch_is_listed_read_and_predicts(tmp_path):
    settings = _settings(tmp_path / "home")
    parent, retrain, _ = _seed_store(settings, tmp_path, "cli-abl", 0.5)
    # an API run whose MLflow parent is in the same store: listed once, as the API's
    api_parent, _, api_experiment = _seed_store(settings, tmp_path, "api-abl", 0.25)
    with _client(settings) as c:
        run_dir = settings.runs_root / "api" / "apirun00000001"
        (run_dir / "api-abl").mkdir(parents=True)
        (run_dir / "api-abl" / "ablation.json").write_text(json.dumps({"parent_run_id": api_parent,
                                                                       "experiment_id": api_experiment}))
        c.app.state.run_service.store.insert(RunRecord(
            id="apirun00000001", kind="ablation", experiment="api-abl", spec={"kind": "ablation", "name": "api-abl"},
            status="succeeded", submission_id="nas-scam-apirun00000001", run_dir=str(run_dir),
            created_at=time.time() - 3600))

        listed = c.get("/v1/runs").json()
        assert [(r["id"], r["origin"]) for r in listed["items"]] == [(parent, "tracking"), ("apirun00000001", "api")]
        assert listed["total"] == 2
        mine = listed["items"][0]
        assert (mine["kind"], mine["experiment"], mine["status"], mine["ray_job_id"]) == (
            "ablation", "cli-abl", "succeeded", None)
        assert mine["spec"]["methods"] == ["unet"] and mine["mlflow"]["parent_run_id"] == parent
        assert [r["id"] for r in c.get("/v1/runs", params={"experiment": "cli-abl"}).json()["items"]] == [parent]
        assert c.get("/v1/runs", params={"status": "failed"}).json()["total"] == 0
        page = c.get("/v1/runs", params={"limit": 1, "offset": 1}).json()
        assert [r["id"] for r in page["items"]] == ["apirun00000001"] and page["next"] is None
        exps = {(e["name"], e["kind"]): e["runs"] for e in c.get("/v1/experiments").json()["items"]}
        assert exps == {("cli-abl", "ablation"): 1, ("api-abl", "ablation"): 1}

        run = c.get(f"/v1/runs/{parent}").json()
        assert run["progress"]["total"] == 1 and run["progress"]["finished"] == 1
        assert run["mlflow"]["child_run_ids"] == [retrain]
        table = c.get(f"/v1/runs/{parent}/table").json()
        avg = next(r for r in table["rows"] if r["method"] == "unet" and r["class"] == "Average")
        assert avg["mean"] == pytest.approx(50.0) and "population std" in table["note"] and "flag" in table["columns"]
        assert "| U-Net | 1 | ours | 50.00 ± n/a" in c.get(f"/v1/runs/{parent}/table", params={"format": "md"}).text
        metrics = c.get(f"/v1/runs/{parent}/metrics").json()
        # the metrics in % (the surfaces' unit), as MLflow holds them
        assert metrics["parent"]["run_id"] == parent and metrics["runs"][0]["metrics"]["test_dsc_Average"] == 50.0
        _error(c.get(f"/v1/runs/{parent}/genotype"), 404, "no_genotype")  # a U-Net searches nothing
        for resp in (c.get(f"/v1/runs/{parent}/logs"), c.post(f"/v1/runs/{parent}/cancel"),
                     c.post(f"/v1/runs/{parent}/resume")):
            assert "not launched through this API" in _error(resp, 409, "conflict")
        _error(c.get(f"/v1/runs/{retrain}"), 404, "run_not_found")  # a retrain is no run of its own
        _error(c.get(f"/v1/runs/{'0' * 32}"), 404, "run_not_found")

        for model in (parent, retrain):  # the ablation's model, or its retrain's by MLflow run id
            geo = c.post("/v1/predict", params={"model": model}, content=PNG)
            assert geo.status_code == 200, geo.text
            assert geo.json()["type"] == "FeatureCollection"
        assert "no MLflow run" in _error(c.post("/v1/predict", params={"model": "0" * 32}, content=PNG), 404,
                                         "model_not_found")


def _cli(*args: str, env: dict) -> str:
    """``python -m orchestrator.cli ...`` in its own session (which the local Ray it starts joins), ended whole."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                            env={**os.environ, "NAS_SCAM_PROGRESS": "0", "RAY_AUTH_MODE": "disabled", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out[-5000:]
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_the_api_lists_tables_and_predicts_with_a_cli_ablation(home, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(CLI_SPEC))
    out = _cli("ablate", str(spec), env={"NAS_SCAM_HOME": str(home)})
    assert "Table 2 (cli-abl)" in out
    with _client(_settings(home)) as c:
        (run,) = c.get("/v1/runs").json()["items"]
        assert (run["origin"], run["kind"], run["experiment"], run["status"]) == (
            "tracking", "ablation", "cli-abl", "succeeded")
        assert run["id"] == run["mlflow"]["parent_run_id"] and len(run["id"]) == 32
        assert c.get("/v1/experiments").json()["items"][0] | {"last_created": None} == {
            "name": "cli-abl", "kind": "ablation", "runs": 1, "last_created": None}
        got = c.get(f"/v1/runs/{run['id']}").json()
        assert got["progress"] == {"total": 1, "finished": 1, "failed": 0, "running": 0, "fraction": 1.0}
        # the table the API serves is the one the CLI printed
        md = c.get(f"/v1/runs/{run['id']}/table", params={"format": "md"})
        assert md.status_code == 200, md.text
        printed = out[out.index("Table 2 (cli-abl)"):].splitlines()[3]  # the U-Net "ours" row
        cells = [cell.strip() for cell in printed.split("  ") if cell.strip()]
        assert cells[:3] == ["U-Net", "1", "ours"] and f"| {' | '.join(cells)} |" in md.text, (printed, md.text)
        geo = c.post("/v1/predict", params={"model": run["id"]}, content=PNG)
        assert geo.status_code == 200, geo.text
        assert geo.json()["type"] == "FeatureCollection" and geo.json()["properties"]["width"] == 40
