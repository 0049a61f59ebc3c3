"""One unit per number on every surface: DSC in % with 2 decimals and 1-based epochs on the console, in
MLflow (child metrics and steps, parent metrics, registry tags), in the tables and in the report, all
from the same retrain; the engine's files keep fractions and 0-based epochs (``orchestrator.units``)."""
import json
import math
import re

import pytest

from orchestrator import results, tables, tracking, units
from orchestrator.progress import Progress
from orchestrator.report import write_report
from orchestrator.runner import publish_table, run_spec_file
from orchestrator.settings import get_settings


@pytest.mark.parametrize("key, fraction", [("val_dsc", True), ("test_dsc_per_image_Average", True),
                                           ("dsc/Epithelial", True), ("best_pq_Average", True),
                                           ("test_pixel_accuracy", True), ("train_loss", False), ("lr", False),
                                           ("best_epoch", False), ("skipped_steps", False), ("lr_alpha", False)])
def test_which_keys_are_fractions(key, fraction):
    assert units.is_fraction(key) is fraction
    assert units.shown(key, 0.123456) == (12.35 if fraction else 0.123456)


def test_percent_tree_converts_scores_under_fraction_keys_only():
    tree = {"dsc": {"Average": 0.25, "Epithelial": float("nan")}, "n_images": 3, "best_epoch": 0,
            "images": [{"id": "a", "dsc_Average": 0.5, "pred_Epithelial": 7}], "pixel_accuracy": 0.9}
    out = units.percent_tree(tree)
    assert out["dsc"]["Average"] == 25.0 and math.isnan(out["dsc"]["Epithelial"])
    assert out["n_images"] == 3 and out["best_epoch"] == 1 and out["pixel_accuracy"] == 90.0
    assert out["images"] == [{"id": "a", "dsc_Average": 50.0, "pred_Epithelial": 7}]


@pytest.mark.slow  # a real 3-epoch train recorded in MLflow with its model registered (~40 s on 2 cores)
def test_the_same_retrain_reads_in_percent_and_1_based_epochs_on_every_surface(home, tmp_path, capsys):
    spec = {"kind": "train", "name": "units", "method": "unet", "seed": 0, "preset": "smoke",
            "epochs": {"train": 3, "train_iters": 2},
            "data": {"synthetic_images": 6, "synthetic_size": 64, "crop_size": 32, "stride": 32},
            "overrides": {"train.val_every": 1}, "resources": {"cpu": 1}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert run_spec_file(path, log_model=True) == 0
    settings = get_settings()
    state = json.loads((settings.runs_root / "units" / "run.json").read_text())
    folder = settings.runs_root / "units" / "train__unet__seed0"
    stored = json.loads((folder / "result.json").read_text())
    # the engine's file: fractions, 0-based epochs
    frac = stored["test"]["dsc"]
    assert all(0 <= v <= 1 for v in frac.values() if v is not None) and stored["best_epoch"] in (0, 1, 2)
    pct = {c: round(100 * frac[c], 2) for c in tables.CLASSES}
    best1 = stored["best_epoch"] + 1

    # MLflow child: % with 2 decimals, best_epoch and steps 1-based, the unit tag, lr and source tags
    t = tracking.Tracker.attach(settings.tracking_uri, state["experiment_id"], state["parent_run_id"])
    (child,) = t.children(phase="train")
    m = child.data.metrics
    assert {c: m[f"test_dsc_{c}"] for c in tables.CLASSES} == pct
    assert m["best_epoch"] == best1 and child.data.tags[tracking.T_UNIT] == tracking.UNIT
    val = t.client.get_metric_history(child.info.run_id, "val_dsc")
    assert [v.step for v in val] == [1, 2, 3]
    assert [v.value for v in val] == [round(100 * h["val_dsc"], 2) for h in stored["history"]]
    assert [v.value for v in t.client.get_metric_history(child.info.run_id, "lr")] == [stored["history"][0]["lr"]] * 3
    assert child.data.tags[tracking.T_SOURCE_NAME].startswith(("nas-scam", "python", "pytest"))
    assert child.data.tags[tracking.T_VERSION] and re.fullmatch(r"[0-9a-f]{40}", child.data.tags[tracking.T_GIT_COMMIT])
    assert any(k.startswith("system/") for k in m)  # MLflow's system metrics, at least the last sample
    assert not [k for k in m if re.search(r"_(rq|sq)_", k)]
    # the registry: the version's tag in %, the model logged under the project's name
    (version,) = t.client.search_model_versions("name = 'nas-scam-unet'")
    assert float(version.tags["test_dsc_Average"]) == pct["Average"] and version.tags[tracking.T_UNIT] == "percent"
    (model,) = t.client.search_logged_models(experiment_ids=[t.experiment_id],
                                             filter_string=f"source_run_id = '{child.info.run_id}'")
    assert model.name == "nas-scam-unet-seed0"
    assert model.tags[tracking.T_SOURCE_NAME] == child.data.tags[tracking.T_SOURCE_NAME]

    # the read model gives fractions to Table 2, which prints % with 2 decimals; the parent's metrics agree
    (record,) = results.Results(settings.tracking_uri).records(t.parent_run_id, t.experiment_id)
    assert record.dsc == pytest.approx({c: pct[c] / 100 for c in tables.CLASSES}, abs=1e-9)
    outcome = publish_table(t, tmp_path / "table2", title="Table 2 (units)", std="population", repeat="retrain")
    row = outcome.text.splitlines()[3]
    assert row.split()[3] == f"{pct['Average']:.2f}"
    parent = t.client.get_run(t.parent_run_id).data.metrics
    assert parent["avg_dsc/unet"] == pct["Average"] and parent["dsc/Epithelial/unet"] == pct["Epithelial"]
    assert t.client.get_registered_model("nas-scam-unet").aliases == {"best-units": version.version}

    # the report: the same numbers and the same 1-based best epoch
    report = write_report(settings.runs_root / "units", tmp_path / "report")
    assert f"{pct['Average']:.2f}" in report.markdown
    (row,) = [ln for ln in report.markdown.splitlines() if ln.startswith("| unet__seed0 |")]
    assert row.split("|")[-3:-1] == [f" {best1} ", f" {pct['Average']:.2f} "]

    # the console's epoch line: the same validation DSC, with its unit
    line = Progress(1, 1, "t", clock=lambda: 0.0).trial_result(
        "train__unet__seed0", {"phase": "train", "epoch": 0, "epochs": 3, **stored["history"][0]})
    assert f"val DSC {100 * stored['history'][0]['val_dsc']:.2f}%" in line and "epoch 1/3" in line
