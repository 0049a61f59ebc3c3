"""MLflow as its users expect: the model-training view, Table 2 on the parent, registered models that load."""
import mlflow
import numpy as np
import pytest
import torch

from nas_core.engine.checkpoint import save_checkpoint
from nas_core.models import create_model
from orchestrator import tables, tracking
from orchestrator.settings import Settings


@pytest.fixture()
def store(tmp_path):
    s = Settings(home=tmp_path / "home")
    c = tracking.client(s.tracking_uri)
    return s, c, tracking.ensure_experiment(c, "abl", s.artifacts_root)


def test_experiments_open_in_the_model_training_view(store):
    s, c, exp = store
    assert c.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment made before the tag existed gets it when an ablation uses it again
    old = c.create_experiment("old")
    tracking.ensure_experiment(c, "old", s.artifacts_root)
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_parent_run_carries_table2_as_metrics(store):
    s, c, exp = store
    t = tracking.Tracker(c, exp)
    parent = t.open_parent("abl", "ablation", {"seeds": 2}, "name: abl\n")
    records = [{"method": "unet", "seed": seed, **{cls: v + seed / 10 for cls, v in zip(tables.CLASSES, (.5, .6, .7, .2, .3))}}
               for seed in (0, 1)]
    t.log_table_metrics(parent, tables.compare(tables.summarize(records)))
    m = c.get_run(parent).data.metrics
    assert m["avg_dsc/unet"] == pytest.approx(55.0)
    assert m["dsc/Macrophage/unet"] == pytest.approx(25.0)
    assert m["std_avg_dsc/unet"] == pytest.approx(np.std([50.0, 60.0], ddof=0))  # population std, the default
    assert len([k for k in m if k.endswith("/unet")]) == 2 * len(tables.CLASSES)


def test_best_model_is_registered_and_loads_as_a_working_model(store, tmp_path):
    s, c, exp = store
    t = tracking.Tracker(c, exp)
    t.open_parent("abl", "ablation", {"seeds": 1}, "name: abl\n")
    rid, _ = t.child("cbam", 3, "train", "train__cbam__seed3")
    model = create_model("cbam").eval()
    ck = save_checkpoint(tmp_path / "best.pt", model=model, config={"data": {"crop_size": 32}}, phase="train",
                         epoch=0)
    t.log_model(rid, ck)
    assert c.get_run(rid).info.status == "RUNNING"  # the caller's finish() ends it, once

    versions = c.search_model_versions("name = 'nas-scam-cbam'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["method"] == "cbam" and versions[0].tags["seed"] == "3"
    assert versions[0].run_id == rid
    uri = "models:/nas-scam-cbam/1"
    info = mlflow.models.get_model_info(uri)
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, -1, -1]
    assert list(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 4, -1, -1]
    assert info.saved_input_example_info is not None

    loaded = mlflow.pytorch.load_model(uri)
    x = torch.rand(3, 3, 48, 64)  # another batch size and image size than the example's
    with torch.no_grad():
        y, want = loaded(x), model(x)
    assert y.shape == (3, 4, 48, 64)
    torch.testing.assert_close(y, want)
    assert tracking.registered_name("nas-scam-p-sync") == "nas-scam-p-sync"
    assert tracking.registered_name("unet") == "nas-scam-unet"
