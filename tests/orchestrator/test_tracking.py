"""MLflow tracking against a real sqlite store in tmp_path (no Ray): the tracking client and its errors,
and the one tracker: ``Tracker.run_phase`` with its ``PhaseRecorder`` records every phase alike (a single
run as an ablation trial, resumes without double logging, crashes as FAILED)."""
import json
import socket
import types
from pathlib import Path

import pytest
import yaml

from orchestrator import results, tracking
from orchestrator.phases import run_phase
from orchestrator.runner import RunnerError, publish_table, run_spec_file, table_from_mlflow
from orchestrator.settings import Settings, get_settings


@pytest.fixture()
def store(tmp_path):
    s = Settings(home=tmp_path / "home")
    tracking.check_tracking_uri(s.tracking_uri)
    c = tracking.client(s.tracking_uri)
    exp = tracking.ensure_experiment(c, "abl", s.artifacts_root)
    return s, c, exp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_and_bad_scheme_are_named():
    port = _free_port()
    with pytest.raises(tracking.TrackingError, match=f"http://127.0.0.1:{port} is unreachable"):
        tracking.check_tracking_uri(f"http://127.0.0.1:{port}", timeout=1)
    with pytest.raises(tracking.TrackingError, match="expected http"):
        tracking.check_tracking_uri("ftp://somewhere")


def test_experiment_artifacts_live_under_the_settings_folder(store):
    s, c, exp = store
    assert tracking.ensure_experiment(c, "abl", s.artifacts_root) == exp  # idempotent
    location = c.get_experiment(exp).artifact_location
    assert location == (s.artifacts_root / "abl").resolve().as_uri()


def test_child_runs_are_found_again_and_failures_recorded(store):
    s, c, exp = store
    t = tracking.Tracker(c, exp)
    parent = t.open_parent("abl", "ablation", {"methods": ["unet"], "seeds": 2}, "name: abl\n")
    rid, status = t.child("unet", 0, "train", "train__unet__seed0")
    assert status == "RUNNING"
    again, _ = t.child("unet", 0, "train", "train__unet__seed0")
    assert again == rid
    other, _ = t.child("unet", 1, "train", "train__unet__seed1")
    assert other != rid
    run = c.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.run_name == "train__unet__seed0"
    t.log_params(rid, {"train": {"lr": 1e-4}, "seed": 0})
    t.log_params(rid, {"train": {"lr": 1e-4}, "seed": 0})  # a resumed run logs them again: no error
    assert c.get_run(rid).data.params["train.lr"] == "0.0001"
    for epoch in range(3):
        t.log_epoch(rid, epoch, {"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "val_dsc": 0.1 * epoch})
    hist = c.get_metric_history(rid, "val_dsc")
    # steps are the 1-based epochs the console names, DSC in % with 2 decimals
    assert [m.step for m in hist] == [1, 2, 3] and [m.value for m in hist] == [0.0, 10.0, 20.0]
    assert "epoch" not in c.get_run(rid).data.metrics
    try:
        raise RuntimeError("NaN loss in train epoch 2")
    except RuntimeError as exc:
        t.fail(other, exc)
    failed = c.get_run(other)
    assert failed.info.status == "FAILED" and failed.data.tags["error"] == "RuntimeError: NaN loss in train epoch 2"
    assert "error.txt" in [a.path for a in c.list_artifacts(other)]
    assert t.kill_dangling("test") == 1  # rid was still RUNNING
    assert c.get_run(rid).info.status == "KILLED"


def _fake_train_result(tmp: Path, dsc: dict):
    metrics = tmp / "metrics.json"
    metrics.write_text("{}")
    test = {"dsc": dsc, "dsc_per_image": dict(dsc), "pq": {k: v / 2 for k, v in dsc.items()},
            "pixel_accuracy": 0.9, "n_images": 4}
    return types.SimpleNamespace(test=test, best_epoch=1, metrics_path=metrics, checkpoint_path=tmp / "none.pt")


def test_table_rebuilt_from_mlflow_alone(store, tmp_path):
    s, c, exp = store
    tracker = tracking.Tracker(c, exp)
    parent = tracker.open_parent("abl", "ablation", {}, "")
    values = {("unet", 0): 0.5, ("unet", 1): 0.7, ("cbam", 0): 0.6}
    for (method, seed), v in values.items():
        rid, _ = tracker.child(method, seed, "train", f"train__{method}__seed{seed}")
        dsc = {"Average": v, "Epithelial": v, "Lymphocyte": v, "Macrophage": v, "Neutrophil": v}
        tracker.log_train_result(rid, _fake_train_result(tmp_path, dsc), log_model=False)
        tracker.finish(rid)
    # a failed run is not part of the table
    rid, _ = tracker.child("cbam", 1, "train", "train__cbam__seed1")
    c.set_terminated(rid, "FAILED")
    assert c.get_run(rid).info.status == "FAILED"
    out = table_from_mlflow("abl", s, out_dir=tmp_path / "t")
    t = out.table.set_index(["method", "class"])
    assert t.loc[("unet", "Average"), "mean"] == pytest.approx(60.0)
    assert t.loc[("unet", "Average"), "std"] == pytest.approx(14.1421356, rel=1e-6)
    assert t.loc[("cbam", "Average"), "n"] == 1
    assert "60.00 ± 14.14" in out.text and (tmp_path / "t" / "table2.md").exists()
    assert "sample std (ddof=1)" in out.text  # a parent without a std param predates it: sample std
    # an ablation's parent holds its spec as params: the rebuilt table uses its std and says so
    tracker.log_params(parent, {"std": "population", "repeat": "retrain"})
    out = table_from_mlflow("abl", s, out_dir=tmp_path / "t2")
    assert "60.00 ± 10.00" in out.text and "population std (ddof=0)" in out.text and "repeat=retrain" in out.text
    # the parent holds the Table 2 artifacts when published by the ablation
    publish_table(tracker, tmp_path / "p")
    names = {a.path for a in c.list_artifacts(parent, "table2")}
    assert names == {"table2/table2.md", "table2/table2.csv", "table2/table2.tex", "table2/table2.png",
                     "table2/table2_table.json"}
    grid = json.loads(Path(c.download_artifacts(parent, "table2/table2_table.json", str(tmp_path))).read_text())
    rows = {(r["method"], r["class"]): r for r in (dict(zip(grid["columns"], d)) for d in grid["data"])}
    assert rows[("unet", "Average")]["mean"] == 60.0 and rows[("unet", "Average")]["n"] == 2
    with pytest.raises(RunnerError, match="no MLflow experiment 'nope'.*experiments: .*abl"):
        table_from_mlflow("nope", s)



# ---------------------------------------------------------------- the one tracker: Tracker.run_phase, PhaseRecorder
DSC = {"Average": 0.5, "Epithelial": 0.4, "Lymphocyte": 0.6, "Macrophage": 0.3, "Neutrophil": 0.7}


def _cfg(epochs: int = 2):
    return types.SimpleNamespace(train=types.SimpleNamespace(epochs=epochs), to_dict=lambda: {"train": {"lr": 0.001}})


def _result(tmp: Path):
    (tmp / "metrics.json").write_text("{}")
    return types.SimpleNamespace(test={"dsc": DSC}, best_epoch=1, metrics_path=tmp / "metrics.json",
                                 checkpoint_path=tmp / "none.pt",
                                 history=[{"epoch": 0, "train_loss": 1.0}, {"epoch": 1, "train_loss": 0.5, "val_dsc": 0.4}])


class FakeTrain:
    """``run_train`` stand-in: runs two epochs through the callbacks, or (``stored``) returns a stored result
    without calling any, as the engine does when ``result.json`` exists; ``crash`` raises in epoch 1."""

    def __init__(self, tmp: Path, stored: bool = False, crash: bool = False):
        self.tmp, self.stored, self.crash, self.calls = tmp, stored, crash, []

    def __call__(self, cfg, out_dir, callbacks=(), resume=True):
        self.calls.append(len(callbacks))
        result = _result(self.tmp)
        if self.stored:
            return result
        for cb in callbacks:
            cb.on_run_start("train", cfg, out_dir)
        for epoch, h in enumerate(result.history):
            if self.crash and epoch == 1:
                raise RuntimeError("NaN loss in train epoch 1")
            for cb in callbacks:
                cb.on_epoch_end("train", epoch, dict(h), out_dir)
        for cb in callbacks:
            cb.on_run_end("train", result)
        return result


@pytest.fixture()
def tracker(tmp_path):
    s = Settings(home=tmp_path / "home")
    t = tracking.Tracker.connect(s.tracking_uri, "abl", s.artifacts_root)
    t.open_parent("abl", "ablation", {"seeds": 1}, "name: abl\n")
    return t


def test_a_phase_is_recorded_once_and_a_finished_one_is_not_logged_again(tracker, tmp_path, monkeypatch):
    engine = FakeTrain(tmp_path)
    monkeypatch.setattr("nas_core.engine.run_train", engine)
    out = tmp_path / "train__unet__seed0"
    out.mkdir()
    rid, result = run_phase(tracker, "unet", 0, "train", _cfg(), out, log_model=False, tags={"ray_node_id": "n1"})
    run = tracker.client.get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    assert {k: run.data.tags[k] for k in ("method", "seed", "phase", "nas_scam_kind", "ray_node_id")} == {
        "method": "unet", "seed": "0", "phase": "train", "nas_scam_kind": "trial", "ray_node_id": "n1"}
    assert run.data.params == {"train.lr": "0.001"}
    assert [m.value for m in tracker.client.get_metric_history(rid, "train_loss")] == [1.0, 0.5]
    # the engine's fraction and 0-based epoch as MLflow shows them: % and 1-based
    assert run.data.metrics["test_dsc_Average"] == 50.0 and run.data.metrics["best_epoch"] == 2
    names = {a.path for a in tracker.client.list_artifacts(rid)} | {
        a.path for a in tracker.client.list_artifacts(rid, "figures")}
    assert names == {"metrics.json", "figures", "figures/learning_curve.png"}
    (record,) = results.Results(tracker.tracking_uri).records(tracker.parent_run_id, tracker.experiment_id)
    assert record.dsc["Average"] == 0.5 and record.run_id == rid
    # again (a resumed trial): the FINISHED run is found, the engine only reads its result back
    again, _ = run_phase(tracker, "unet", 0, "train", _cfg(), out, log_model=False)
    assert again == rid and engine.calls == [1, 0]
    assert len(tracker.client.get_metric_history(rid, "train_loss")) == 2


def test_a_stored_result_of_an_unfinished_run_is_still_recorded(tracker, tmp_path, monkeypatch):
    # the trial died after the engine wrote result.json but before the run was closed
    monkeypatch.setattr("nas_core.engine.run_train", FakeTrain(tmp_path, stored=True))
    rid, _ = run_phase(tracker, "unet", 1, "train", _cfg(), tmp_path, log_model=False)
    run = tracker.client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.metrics["test_dsc_Neutrophil"] == 70.0


def test_a_crash_fails_the_run_and_a_rerun_continues_it(tracker, tmp_path, monkeypatch):
    monkeypatch.setattr("nas_core.engine.run_train", FakeTrain(tmp_path, crash=True))
    with pytest.raises(RuntimeError, match="NaN loss"):
        run_phase(tracker, "unet", 2, "train", _cfg(), tmp_path, log_model=False)
    (failed,) = tracker.children(status="FAILED")
    assert failed.data.tags["error"] == "RuntimeError: NaN loss in train epoch 1"
    monkeypatch.setattr("nas_core.engine.run_train", FakeTrain(tmp_path))
    rid, _ = run_phase(tracker, "unet", 2, "train", _cfg(), tmp_path, log_model=False)
    assert rid == failed.info.run_id and tracker.client.get_run(rid).info.status == "FINISHED"


def test_a_single_pipeline_run_is_recorded_as_trials_are(home, tmp_path):
    """``run-spec`` of a pipeline in this process: a new parent (run.json) and a search and a train child,
    the train one retraining the searched genotype."""
    spec = {"kind": "pipeline", "name": "single", "method": "nas-scam-p-sync", "seed": 3, "preset": "smoke",
            "epochs": {"search": 1, "warmup": 0, "train": 2, "search_iters": 1, "train_iters": 2},
            "data": {"synthetic_images": 6, "synthetic_size": 64, "crop_size": 32, "stride": 32},
            "resources": {"cpu": 1}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert run_spec_file(path, log_model=False) == 0
    settings = get_settings()
    outcome = json.loads((settings.runs_root / "outcome.json").read_text())
    state = json.loads((settings.runs_root / "single" / "run.json").read_text())
    assert outcome["parent_run_id"] == state["parent_run_id"] and outcome["failures"] == []
    t = tracking.Tracker.attach(settings.tracking_uri, state["experiment_id"], state["parent_run_id"])
    parent = t.client.get_run(t.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["nas_scam_kind"] == "pipeline"
    stored = Path(t.client.download_artifacts(t.parent_run_id, "spec.yaml", str(tmp_path)))
    assert yaml.safe_load(stored.read_text())["method"] == "nas-scam-p-sync"
    runs = {r.data.tags["phase"]: r for r in t.children()}
    assert set(runs) == {"search", "train"}
    for phase, run in runs.items():
        assert run.info.status == "FINISHED" and run.info.run_id == outcome["phases"][phase]["run_id"]
        assert (run.data.tags["method"], run.data.tags["seed"]) == ("nas-scam-p-sync", "3")
        assert run.data.params["seed"] == "3"
        assert "figures/learning_curve.png" in {a.path for a in t.client.list_artifacts(run.info.run_id, "figures")}
    assert [m.step for m in t.client.get_metric_history(runs["train"].info.run_id, "train_loss")] == [1, 2]
    genotype = json.loads(runs["search"].data.params["genotype"])
    searched = Path(outcome["phases"]["search"]["out_dir"], "genotype.json")
    assert json.loads(searched.read_text()) == genotype
    assert runs["train"].data.params["model.genotype"] == str(searched)
    stored = json.loads((Path(outcome["phases"]["train"]["out_dir"]) / "result.json").read_text())
    assert runs["train"].data.metrics["test_dsc_Average"] == round(100 * stored["test"]["dsc"]["Average"], 2)
    # the figures the phase handed the recorder: kept in the run folder too
    search_figs = {a.path for a in t.client.list_artifacts(runs["search"].info.run_id, "figures")}
    assert {"figures/genotype_cells.png", "figures/alpha_summary.png"} <= search_figs
    assert (Path(outcome["phases"]["search"]["out_dir"]) / "figures" / "alpha_summary.png").is_file()
    assert "figures/genotype_cells.png" in {a.path for a in t.client.list_artifacts(runs["train"].info.run_id,
                                                                                   "figures")}
    assert results.Results(t.tracking_uri).records(t.parent_run_id, t.experiment_id)[0].seed == 3


def test_the_printed_mlflow_link_is_the_server_in_use_or_how_to_start_one():
    from orchestrator.commands.ablate import mlflow_line

    served = mlflow_line("t2", "http://mlflow-host:5000/", "3", "abc123")
    assert served.endswith("http://mlflow-host:5000/#/experiments/3/runs/abc123?workflowType=machine_learning")
    local = mlflow_line("t2", "sqlite:////home/u/.nas-scam/mlflow/mlflow.db", "3", "abc123")
    assert "run `nas-scam ui`" in local and "sqlite:////home/u/.nas-scam/mlflow/mlflow.db" in local
    assert local.endswith("http://127.0.0.1:5000/#/experiments/3/runs/abc123?workflowType=machine_learning")
