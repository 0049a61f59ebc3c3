"""The ablation grid beyond methods x seeds: random-architecture controls, factor axes, patient folds."""

import json
from pathlib import Path

import numpy as np
import pytest

from nas_core.config import ConfigError, load_config
from nas_core.data.prepare import assign_splits, fold_groups
from nas_core.search_space.genotype import N_SLOTS, Genotype
from nas_core.search_space.ops import OP_TABLES
from orchestrator import plan, tables
from orchestrator.specs import METHODS, SpecError, parse_run_name, parse_spec, run_name
from orchestrator.trials import draw_genotype, identity_tags


# ---------------------------------------------------------------- random controls
@pytest.mark.parametrize("search", ["synchronous", "shared"])
def test_random_genotype_is_valid_seeded_and_differs_across_seeds(search):
    a, again, b = (Genotype.random("parallel", search, s) for s in (0, 0, 1))
    assert a == again and a != b
    assert Genotype.from_json(a.to_json()) == a  # a valid public genotype
    if search == "shared":
        assert len(set(a.sam)) == 1 and len(set(a.cam)) == 1  # one draw for every slot
    else:
        assert len(set(a.sam)) > 1  # each slot its own draw


def test_random_genotype_draws_every_op_about_uniformly():
    counts = {kind: dict.fromkeys(OP_TABLES[kind], 0) for kind in ("sam", "cam")}
    for seed in range(200):
        g = Genotype.random("serial", "synchronous", seed)
        for kind in ("sam", "cam"):
            for slot in getattr(g, kind):
                for op in slot:
                    counts[kind][op] += 1
    for kind, c in counts.items():
        n = sum(c.values())
        expected = n / len(c)
        assert n == 200 * N_SLOTS * 6
        assert all(abs(v - expected) < 0.1 * expected for v in c.values()), (kind, c)  # Zero included


def test_random_controls_pair_with_their_searched_variant():
    controls = [m for m in METHODS.values() if m.control_of]
    assert {m.id for m in controls} == {"random-s-shared", "random-p-shared", "random-s-sync", "random-p-sync"}
    for m in controls:
        searched = METHODS[m.control_of]
        assert (m.model, m.search) == (searched.model, searched.search)
        assert not m.needs_search and m.draws_genotype
    assert "random-p-sync" not in parse_spec({}).methods  # the paper's 8 rows by default


def test_random_control_trials_draw_per_seed_and_draw(tmp_path):
    spec = parse_spec({"preset": "smoke", "methods": ["random-p-sync"], "seeds": 2, "random_draws": 3})
    trials = plan.expand(spec, tmp_path)
    assert [t.stage for t in trials] == ["train"] * 6  # no search
    runs = [t.runs[0] for t in trials]
    assert [r.name for r in runs][:3] == [run_name("train", "random-p-sync", 0, draw=d) for d in range(3)]
    assert len({r.genotype_draw for r in runs}) == 6
    paths = [Path(r.config["model"]["genotype"]) for r in runs]
    assert all(p == tmp_path / r.name / "genotype.json" for p, r in zip(paths, runs))
    g = Genotype.load(draw_genotype("random-p-sync", runs[1].genotype_draw, paths[1]))
    assert (g.combine, g.search) == ("parallel", "synchronous")
    # a retried trial finds the same draw; a file torn by a worker killed mid-write is written again
    assert Genotype.load(draw_genotype("random-p-sync", runs[1].genotype_draw, paths[1])) == g
    paths[1].write_text('{"format": 1, "comb')
    assert Genotype.load(draw_genotype("random-p-sync", runs[1].genotype_draw, paths[1])) == g
    assert identity_tags(runs[1].__dict__)["draw"] == "1"


def test_random_control_is_no_single_run_search():
    with pytest.raises(SpecError, match="random control"):
        parse_spec({"kind": "search", "method": "random-p-sync", "preset": "smoke"})


# ---------------------------------------------------------------- axes
def test_axes_expand_into_variants_with_shared_searches(tmp_path):
    spec = parse_spec({"preset": "smoke", "methods": ["unet", "nas-scam-p-sync"], "seeds": 2,
                       "axes": {"train.lr": [1.0e-4, 1.0e-3], "data.stain": ["none", "reinhard"]}})
    assert [v for v, _ in spec.variants] == [
        "train.lr=0.0001+data.stain=none", "train.lr=0.0001+data.stain=reinhard",
        "train.lr=0.001+data.stain=none", "train.lr=0.001+data.stain=reinhard"]
    trials = plan.expand(spec, tmp_path)
    searches = [t for t in trials if t.stage == "search"]
    # train.lr never reaches a search: one search per stain value, shared by both learning rates
    assert sorted(t.name for t in searches) == ["search__nas-scam-p-sync__seed0__data.stain=none",
                                                "search__nas-scam-p-sync__seed0__data.stain=reinhard"]
    trains = [t for t in trials if t.stage == "train"]
    assert len(trains) == 2 * 2 * 4
    for t in trains:
        r = t.runs[0]
        assert r.config["train"]["lr"] == r.axes["train.lr"] and r.config["data"]["stain"] == r.axes["data.stain"]
        assert parse_run_name(r.name).variant == r.variant
        if t.method == "nas-scam-p-sync":
            stain = r.axes["data.stain"]
            assert t.carry == f"search__nas-scam-p-sync__seed0__data.stain={stain}"
    tags = identity_tags(trains[-1].runs[0].__dict__)
    assert tags["axis.train.lr"] == "0.001" and tags["variant"] == trains[-1].variant


@pytest.mark.parametrize("axes, words", [
    ({"seed": [1, 2]}, "not an axis"),
    ({"model.genotype": ["/etc/passwd"]}, "not an axis"),
    ({"data.fold": [0, 1]}, "not an axis"),
    ({"train.lr": [1.0e-3, 1.0e-3]}, "distinct"),
    # run folders named by case alone collide on a case-insensitive disk (macOS, Windows shares)
    ({"data.source": ["/data/MoNuSAC", "/data/monusac"]}, "ignoring letter case"),
    ({"train.lr": []}, "1 to 16 values"),
    ({"train.lrr": [1.0e-3]}, "unknown config key"),
    ({"data.stain": ["none", "bogus"]}, "bogus"),
    ({f"train.k{i}": [1] for i in range(5)}, "at most 4"),
])
def test_bad_axes_are_refused_naming_the_axis(axes, words):
    with pytest.raises(SpecError, match=words):
        parse_spec({"preset": "smoke", "methods": ["unet"], "axes": axes})


def test_trial_count_bounds_the_grid():
    spec = parse_spec({"preset": "smoke", "methods": ["unet", "nas-scam-p-sync", "random-p-sync"], "seeds": 2,
                       "random_draws": 2, "axes": {"train.lr": [1.0e-4, 1.0e-3]},
                       "data": {"folds": 2, "split_by": "patient"}})
    n = sum(len(t.runs) for t in plan.expand(spec, Path("/r")))
    assert n <= spec.trial_count == (1 + 1 + 2) * 2 * 2 * 2 + 1 * 2 * 2


# ---------------------------------------------------------------- folds
def test_folds_test_every_patient_once_and_never_leak():
    patients = [f"P{i // 3}" for i in range(36)] + ["P99"]  # 13 patients, one with a single image
    ids = [f"img{i}" for i in range(len(patients))]
    groups = fold_groups(patients, 4, seed=0)
    assert sorted(p for g in groups for p in g) == sorted(set(patients))
    tested = []
    for k in range(4):
        splits = assign_splits(ids, patients, "8,1,3", "patient", seed=0, folds=4, fold=k)
        by = {s: {p for p, sp in zip(patients, splits) if sp == s} for s in ("train", "val", "test")}
        assert by["test"] == set(groups[k])
        assert not (by["test"] & by["train"]) and not (by["test"] & by["val"]) and not (by["train"] & by["val"])
        assert len(by["val"]) >= 1 and by["train"]
        tested += sorted(by["test"])
    assert sorted(tested) == sorted(set(patients))  # every patient tested exactly once


def test_folds_need_patient_split_and_a_valid_index():
    with pytest.raises(ConfigError, match="split_by"):
        load_config(overrides=["data.folds=3"])
    with pytest.raises(ConfigError, match="data.fold must be in 0..2"):
        load_config(overrides=["data.folds=3", "data.split_by=patient", "data.fold=3"])
    with pytest.raises(ValueError, match="only 2 patients"):
        fold_groups(["a", "a", "b"], 3, 0)


def test_fold_grid_gives_each_trial_its_fold(tmp_path):
    spec = parse_spec({"preset": "smoke", "methods": ["unet", "nas-scam-s-shared"], "seeds": 1,
                       "data": {"folds": 3, "split_by": "patient"}})
    trials = plan.expand(spec, tmp_path)
    searches = [t for t in trials if t.stage == "search"]
    assert [t.runs[0].config["data"]["fold"] for t in searches] == [0, 1, 2]  # a search per fold
    for t in trials:
        assert all(r.config["data"]["fold"] == t.fold for r in t.runs)
        if t.carry:
            assert parse_run_name(t.carry).fold == t.fold  # a retrain reads its own fold's search


# ---------------------------------------------------------------- the table
def _rec(method, seed, avg, **extra):
    return {"method": method, "seed": seed, "Average": avg, "Epithelial": avg, "Lymphocyte": avg,
            "Macrophage": avg, "Neutrophil": avg, **extra}


def test_table_averages_folds_within_a_seed_and_groups_by_variant():
    recs = [_rec("unet", s, 0.1 * (f + 1) + 0.01 * s, fold=f, variant=v) for s in (0, 1) for f in (0, 1)
            for v in ("a", "b")]
    recs += [_rec("random-p-sync", 0, 0.2 + 0.1 * d, draw=d) for d in range(3)]
    t = tables.summarize(recs)
    row = t[(t.variant == "a") & (t.method == "unet") & (t["class"] == "Average")].iloc[0]
    assert row["mean"] == pytest.approx(100 * np.mean([0.15, 0.16])) and row["n"] == 2 and row["folds"] == 2
    assert row["std"] == pytest.approx(0.5)  # population std over the two seeds' fold means
    ctrl = t[(t.method == "random-p-sync") & (t["class"] == "Average")].iloc[0]
    assert ctrl["n"] == 3 and ctrl["mean"] == pytest.approx(30.0)  # draws are replicates
    text = tables.to_text(tables.with_flags(tables.compare(t), recs))
    assert "[a] U-Net (2 folds)" in text and "[b] U-Net (2 folds)" in text and "Random-P, synchronous" in text
    pf = tables.per_fold(recs)
    assert set(pf["fold"]) == {0, 1} and len(pf) == 2 * 2 * 5


def test_axis_flag_and_folds_by_override_reach_the_grid(tmp_path):
    from orchestrator.commands.ablate import _axes

    assert _axes(["train.lr=1e-4,1e-3", "data.stain=none,macenko"]) == {
        "train.lr": [1.0e-4, 1.0e-3], "data.stain": ["none", "macenko"]}
    with pytest.raises(ValueError, match="key.sub=value1,value2"):
        _axes(["train.lr"])
    # folds set through overrides (as --set data.folds=2 does) expand the grid like the data: shorthand
    spec = parse_spec({"preset": "smoke", "methods": ["unet"], "seeds": 1,
                       "overrides": {"data.folds": 2, "data.split_by": "patient"}})
    assert spec.folds == 2
    assert [t.fold for t in plan.expand(spec, tmp_path)] == [0, 1]


def test_a_replicate_missing_a_fold_is_marked_incomplete():
    recs = [_rec("unet", 0, v, fold=f) for f, v in ((0, 0.9), (1, 0.5), (2, 0.4))] + [_rec("unet", 1, 0.9, fold=0)]
    t = tables.summarize(recs)
    row = t[t["class"] == "Average"].iloc[0]
    assert (row["folds"], row["folds_max"]) == (1, 3)
    assert "U-Net (1-3 folds: incomplete)" in tables.to_text(tables.compare(t))


def test_a_grid_whose_run_names_would_not_fit_a_folder_is_refused():
    long = ["x" * 190 + "1,0,0", "y" * 190 + "1,0,0"]
    with pytest.raises(SpecError, match="run names up to .* bytes"):
        parse_spec({"preset": "smoke", "methods": ["unet"], "axes": {"data.split": long, "train.lr": [1e-3, 1e-4]}})
