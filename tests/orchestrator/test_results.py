"""The read model (``orchestrator.results``): plain dataclasses out of a real sqlite store in tmp_path (no
Ray); ``table2`` is the one Table 2 pipeline and prints what it printed before; MLflow's objects stay in
the recorder and the read model (the code is read with ``ast``)."""
import ast
import dataclasses
import json
import types
from pathlib import Path

import pytest

from orchestrator import results, tables, tracking
from orchestrator.runner import publish_table
from orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden" / "table2"
CLASSES = ("Average", "Epithelial", "Lymphocyte", "Macrophage", "Neutrophil")
# (method, seed) -> test DSC per class; cbam's one retrain did not learn, its second is missing
VALUES = {("unet", 0): (0.61, 0.70, 0.55, 0.40, 0.30), ("unet", 1): (0.63, 0.72, 0.50, 0.45, 0.33),
          ("cbam", 0): (0.0, 0.0, 0.0, 0.0, 0.0),
          ("nas-scam-p-sync", 0): (0.66, 0.75, 0.58, 0.49, 0.41),
          ("nas-scam-p-sync", 1): (0.64, 0.71, 0.61, 0.44, 0.39)}
EXPECTED = {("", "unet"): 2, ("", "cbam"): 2, ("", "nas-scam-p-sync"): 2}
GENOTYPE = {"version": 1, "combine": "parallel", "sam": [["conv3"]] * 8}
SPEC = {"kind": "ablation", "name": "golden", "methods": ["unet", "cbam", "nas-scam-p-sync"], "seeds": 2,
        "std": "population", "repeat": "retrain"}


def _train_result(dsc: dict, tmp: Path):
    return types.SimpleNamespace(test={"dsc": dsc, "pq": {}, "dsc_per_image": {}}, best_epoch=0, metrics_path=None,
                                 checkpoint_path=tmp / "none.pt")


@pytest.fixture()
def store(tmp_path):
    """An ablation as the recorder writes it: parent (spec params and spec.yaml), one finished search with
    its genotype, five finished retrains (one flagged "no learning", one with a checkpoint), a failed one."""
    s = Settings(home=tmp_path / "home")
    tracking.check_tracking_uri(s.tracking_uri)
    t = tracking.Tracker.connect(s.tracking_uri, "golden", s.artifacts_root)
    t.open_parent("golden", "ablation", {"std": "population", "repeat": "retrain"}, json.dumps(SPEC))
    search, _ = t.child("nas-scam-p-sync", 0, "search", "search__nas-scam-p-sync__seed0")
    t.client.log_dict(search, GENOTYPE, "genotype.json")
    t.finish(search)
    ids = {}
    for (method, seed), values in VALUES.items():
        rid, _ = t.child(method, seed, "train", f"train__{method}__seed{seed}")
        t.log_train_result(rid, _train_result(dict(zip(CLASSES, values)), tmp_path), log_model=False)
        if method == "cbam":
            t.set_tag(rid, "no_learning", "true")
        t.finish(rid)
        ids[method, seed] = rid
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"not really a checkpoint")
    t.log_files(ids["unet", 0], [ckpt], "checkpoint")
    failed, _ = t.child("cbam", 1, "train", "train__cbam__seed1")
    t.finish(failed, "FAILED")
    return s, t, ids


def test_table2_text_and_files_are_what_they_were(store, tmp_path):
    """The published Table 2 (text, md, csv, tex) equals the files the four copies of the pipeline wrote
    before it became ``results.table2`` (tests/orchestrator/golden/table2, made by the old runner on these records);
    the png equals the old pipeline's, drawn here."""
    s, t, _ = store
    out = publish_table(t, tmp_path / "new", title="Table 2 (golden)", std="population", repeat="retrain",
                        subtitle="sub", expected=EXPECTED)
    assert out.text == (GOLDEN / "table2.txt").read_text()
    for name in ("table2.md", "table2.csv", "table2.tex"):
        assert out.paths[name.split(".")[1]].read_text() == (GOLDEN / name).read_text(), name
    records = results.rows(results.Results(s.tracking_uri).records(t.parent_run_id, t.experiment_id))
    old = tables.with_missing(tables.with_flags(tables.compare(tables.summarize(records, "population")), records),
                              EXPECTED)
    paths = tables.write_all(old, tmp_path / "old", "Table 2 (golden)", "population", "retrain", "sub", records)
    assert paths["png"].read_bytes() == out.paths["png"].read_bytes()
    assert old.equals(out.table)


def test_the_read_model_returns_plain_dataclasses(store, tmp_path):
    s, t, ids = store
    r = results.Results(s.tracking_uri)
    assert {e.name for e in r.experiments()} == {"golden", "Default"}  # MLflow makes "Default" itself
    (parent,) = r.runs()
    assert r.runs(experiment="golden") == [parent] and r.runs(kind="hpo") == [] and r.runs(experiment="nope") == []
    assert (parent.run_id, parent.kind, parent.experiment, parent.status) == (t.parent_run_id, "ablation", "golden",
                                                                              "RUNNING")
    assert (parent.std, parent.repeat) == ("population", "retrain") and parent.start_time > 1e9
    assert r.run(t.parent_run_id) == parent and r.run("0" * 32) is None
    assert r.latest_run(t.experiment_id).run_id == parent.run_id
    assert r.spec(parent.run_id) == SPEC
    kids = r.children(parent.run_id, parent.experiment_id)
    assert len(kids) == 7 and {k.parent_run_id for k in kids} == {parent.run_id}
    assert {(k.method, k.seed, k.phase, k.status) for k in kids} >= {("cbam", 1, "train", "FAILED"),
                                                                    ("unet", 0, "train", "FINISHED")}
    records = r.records(parent.run_id, parent.experiment_id)
    assert sorted((x.method, x.seed) for x in records) == sorted(VALUES)
    unet0 = next(x for x in records if (x.method, x.seed) == ("unet", 0))
    assert unet0 == results.Record("unet", 0, dict(zip(CLASSES, VALUES["unet", 0])), run_id=ids["unet", 0])
    assert [x.no_learning for x in records if x.method == "cbam"] == [True]
    assert unet0.row() == {"method": "unet", "seed": 0, "draw": None, "fold": None, "variant": "",
                           **dict(zip(CLASSES, VALUES["unet", 0])), "no_learning": False}
    (geno,) = r.genotypes(parent.run_id, parent.experiment_id)
    assert (geno.method, geno.seed, geno.genotype) == ("nas-scam-p-sync", 0, GENOTYPE)
    # a model id: a parent means its first finished retrain; a retrain means itself
    assert r.model_run(parent.run_id).phase == "train"
    assert r.model_run(ids["unet", 0]).run_id == ids["unet", 0]
    path = r.checkpoint(ids["unet", 0], tmp_path / "cache")
    assert path.name == "best.pt" and path.read_bytes() == b"not really a checkpoint"
    with pytest.raises(results.NotFound, match="logged no checkpoint"):
        r.checkpoint(ids["unet", 1], tmp_path / "cache2")
    with pytest.raises(results.NotFound, match="no MLflow run"):
        r.checkpoint("0" * 32, tmp_path / "cache3")
    # plain values: nothing of MLflow's leaves the read model
    for value in (parent, unet0, geno, r.experiments()[0]):
        assert dataclasses.is_dataclass(value)
        for f in dataclasses.fields(value):
            assert "mlflow" not in type(getattr(value, f.name)).__module__, f.name


def test_grid_tags_reach_the_records(store):
    s, t, _ = store
    rid, _ = t.child("unet", 2, "train", "train__unet__seed2__draw1__fold0__lr")
    for key, value in ((tracking.T_DRAW, "1"), (tracking.T_FOLD, "0"), (tracking.T_VARIANT, "lr")):
        t.set_tag(rid, key, value)
    t.log_train_result(rid, _train_result(dict.fromkeys(CLASSES, 0.5), Path(".")), log_model=False)
    t.finish(rid)
    records = results.Results(s.tracking_uri).records(t.parent_run_id, t.experiment_id)
    (grid,) = [x for x in records if x.seed == 2]
    assert (grid.draw, grid.fold, grid.variant) == (1, 0, "lr")


def test_a_run_recorded_in_fractions_reads_in_percent_and_its_records_in_fractions(store):
    """A child logged before ``dsc_unit = percent`` (fractions, 0-based best epoch) reads like a new one."""
    s, t, _ = store
    rid, _ = t.child("unet", 3, "train", "train__unet__seed3")
    t.client.delete_tag(rid, tracking.T_UNIT)  # as the recorder left it before the unit existed
    for cls in CLASSES:
        t.client.log_metric(rid, f"test_dsc_{cls}", 0.4321)
    t.client.log_metric(rid, "best_epoch", 2)
    t.client.log_metric(rid, "train_loss", 0.75)
    t.finish(rid)
    r = results.Results(s.tracking_uri)
    (old,) = [x for x in r.children(t.parent_run_id, t.experiment_id) if x.run_id == rid]
    assert old.metrics["test_dsc_Average"] == 43.21 and old.metrics["best_epoch"] == 3
    assert old.metrics["train_loss"] == 0.75
    (record,) = [x for x in r.records(t.parent_run_id, t.experiment_id) if x.seed == 3]
    assert record.dsc["Average"] == pytest.approx(0.4321)
    # a new one: stored in %, read as stored; its record in fractions, as Table 2 takes them
    (new,) = [x for x in r.records(t.parent_run_id, t.experiment_id) if (x.method, x.seed) == ("unet", 0)]
    assert new.dsc["Average"] == pytest.approx(0.61)


def test_searches_page_through_every_child(store, monkeypatch):
    s, t, ids = store
    monkeypatch.setattr(tracking, "SEARCH_PAGE", 2)
    everyone = {rid for rid in ids.values()}
    assert {x.run_id for x in results.Results(s.tracking_uri).children(t.parent_run_id, t.experiment_id,
                                                                       phase="train", status="FINISHED")} == everyone
    assert len(results.Results(s.tracking_uri)._search([t.experiment_id], max_results=3)) == 3
    assert {x.info.run_id for x in t.children(phase="train", status="FINISHED")} == everyone


def test_a_grid_search_names_its_fold_and_variant(store):
    s, t, _ = store
    rid, _ = t.child("nas-scam-p-sync", 0, "search", "search__nas-scam-p-sync__seed0__fold1__lr")
    t.set_tag(rid, tracking.T_FOLD, "1")
    t.set_tag(rid, tracking.T_VARIANT, "lr")
    t.client.log_dict(rid, GENOTYPE, "genotype.json")
    t.finish(rid)
    found = results.Results(s.tracking_uri).genotypes(t.parent_run_id, t.experiment_id)
    assert sorted(((g.fold, g.variant) for g in found), key=str) == [(1, "lr"), (None, "")]


def test_the_recorder_only_records():
    """tracking.py draws no figure and runs no engine: phases.run_phase decides and hands figures in."""
    tree = ast.parse((ROOT / "orchestrator" / "tracking.py").read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    modules |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not {"orchestrator.figures", "orchestrator.curves", "nas_core.engine"} & modules
    assert not hasattr(tracking.Tracker, "run_phase")


def test_a_store_that_does_not_exist_reads_as_empty_and_is_not_created(tmp_path):
    db = tmp_path / "none" / "mlflow.db"
    r = results.Results(f"sqlite:///{db}")
    assert r.experiments() == [] and r.runs() == [] and r.run("0" * 32) is None and r.experiment("x") is None
    assert not db.exists()


def test_std_and_expected_phases_come_from_the_spec():
    assert results.std_of({}) == results.LEGACY_STD == "sample"
    assert results.std_of({"std": "population"}) == "population"
    # the plan's count: one search (repeat retrain) + 2 seeds x 2 methods
    spec = {"kind": "ablation", "name": "x", "methods": ["unet", "nas-scam-p-sync"], "seeds": 2, "preset": "smoke"}
    assert results.expected_phases(spec) == 5
    assert results.expected_phases({"kind": "hpo", "num_samples": 3}) == 3
    assert results.expected_phases({"kind": "pipeline"}) == 2
    # a stored spec that no longer parses is counted as it was counted (without repeat: a search per seed)
    assert results.expected_phases({**spec, "bogus": 1}) == 6
    assert results.expected_phases({**spec, "bogus": 1, "repeat": "retrain"}) == 5


# ---------------------------------------------------------------- the code, read
# MLflow objects are handled only in the recorder and the read model
OWNERS = {"orchestrator/tracking.py", "orchestrator/results.py"}
PACKAGES = ("api", "orchestrator", "nas_core", "nas_scam", "bench")
# what only an MLflow client does (called as a method on anything)
CLIENT_CALLS = {"download_artifacts", "list_artifacts", "search_runs", "get_run", "search_experiments",
                "get_experiment", "get_experiment_by_name", "set_terminated", "log_batch", "create_run",
                "get_metric_history", "search_logged_models", "search_model_versions", "delete_tag",
                "update_run", "restore_experiment", "create_experiment"}
RUN_INFO = {"run_id", "run_name", "status", "experiment_id", "start_time", "end_time", "artifact_uri",
            "lifecycle_stage"}
RUN_DATA = {"tags", "params", "metrics"}


def _sources():
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            yield f.relative_to(ROOT).as_posix(), ast.parse(f.read_text(), str(f))


def _mlflow_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every MLflow object this module handles."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.startswith("mlflow.")]
        elif isinstance(node, ast.Name) and node.id == "MlflowClient":
            found.append((node.lineno, "MlflowClient"))
        elif isinstance(node, ast.Attribute):
            value = node.value
            if isinstance(value, ast.Name) and value.id == "mlflow" and not node.attr.startswith("__"):
                found.append((node.lineno, f"mlflow.{node.attr}"))  # the fluent API (a bare import is fine)
            elif node.attr == "client" and not (isinstance(value, ast.Name) and value.id == "self"):
                found.append((node.lineno, f"{ast.unparse(node)} (the tracking client)"))
            elif isinstance(value, ast.Attribute) and ((value.attr == "info" and node.attr in RUN_INFO)
                                                        or (value.attr == "data" and node.attr in RUN_DATA)):
                found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in CLIENT_CALLS):
            found.append((node.lineno, f"{ast.unparse(node.func)}()"))
    return found


def test_mlflow_objects_stay_in_the_recorder_and_the_read_model():
    bad = [f"{path}:{line}: {what}" for path, tree in _sources() if path not in OWNERS
           for line, what in _mlflow_uses(tree)]
    assert not bad, "MLflow handled outside orchestrator/tracking.py and results.py:\n" + "\n".join(bad)


def test_the_scan_sees_what_it_forbids():
    code = ("from mlflow.tracking import MlflowClient\nc = tracking.client(uri)\nr = c.get_run(i)\n"
            "s = r.info.status\nt = r.data.tags\nc.download_artifacts(i, 'x', d)\nmlflow.start_run()\n"
            "tracker.client.set_tag(i, 'k', 'v')\n")
    assert {line for line, _ in _mlflow_uses(ast.parse(code))} == set(range(1, 9))
    assert _mlflow_uses(ast.parse("import mlflow\nv = mlflow.__version__\nself.client = c\ninfo.status\n")) == []


def test_the_table2_pipeline_exists_once():
    """``tables.compare`` and ``tables.with_flags`` are called in ``results.table2`` only; the runner,
    rescore, report and the API call ``table2``."""
    callers: dict[str, set[str]] = {}
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value).split(".")[-1]
                callers.setdefault(f"{owner}.{node.func.attr}", set()).add(path)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("tables"):
                assert not {a.name for a in node.names} & {"compare", "with_flags"}, path
    assert callers["tables.compare"] == callers["tables.with_flags"] == {"orchestrator/results.py"}
    assert {"orchestrator/runner.py", "orchestrator/rescore.py", "orchestrator/report.py",
            "api/results.py"} <= callers["results.table2"]
