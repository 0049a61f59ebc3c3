"""MLflow tracking against a real sqlite store in tmp_path (no Ray)."""
import socket
import types
from pathlib import Path

import pytest

from orchestrator import tracking
from orchestrator.runner import RunnerError, publish_table, table_from_mlflow
from orchestrator.settings import Settings


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
    assert [m.step for m in hist] == [0, 1, 2] and hist[-1].value == pytest.approx(0.2)
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
    assert names == {"table2/table2.md", "table2/table2.csv", "table2/table2.tex", "table2/table2.png"}
    with pytest.raises(RunnerError, match="no MLflow experiment 'nope'.*experiments: .*abl"):
        table_from_mlflow("nope", s)
