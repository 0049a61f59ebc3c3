"""Issue 15's attacks on the API, replayed: specs that escape their folders, unbounded sizes, a race on
the active-run limit, images that lie about their size, parser bombs, a chatty /readyz, lost runs.

In-process (TestClient or ASGI) wherever no server is needed; a job client double stands in for Ray's
job API where a spec must be accepted. Loopback only, bounded sizes; the live-server cases reuse
tests/api/test_live.py's ``Server``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.images import image_size
from api.main import create_app
from api.service import RunService
from api.store import RunRecord
from orchestrator import tracking
from orchestrator.jobs import JobServer
from orchestrator.settings import Settings
from orchestrator.specs import PATH_KEYS
from tests.helpers import error_shape_problems

KEY = "security-key"
SMOKE = {"kind": "ablation", "name": "smoke", "preset": "smoke", "methods": ["unet"], "seeds": 1}
HPO = {"kind": "hpo", "name": "hpo", "preset": "smoke", "method": "unet", "num_samples": 2,
       "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}
SEARCH = {"kind": "search", "name": "s", "method": "nas-scam-p-sync", "preset": "smoke"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeJobs:
    """Ray's JobSubmissionClient as far as the job server uses it; ``known`` job ids answer, others do not exist."""

    def __init__(self, delay: float = 0.0):
        self.delay, self.submitted, self.known = delay, [], set()

    def submit_job(self, **kwargs):
        time.sleep(self.delay)  # widens the window a non-atomic limit check would lose
        self.submitted.append(kwargs)
        self.known.add(kwargs["submission_id"])
        return kwargs["submission_id"]

    def get_job_info(self, submission_id):
        if submission_id not in self.known:
            raise RuntimeError(f"Job {submission_id} does not exist")

        class Info:
            status, message, start_time, end_time = "PENDING", "", None, None
        return Info()

    def list_jobs(self):
        return []


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    data = tmp_path / "data"
    (data / "monusac").mkdir(parents=True)
    return Settings(home=tmp_path / "home", api_keys=[KEY], data_roots=[data],
                    ray_dashboard=f"http://127.0.0.1:{_closed_port()}", api_max_body_bytes=1 << 20,
                    api_max_cpu=2, api_max_gpu=1)


def _service(settings: Settings, fake: FakeJobs) -> RunService:
    return RunService(settings, jobs=JobServer(settings.ray_dashboard, client=fake))


def _client(settings: Settings, jobs=None) -> TestClient:
    service = _service(settings, jobs) if jobs is not None else None
    c = TestClient(create_app(settings, service), raise_server_exceptions=False)
    c.headers["X-API-Key"] = KEY
    return c


@pytest.fixture
def client(settings):
    with _client(settings) as c:
        yield c


@pytest.fixture
def accepting(settings):
    """A client whose run service submits to a job-client double: valid specs get 202."""
    jobs = FakeJobs()
    with _client(settings, jobs) as c:
        c.jobs = jobs
        yield c


def _error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and "Traceback" not in resp.text
    return err


# ---------------------------------------------------------------- names are identifiers
@pytest.mark.parametrize("base", [SMOKE, HPO, SEARCH], ids=["ablation", "hpo", "search"])
@pytest.mark.parametrize("name", ["/any/absolute/folder", "../../../../any/folder", "", "a" * 65, "a/b", ".hidden"])
def test_a_spec_name_that_is_not_an_identifier_is_422(accepting, base, name):
    err = _error(accepting.post("/v1/runs", json={**base, "name": name}), 422, "validation_error")
    assert err["message"].startswith("name:"), err
    assert not accepting.jobs.submitted


# ---------------------------------------------------------------- paths checked on the expanded configs
@pytest.mark.parametrize("spec, field", [
    ({**HPO, "space": {"data": {"type": "choice", "values": [{"source": "/etc"}]}}}, "data.source"),
    ({**HPO, "space": {"data.source": {"type": "choice", "values": ["/etc"]}}}, "data.source"),
    ({**HPO, "space": {"data.cache_dir": {"type": "choice", "values": ["/tmp/x", "/etc"]}}}, "data.cache_dir"),
    ({**HPO, "space": {"data": {"type": "choice", "values": [{"cache_dir": "/etc"}]}}}, "data.cache_dir"),
    ({**SMOKE, "overrides": {"data.cache_dir": "/etc"}}, "data.cache_dir"),
    ({**SMOKE, "overrides": {"out_dir": "/etc"}}, "out_dir"),
    ({"kind": "train", "name": "t", "method": "nas-scam-p-sync", "genotype": "/etc/passwd"}, "model.genotype"),
])
def test_paths_from_any_key_or_search_space_value_are_403(accepting, settings, spec, field):
    err = _error(accepting.post("/v1/runs", json=spec), 403, "path_forbidden")
    assert err["message"].startswith(f"{field}:") and str(settings.data_roots[0]) in err["message"], err
    assert not accepting.jobs.submitted


def test_a_search_space_inside_the_roots_is_accepted(accepting, settings):
    inside = str(settings.data_roots[0] / "monusac")
    spec = {**HPO, "space": {"data": {"type": "choice", "values": [{"source": inside}]}}}
    assert accepting.post("/v1/runs", json=spec).status_code == 202
    assert len(accepting.jobs.submitted) == 1


def test_every_string_field_of_the_run_config_is_classified():
    """PATH_KEYS must grow with RunConfig: a new str field is either a path or listed here as not one."""
    import dataclasses
    import typing

    from nas_core.config import RunConfig

    not_paths = {"device", "model.name", "model.search", "model.zero_op", "model.impl", "data.layout",
                 "data.stain", "data.split", "data.split_by", "augment.pipeline", "loss.name", "protocol", "compile",
                 "search.alternation", "data.grid", "search.val_timing", "train.val_timing", "search.sampler",
                 "train.sampler"}

    def strings(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from strings(tp, f"{prefix}{f.name}.")
                continue
            options = typing.get_args(tp) if typing.get_origin(tp) is typing.Union else (tp,)
            if any(a is str or typing.get_origin(a) is typing.Literal for a in options):
                yield f"{prefix}{f.name}"

    assert set(strings(RunConfig)) == set(PATH_KEYS) | not_paths


# ---------------------------------------------------------------- strict integers, bounds
@pytest.mark.parametrize("spec, field", [
    ({**SMOKE, "seeds": "1000"}, "seeds"),
    ({**HPO, "num_samples": "1000000"}, "num_samples"),
    ({**SEARCH, "seed": "3"}, "seed"),
    ({**SMOKE, "seeds": 101}, "seeds"),
    ({**SMOKE, "seeds": list(range(101))}, "seeds"),
    ({**SMOKE, "seeds": [2**40]}, "seeds"),
    ({**HPO, "num_samples": 1001}, "num_samples"),
    ({**HPO, "grace_period": 10**6}, "grace_period"),
    ({**SMOKE, "epochs": {"train": 10**6}}, "epochs.train"),  # as written; bounded by LIMITS
    ({**SMOKE, "epochs": {"search": 10**6}}, "epochs.search"),
    ({**SMOKE, "overrides": {"train.epochs": 10**6}}, "train.epochs"),
    ({**SMOKE, "overrides": {"train": {"iters_per_epoch": 10**9}}}, "train.iters_per_epoch"),
    ({**HPO, "space": {"train.epochs": {"type": "int", "low": 1, "high": 10**7}}}, "train.epochs"),
    ({**SMOKE, "data": {"synthetic_images": 10**6}}, "data.synthetic_images"),
    ({**SMOKE, "data": {"synthetic_size": 10**5}}, "data.synthetic_size"),
    ({**SMOKE, "data": {"crop_size": 16 * 1000}}, "data.crop_size"),
    ({**SMOKE, "overrides": {"train.per_class": 10**4}}, "train.per_class"),
    ({**SMOKE, "overrides": {"data.workers": -3}}, "data.workers"),
    ({**SMOKE, "overrides": {"data.workers": 1000}}, "data.workers"),
    ({**HPO, "space": {"data.workers": {"type": "choice", "values": [0, -3]}}}, "data.workers"),
    ({**SMOKE, "resources": {"cpu": "1"}}, "resources.cpu"),
])
def test_sizes_are_strict_integers_within_the_server_bounds(accepting, spec, field):
    err = _error(accepting.post("/v1/runs", json=spec), 422, "validation_error")
    assert field in err["message"], err
    assert not accepting.jobs.submitted


def test_bounds_are_settings(settings):
    wide = settings.model_copy(update={"api_max_epochs": 10**6})
    with _client(wide, FakeJobs()) as c:
        assert c.post("/v1/runs", json={**SMOKE, "epochs": {"train": 10**5}}).status_code == 202


def test_kind_is_required(accepting):
    err = _error(accepting.post("/v1/runs", json={}), 422, "validation_error")
    assert err["message"].startswith("kind:")
    _error(accepting.post("/v1/runs", json={"name": "x", "seeds": 1}), 422, "validation_error")
    assert not accepting.jobs.submitted


# ---------------------------------------------------------------- atomic active-run limit
def test_concurrent_posts_respect_the_active_run_limit(settings):
    limited = settings.model_copy(update={"api_max_active_runs": 3})
    jobs = FakeJobs(delay=0.3)
    app = create_app(limited, _service(limited, jobs))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api", headers={"X-API-Key": KEY}) as c:
            return await asyncio.gather(*[c.post("/v1/runs", json={**SMOKE, "name": f"r{i}"}) for i in range(5)])

    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert codes == [202, 202, 202, 429, 429]
    assert len(jobs.submitted) == 3 and app.state.run_service.store.count_active() == 3


def test_a_refused_submission_frees_its_slot(settings):
    limited = settings.model_copy(update={"api_max_active_runs": 1})
    with _client(limited) as c:  # Ray unreachable: 503, and the reserved slot is given back
        _error(c.post("/v1/runs", json=SMOKE), 503, "cluster_unavailable")
        _error(c.post("/v1/runs", json=SMOKE), 503, "cluster_unavailable")
        assert c.app.state.run_service.store.count_active() == 0


# ---------------------------------------------------------------- parser bombs
def test_deep_json_is_422(client):
    deep = '{"kind": "ablation", "overrides": ' + '{"a": ' * 5000 + "1" + "}" * 5001
    err = _error(client.post("/v1/runs", content=deep, headers={"Content-Type": "application/json"}),
                 422, "validation_error")
    assert "nested deeper" in err["message"]
    nan = '{"kind": "hpo", "space": {"train.lr": {"type": "uniform", "low": NaN, "high": 1}}}'
    _error(client.post("/v1/runs", content=nan, headers={"Content-Type": "application/json"}), 422, "validation_error")


@pytest.mark.parametrize("tail", ["a" * 100_000, "b" * 300, "c/" * 3000])
def test_over_long_paths_are_422(client, settings, tail):
    # under a root: the old check passed the root test and then stat() raised ENAMETOOLONG (a 500)
    value = f"{settings.data_roots[0]}/{tail}"
    err = _error(client.post("/v1/runs", json={**SMOKE, "data": {"source": value}}), 422, "validation_error")
    assert err["message"].startswith("data.source:") and "too long" in err["message"]


# ---------------------------------------------------------------- /readyz
def test_readyz_tells_strangers_only_ok_or_not(settings):
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        anonymous = c.get("/readyz")
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "unavailable"}
        wrong = c.get("/readyz", headers={"X-API-Key": "nope"})
        assert wrong.json() == {"status": "unavailable"}
        detailed = c.get("/readyz", headers={"X-API-Key": KEY}).json()
        assert detailed["checks"]["mlflow"] == "ok" and detailed["checks"]["ray"].startswith("unavailable")


# ---------------------------------------------------------------- /predict
def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0" + b"\0" * 64


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif"])
def test_image_size_reads_the_header(ext):
    img = np.zeros((37, 53, 3), np.uint8)
    raw = cv2.imencode(ext, img)[1].tobytes()
    fmt, w, h = image_size(raw)
    assert (w, h) == (53, 37) and fmt == {".png": "png", ".jpg": "jpeg", ".tif": "tiff"}[ext]
    assert image_size(b"GIF89a" + raw) is None and image_size(raw[:6]) is None


def test_a_huge_declared_image_is_refused_before_decoding(client, settings, monkeypatch):
    ckpt = settings.data_roots[0] / "m.pt"
    ckpt.write_bytes(b"x")
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: decoded.append(1))
    err = _error(client.post("/v1/predict", params={"checkpoint": str(ckpt)}, content=_png_header(20000, 20000)),
                 413, "image_too_large")
    assert "20000x20000" in err["message"] and not decoded


def test_predictions_beyond_the_bound_get_429(settings):
    one = settings.model_copy(update={"api_max_predictions": 1})
    with _client(one) as c:
        c.app.state.inference.admit()  # a prediction in flight
        try:
            _error(c.post("/v1/predict", params={"checkpoint": "/x.pt"}, content=b"x"), 429, "too_many_predictions")
        finally:
            c.app.state.inference.release()
        _error(c.post("/v1/predict", params={"checkpoint": "/etc/passwd"}, content=b"x"), 403, "path_forbidden")


@pytest.fixture
def tiny_checkpoint(settings) -> Path:
    from nas_core.config import load_config
    from nas_core.engine.checkpoint import save_checkpoint
    from nas_core.models import create_model

    cfg = load_config(preset="smoke", base={"model": {"name": "unet"}})
    return save_checkpoint(settings.data_roots[0] / "unet.pt", model=create_model("unet"), config=cfg.to_dict(),
                           phase="train", epoch=0)


def test_a_prediction_past_its_deadline_is_stopped_and_frees_inference(settings, tiny_checkpoint):
    # a deadline no prediction meets (the worker process alone takes longer to start): 503, the worker
    # is killed, and the next request with a real time limit gets its answer
    short = settings.model_copy(update={"api_predict_timeout_s": 0.01})
    png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))[1].tobytes()
    with _client(short) as c:
        inference = c.app.state.inference
        _error(c.post("/v1/predict", params={"checkpoint": str(tiny_checkpoint)}, content=png), 503, "predict_timeout")
        assert inference.worker_pid is None
        inference.timeout_s = 300
        mask = c.post("/v1/predict", params={"checkpoint": str(tiny_checkpoint), "format": "png"}, content=png)
        assert mask.status_code == 200, mask.text
        labels = cv2.imdecode(np.frombuffer(mask.content, np.uint8), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (48, 40) and labels.max() <= 4
        assert inference.worker_pid is not None
    assert inference.worker_pid is None  # the app's shutdown stops it


# ---------------------------------------------------------------- lost runs
def _lost_run(settings: Settings) -> tuple[RunService, RunRecord, object, str, str]:
    """A running ablation whose Ray job is gone: an MLflow parent and one child RUNNING, its state file."""
    service = _service(settings, FakeJobs())
    c = tracking.client(settings.tracking_uri)
    exp = tracking.ensure_experiment(c, "smoke", settings.artifacts_root)
    t = tracking.Tracker(c, exp)
    parent = t.open_parent("smoke", "ablation", SMOKE, json.dumps(SMOKE))
    child, _ = t.child("unet", 0, "train", "train__unet__seed0")
    run_dir = settings.runs_root / "api" / "lost1"
    (run_dir / "smoke").mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(SMOKE))
    (run_dir / "smoke" / "ablation.json").write_text(json.dumps({"parent_run_id": parent, "experiment_id": exp}))
    rec = RunRecord(id="lost1", kind="ablation", experiment="smoke", spec=SMOKE, status="running",
                    submission_id="nas-scam-lost1", run_dir=str(run_dir), created_at=time.time())
    service.store.insert(rec)
    return service, rec, c, parent, child


def test_a_lost_run_closes_its_mlflow_runs_and_resumes(settings):
    service, rec, c, parent, child = _lost_run(settings)
    with TestClient(create_app(settings, service), raise_server_exceptions=False) as api:
        api.headers["X-API-Key"] = KEY
        run = api.get("/v1/runs/lost1").json()
        assert run["status"] == "lost" and run["mlflow"]["parent_run_id"] == parent
        assert c.get_run(parent).info.status == "FAILED" and c.get_run(child).info.status == "FAILED"
        assert "lost" in c.get_run(child).data.tags["stopped"]

        resumed = api.post("/v1/runs/lost1/resume")
        assert resumed.status_code == 202, resumed.text
        body = resumed.json()
        assert body["status"] == "queued" and body["ray_job_id"] == "nas-scam-lost1-r1"
        assert body["links"]["resume"] == "/v1/runs/lost1/resume"
        (job,) = service.jobs._fixed_client.submitted
        assert job["submission_id"] == "nas-scam-lost1-r1" and job["entrypoint"].endswith(f"{rec.run_dir}/spec.json")
        assert api.get("/v1/runs/lost1").json()["status"] == "queued"  # Ray knows the new job
        _error(api.post("/v1/runs/lost1/resume"), 409, "conflict")  # active runs do not resume
        _error(api.post("/v1/runs/nosuchrun/resume"), 404, "run_not_found")


def test_resume_respects_the_active_run_limit(settings):
    service, *_ = _lost_run(settings)
    service.get("lost1")  # -> lost
    service.settings = settings.model_copy(update={"api_max_active_runs": 1})
    service.store.insert(RunRecord(id="busy", kind="ablation", experiment="x", spec=SMOKE, status="running",
                                    submission_id="nas-scam-busy", run_dir="/nonexistent", created_at=time.time()))
    service.jobs._fixed_client.known.add("nas-scam-busy")
    with TestClient(create_app(service.settings, service), raise_server_exceptions=False) as api:
        _error(api.post("/v1/runs/lost1/resume", headers={"X-API-Key": KEY}), 429, "too_many_runs")
    assert service.store.get("lost1").status == "lost"


# ---------------------------------------------------------------- a bounded fuzz, every run
def test_bounded_schemathesis_run_finds_no_server_error(settings):
    """A few deterministic examples per operation, in-process: no 5xx but 503 (Ray is a closed port),
    every error in the one error shape. The long fuzz against a live server is in tests/api/test_live.py."""
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings

    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @hsettings(max_examples=4, deadline=None, database=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            nonlocal calls
            resp = case.call(headers={"X-API-Key": KEY})
            calls += 1
            failures.extend(error_shape_problems(operation.label, operation.path, resp))

        run()
    assert not failures, "\n".join(failures[:10])
    assert calls >= 13


# ---------------------------------------------------------------- issue 22: bounds before expansion, finite, Unicode
def _raw_post(client, spec: dict):
    # json.dumps escapes a lone surrogate as "\ud800"; httpx's json= cannot encode one at all
    return client.post("/v1/runs", content=json.dumps(spec), headers={"Content-Type": "application/json"})


def test_a_huge_search_is_refused_before_its_epochs_are_listed(accepting):
    # 10**8 epochs took 42 s and 5 GB before the 422 (the validation epochs were listed first)
    started = time.monotonic()
    for spec in ({**SEARCH, "epochs": {"search": 100_000_000}}, {**SEARCH, "overrides": {"search.epochs": 10**9}}):
        err = _error(accepting.post("/v1/runs", json=spec), 422, "validation_error")
        assert "search" in err["message"] and "100000" in err["message"], err
    assert time.monotonic() - started < 10 and not accepting.jobs.submitted


def test_healthz_answers_while_a_spec_is_validated(settings, monkeypatch):
    import api.validation
    from orchestrator.specs import parse_spec

    def slow_parse(data, source="spec"):
        time.sleep(1.5)  # a spec whose configs take long to build
        return parse_spec(data, source)

    monkeypatch.setattr(api.validation, "parse_spec", slow_parse)
    app = create_app(settings, _service(settings, FakeJobs()))

    async def both():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api", headers={"X-API-Key": KEY}) as c:
            started = time.monotonic()
            post = asyncio.create_task(c.post("/v1/runs", json=SMOKE))
            await asyncio.sleep(0.3)  # a loop that validates on itself wakes from this only after 1.5 s
            health = await c.get("/healthz")
            return health.status_code, time.monotonic() - started, (await post).status_code

    health, answered, posted = asyncio.run(both())
    assert health == 200 and posted == 202
    assert answered < 1.2, f"/healthz answered after {answered:.1f} s, behind a spec's validation"


@pytest.mark.parametrize("raw", ["1e400", "-1e400"])
@pytest.mark.parametrize("key", ["train.lr", "augment.strength", "search.lr_alpha"])
def test_an_infinite_float_is_422_naming_the_key(accepting, key, raw):
    body = json.dumps({**SMOKE, "overrides": {key: 0.5}}).replace("0.5", raw)
    err = _error(accepting.post("/v1/runs", content=body, headers={"Content-Type": "application/json"}),
                 422, "validation_error")
    assert f"{key}: expected a finite number" in err["message"], err
    assert not accepting.jobs.submitted


def test_an_unknown_loss_is_422_listing_the_valid_ones(accepting):
    for spec in ({**SMOKE, "overrides": {"loss.name": "dice"}},
                 {**HPO, "space": {"loss.name": {"type": "choice", "values": ["exp_log", "dice"]}}}):
        err = _error(accepting.post("/v1/runs", json=spec), 422, "validation_error")
        assert "loss.name: 'dice' is not a registered loss; valid names: bce, exp_log" in err["message"], err
    assert not accepting.jobs.submitted


@pytest.mark.parametrize("key", ["model.genotype", "model.name", "seed"])
def test_an_identity_key_in_overrides_is_refused_not_dropped(accepting, key):
    value = {"seed": 3}.get(key, "/etc/passwd")
    err = _error(accepting.post("/v1/runs", json={**SMOKE, "overrides": {key: value}}), 422, "validation_error")
    assert f"overrides.{key}:" in err["message"] and "use the spec field" in err["message"], err
    assert not accepting.jobs.submitted


def test_a_size_key_is_checked_the_same_in_overrides(accepting):
    for spec in ({**SMOKE, "data": {"synthetic_images": 1}}, {**SMOKE, "overrides": {"data.synthetic_images": 1}},
                 {**SMOKE, "overrides": {"data.crop_size": 256, "data.stride": 1}}):
        err = _error(accepting.post("/v1/runs", json=spec), 422, "validation_error")
        assert "synthetic_images" in err["message"] or "data.stride" in err["message"], err
    assert not accepting.jobs.submitted


@pytest.mark.parametrize("spec, field", [
    ({**SMOKE, "data": {"source": "/data/\ud800"}}, "data.source"),
    ({**SMOKE, "overrides": {"out_dir": "\ud800"}}, "overrides.out_dir"),
    ({"kind": "train", "name": "t", "method": "nas-scam-p-sync", "genotype": "/x/\ud800.json"}, "genotype"),
    ({**HPO, "space": {"data.source": {"type": "choice", "values": ["/\ud800"]}}}, "space.data.source.values.0"),
    ({**SMOKE, "overrides": {"\ud800": 1}}, "overrides"),
])
def test_a_lone_surrogate_is_422_naming_the_field(accepting, spec, field):
    err = _error(_raw_post(accepting, spec), 422, "validation_error")
    assert err["message"].startswith(f"{field}: not valid Unicode"), err
    assert not accepting.jobs.submitted


def test_check_path_refuses_a_lone_surrogate(settings):
    from api.errors import ApiError
    from api.validation import check_path

    with pytest.raises(ApiError) as err:
        check_path("data.source", f"{settings.data_roots[0]}/\ud800", settings)
    assert err.value.status == 422 and "data.source: not valid Unicode" in str(err.value)


def _tiff(entries: list[tuple[int, int]], pixels: bytes = b"\0" * 100) -> bytes:
    """A little-endian baseline TIFF, one strip of 8-bit grey, with the (tag, LONG value) ``entries`` first
    and in that order (repeats included)."""
    n = len(entries) + 6
    data_at = 8 + 2 + 12 * n + 4
    tags = [*entries, (258, 8), (259, 1), (262, 1), (273, data_at), (278, 10), (279, len(pixels))]
    ifd = struct.pack("<H", n) + b"".join(struct.pack("<HHII", tag, 4, 1, value) for tag, value in tags)
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels


@pytest.mark.parametrize("first, then", [(20000, 10), (10, 20000)])
def test_a_tiff_that_declares_its_size_twice_is_refused_before_decoding(client, settings, monkeypatch, first, then):
    # libtiff (OpenCV) reads the first ImageWidth/ImageLength, the old check the last: 20000 x 20000 was
    # decoded behind a 10 x 10 header (+2.3 GB per request)
    ckpt = settings.data_roots[0] / "m.pt"
    ckpt.write_bytes(b"x")
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: decoded.append(1))
    raw = _tiff([(256, first), (256, then), (257, first), (257, then)])
    err = _error(client.post("/v1/predict", params={"checkpoint": str(ckpt)}, content=raw), 422, "bad_image")
    assert f"ImageWidth twice ({first}, then {then})" in err["message"] and not decoded
    assert image_size(_tiff([(256, 10), (257, 10), (256, 10)])) == ("tiff", 10, 10)  # a harmless repeat


# ---------------------------------------------------------------- issue 22: a server that stops its head
class StoppableJobs(FakeJobs):
    """Jobs that run until stopped, as Ray's job API reports them."""

    def __init__(self):
        super().__init__()
        self.stopped = []

    def stop_job(self, submission_id):
        self.stopped.append(submission_id)
        return True

    def get_job_status(self, submission_id):
        return "STOPPED" if submission_id in self.stopped else "RUNNING"

    def get_job_info(self, submission_id):
        status = self.get_job_status(submission_id)

        class Info:
            message, start_time, end_time = "", None, None
        Info.status = status
        return Info()


def test_runs_on_a_stopping_head_are_stopped_lost_and_resume_clean(settings):
    service, rec, c, parent, child = _lost_run(settings)
    jobs = StoppableJobs()
    jobs.known.add(rec.submission_id)
    service.jobs = JobServer(settings.ray_dashboard, client=jobs)
    assert service.get("lost1").status == "running"

    assert service.abandon_active("the server stopped", wait_s=5) == ["lost1"]
    assert jobs.stopped == ["nas-scam-lost1"]  # the driver does not outlive the head
    lost = service.store.get("lost1")
    assert lost.status == "lost" and "the server stopped" in lost.message and "/resume" in lost.message
    for run_id in (parent, child):
        run = c.get_run(run_id)
        assert run.info.status == "FAILED" and "the server stopped" in run.data.tags["stopped"]
    assert service.abandon_active("again") == []  # nothing active is left

    # a resumed parent and child run again and end without the old "stopped" tag (it was kept on FINISHED)
    tracker = tracking.Tracker.attach(settings.tracking_uri, lost.experiment_id, parent)
    for run_id in (parent, child):
        tracker.reopen(run_id)
        tracker.finish(run_id)
        tags = c.get_run(run_id).data.tags
        assert c.get_run(run_id).info.status == "FINISHED" and "stopped" not in tags
        assert "the server stopped" in tags["resumed_after"]
