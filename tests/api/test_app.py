"""The FastAPI app in-process (TestClient): auth, error shape, spec validation, data roots, the run store.

No Ray here: the dashboard points at a closed port, so a valid spec gets 503 and nothing is launched.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.deps import key_matches
from api.main import create_app
from api.store import RunRecord, RunStore
from orchestrator.settings import Settings

KEY = "test-key-123"
SMOKE = {"kind": "ablation", "name": "smoke", "preset": "smoke", "methods": ["unet"], "seeds": 1}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    data = tmp_path / "data"
    (data / "monusac").mkdir(parents=True)
    return Settings(home=tmp_path / "home", api_keys=[KEY, "other-key"], data_roots=[data],
                    ray_dashboard=f"http://127.0.0.1:{_closed_port()}", api_max_body_bytes=64 * 1024,
                    api_max_cpu=2, api_max_gpu=1)


@pytest.fixture
def client(settings: Settings) -> TestClient:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        c.headers["X-API-Key"] = KEY
        yield c


def _assert_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert "Traceback" not in resp.text
    return body["error"]


def _record(store: RunStore, run_id: str, status: str = "succeeded", kind: str = "ablation",
            experiment: str = "smoke", created: float | None = None) -> RunRecord:
    rec = RunRecord(id=run_id, kind=kind, experiment=experiment, spec={**SMOKE, "kind": kind}, status=status,
                    submission_id=f"nas-scam-{run_id}", run_dir=f"/nonexistent/{run_id}",
                    created_at=created or time.time())
    store.insert(rec)
    return rec


def test_health_needs_no_key_and_v1_does(settings):
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        _assert_error(c.get("/v1/runs"), 401, "unauthorized")
        _assert_error(c.get("/v1/runs", headers={"X-API-Key": KEY + "x"}), 401, "unauthorized")
        _assert_error(c.post("/v1/runs", json=SMOKE, headers={"X-API-Key": ""}), 401, "unauthorized")
        assert c.get("/v1/runs", headers={"X-API-Key": "other-key"}).status_code == 200


def test_no_configured_keys_refuses_everything(tmp_path):
    with TestClient(create_app(Settings(home=tmp_path, api_keys=[]))) as c:
        _assert_error(c.get("/v1/experiments", headers={"X-API-Key": "anything"}), 401, "unauthorized")


def test_key_matches_is_exact():
    assert key_matches("abc", ["x", "abc"])
    assert not key_matches("ab", ["abc"]) and not key_matches("abcd", ["abc"]) and not key_matches("", ["abc"])


def test_readyz_reports_unreachable_ray(client):
    resp = client.get("/readyz")
    assert resp.status_code == 503
    body = resp.json()
    assert body["status"] == "unavailable" and body["checks"]["mlflow"] == "ok"
    assert body["checks"]["ray"].startswith("unavailable")


@pytest.mark.parametrize("spec, field", [
    ({**SMOKE, "methods": ["unet2"]}, "methods"),
    ({**SMOKE, "seeds": 0}, "seeds"),
    ({**SMOKE, "bogus": 1}, "bogus"),
    ({**SMOKE, "resources": {"cpu": -1}}, "resources.cpu"),
    ({"kind": "train", "method": "nas-scam-p-sync"}, "genotype"),
    ({"kind": "nonsense"}, "kind"),
    ({**SMOKE, "seeds": 10**12}, "seeds"),
    ({**SMOKE, "overrides": {"train.lr": -1}}, "train.lr"),
])
def test_bad_spec_is_422_naming_the_field(client, spec, field):
    err = _assert_error(client.post("/v1/runs", json=spec), 422, "validation_error")
    assert field in err["message"], err


def test_non_json_and_non_object_bodies_are_422(client):
    _assert_error(client.post("/v1/runs", content=b"{not json", headers={"Content-Type": "application/json"}),
                  422, "validation_error")
    _assert_error(client.post("/v1/runs", json=[1, 2]), 422, "validation_error")


def test_resources_over_the_server_limit_are_422(client):
    err = _assert_error(client.post("/v1/runs", json={**SMOKE, "resources": {"cpu": 3}}), 422, "validation_error")
    assert "resources.cpu" in err["message"] and "NAS_SCAM_API_MAX_CPU" in err["message"]


@pytest.mark.parametrize("where", ["data", "genotype", "override", "traversal", "relative"])
def test_paths_outside_the_data_roots_are_403(client, settings, tmp_path, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = settings.data_roots[0]
    spec = {"ablation": {**SMOKE, "data": {"source": str(outside)}},
            "genotype": {"kind": "train", "method": "nas-scam-p-sync", "genotype": "/etc/passwd"},
            "override": {**SMOKE, "overrides": {"data": {"cache_dir": str(outside)}}},
            "traversal": {**SMOKE, "data": {"source": f"{inside}/../outside"}},
            "relative": {**SMOKE, "data": {"source": "data/monusac"}}}[where if where != "data" else "ablation"]
    err = _assert_error(client.post("/v1/runs", json=spec), 403, "path_forbidden")
    assert str(inside) in err["message"]


def test_symlink_out_of_a_root_is_403(client, settings, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    link = settings.data_roots[0] / "link"
    link.symlink_to(outside)
    _assert_error(client.post("/v1/runs", json={**SMOKE, "data": {"source": str(link)}}), 403, "path_forbidden")


def test_path_inside_a_root_passes_validation_and_dead_ray_is_503(client, settings):
    spec = {**SMOKE, "data": {"source": str(settings.data_roots[0] / "monusac")}}
    err = _assert_error(client.post("/v1/runs", json=spec), 503, "cluster_unavailable")
    assert settings.ray_dashboard in err["message"]
    missing = {**SMOKE, "data": {"source": str(settings.data_roots[0] / "nope")}}
    assert "does not exist" in _assert_error(client.post("/v1/runs", json=missing), 422, "validation_error")["message"]


def test_body_over_the_limit_is_413(client):
    _assert_error(client.post("/v1/runs", json={**SMOKE, "overrides": {"x": "a" * 70000}}), 413, "payload_too_large")


def test_unknown_run_is_404_and_bad_id_422(client):
    _assert_error(client.get("/v1/runs/0123456789abcdef"), 404, "run_not_found")
    _assert_error(client.get("/v1/runs/bad%20id"), 422, "validation_error")
    _assert_error(client.get("/v1/nowhere"), 404, "not_found")


def test_list_filters_and_paginates_from_the_store(client, settings):
    store = client.app.state.run_service.store
    t = time.time()
    for i in range(5):
        _record(store, f"run{i}", status="succeeded" if i % 2 else "failed", kind="ablation" if i < 4 else "hpo",
                experiment="a" if i < 3 else "b", created=t + i)
    page = client.get("/v1/runs", params={"limit": 2}).json()
    assert page["total"] == 5 and [r["id"] for r in page["items"]] == ["run4", "run3"]
    assert page["next"] == "/v1/runs?limit=2&offset=2"
    assert client.get(page["next"]).json()["items"][0]["id"] == "run2"
    assert {r["id"] for r in client.get("/v1/runs", params={"status": "failed"}).json()["items"]} == {"run0", "run2", "run4"}
    assert [r["id"] for r in client.get("/v1/runs", params={"kind": "hpo"}).json()["items"]] == ["run4"]
    assert client.get("/v1/runs", params={"experiment": "a"}).json()["total"] == 3
    _assert_error(client.get("/v1/runs", params={"status": "weird"}), 422, "validation_error")
    _assert_error(client.get("/v1/runs", params={"limit": 0}), 422, "validation_error")
    exps = client.get("/v1/experiments").json()["items"]
    assert {(e["name"], e["kind"], e["runs"]) for e in exps} == {("a", "ablation", 3), ("b", "ablation", 1), ("b", "hpo", 1)}


def test_finished_run_reads_without_ray(client):
    _record(client.app.state.run_service.store, "done1", status="succeeded")
    run = client.get("/v1/runs/done1").json()
    assert run["status"] == "succeeded" and run["ray_job_id"] == "nas-scam-done1"
    assert run["links"]["table"] == "/v1/runs/done1/table?format=json"
    assert run["progress"]["total"] == 1
    _assert_error(client.post("/v1/runs/done1/cancel"), 409, "conflict")
    _assert_error(client.get("/v1/runs/done1/table"), 404, "no_table")
    _assert_error(client.get("/v1/runs/done1/genotype"), 404, "no_genotype")
    _assert_error(client.get("/v1/runs/done1/table", params={"format": "xls"}), 422, "validation_error")


def test_active_run_with_ray_gone_keeps_its_status_and_says_why(client):
    _record(client.app.state.run_service.store, "live1", status="running")
    run = client.get("/v1/runs/live1").json()
    assert run["status"] == "running" and run["message"].startswith("status unknown")
    _assert_error(client.get("/v1/runs/live1/table"), 409, "not_ready")


def test_run_store_survives_reopening(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    _record(store, "keep1", status="queued")
    store.update("keep1", status="cancelled", message="stopped")
    store.close()
    again = RunStore(tmp_path / "runs.db")
    rec = again.get("keep1")
    assert (rec.status, rec.message, rec.spec) == ("cancelled", "stopped", {**SMOKE})
    assert again.count_active() == 0


def test_too_many_active_runs_is_429(settings):
    settings = settings.model_copy(update={"api_max_active_runs": 1})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        _record(c.app.state.run_service.store, "busy1", status="running")
        _assert_error(c.post("/v1/runs", json=SMOKE, headers={"X-API-Key": KEY}), 429, "too_many_runs")


def test_predict_checks_its_inputs(client, settings, tmp_path):
    _assert_error(client.post("/v1/predict", content=b"x"), 422, "validation_error")  # neither model nor checkpoint
    _assert_error(client.post("/v1/predict", params={"checkpoint": "/etc/passwd"}, content=b"x"), 403, "path_forbidden")
    _assert_error(client.post("/v1/predict", params={"model": "0123456789abcdef"}, content=b"x"), 404, "model_not_found")


def test_openapi_documents_specs_examples_and_the_key(client):
    schema = client.get("/openapi.json").json()
    post = schema["paths"]["/v1/runs"]["post"]
    assert "smoke" in post["requestBody"]["content"]["application/json"]["examples"]
    assert {"AblationSpec", "RunSpec", "HpoSpec", "Spec", "ErrorOut"} <= set(schema["components"]["schemas"])
    assert schema["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert {"401", "422"} <= set(schema["paths"]["/v1/runs/{run_id}"]["get"]["responses"])


def test_api_never_imports_ray_itself():
    root = Path(__file__).resolve().parents[2] / "api"
    for path in root.rglob("*.py"):
        text = path.read_text()
        # the package ray, not a module of ours whose name starts with it (orchestrator.ray_env)
        assert not re.search(r"^\s*(import ray|from ray)(\.|\s|$)", text, re.M), path
