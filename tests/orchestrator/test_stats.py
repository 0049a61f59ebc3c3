"""Paired statistics (orchestrator/stats.py) and `nas-scam compare` on fabricated run folders: the bootstrap,
undefined classes, pairing by (fold, image id) across seeds, the breakdown by fold, patient and organ, and
the report's paired and breakdown tables."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from nas_core.classes import CLASS_NAMES, TABLE_ORDER
from orchestrator import cli, stats
from orchestrator.report import write_report
from orchestrator.specs import parse_run_name


def image_row(image_id, dsc, patient=None, pixels=100):
    """A per-image row as the engine writes it: ``dsc`` {class: fraction or None}; pred = gt = 100 pixels
    of each defined class, the intersection chosen to give that DSC (None: no pixel on either side)."""
    row = {"id": image_id, "patient": patient}
    for c in CLASS_NAMES:
        d = dsc.get(c)
        row[f"dsc_{c}"] = d
        n = 0 if d is None else pixels
        row.update({f"inter_{c}": int(round(n * (d or 0))), f"pred_{c}": n, f"gt_{c}": n})
    defined = [v for v in dsc.values() if v is not None]
    row["dsc_Average"] = float(np.mean(defined)) if defined else None
    return row


def write_run(root, name, rows, history=()):
    """A finished retrain folder: an (empty) best.pt and a result.json whose test holds ``rows``."""
    d = root / name
    d.mkdir(parents=True)
    (d / "best.pt").write_bytes(b"")
    dsc = {c: 0.5 for c in TABLE_ORDER}
    (d / "result.json").write_text(json.dumps({"best_epoch": 0, "history": list(history),
                                               "test": {"dsc": dsc, "pq": dsc, "images": rows}}))
    return d


class _Run:
    """What stats.image_frame reads from a rescore.Retrain."""

    def __init__(self, name, rows, tmp_path):
        self.run = parse_run_name(name)
        self.folder = tmp_path / name
        self.result = {"test": {"images": rows}}


def frame_of(tmp_path, runs):
    frame, missing = stats.image_frame([_Run(n, rows, tmp_path) for n, rows in runs.items()])
    assert not missing
    return frame


def all_classes(value):
    return {c: value for c in CLASS_NAMES}


def test_a_method_against_itself_differs_by_exactly_zero(tmp_path):
    rng = np.random.default_rng(0)
    rows = [image_row(f"img{i}", {c: round(float(rng.uniform(0.2, 0.9)), 2) for c in CLASS_NAMES})
            for i in range(12)]
    frame = frame_of(tmp_path, {"train__unet__seed0": rows, "train__unet__seed1": rows[::-1],
                                "train__scse__seed0": rows})
    for b in ("unet", "scse"):
        res = stats.compare(frame, "unet", b, resamples=500)
        t = res.table.set_index("class")
        assert list(t.index) == list(TABLE_ORDER)
        assert (t["diff"] == 0).all() and (t["lo"] == 0).all() and (t["hi"] == 0).all(), t
        assert not t["excludes_zero"].any() and (t["n"] == 12).all()
        assert res.n_paired == 12 and res.resamples == 500


def test_a_clearly_better_prediction_set_excludes_zero(tmp_path):
    rng = np.random.default_rng(1)
    good = [image_row(f"img{i}", {c: round(float(rng.uniform(0.7, 0.9)), 2) for c in CLASS_NAMES}) for i in range(15)]
    bad = [image_row(f"img{i}", {c: round(float(rng.uniform(0.2, 0.5)), 2) for c in CLASS_NAMES}) for i in range(15)]
    frame = frame_of(tmp_path, {"train__nas-scam-p-sync__seed0": good, "train__random-p-sync__seed0": bad})
    res = stats.compare(frame, "nas-scam-p-sync", "random-p-sync")
    t = res.table.set_index("class")
    assert res.resamples == stats.DEFAULT_RESAMPLES == 10_000
    assert t["excludes_zero"].all() and (t["lo"] > 0).all()
    diff = np.array([[g[f"dsc_{c}"] - b[f"dsc_{c}"] for c in CLASS_NAMES] for g, b in zip(good, bad)])
    assert t.at["Epithelial", "diff"] == pytest.approx(100 * diff[:, 0].mean())
    assert t.at["Average", "diff"] == pytest.approx(100 * diff.mean(axis=1).mean())
    assert t.at["Average", "lo"] < t.at["Average", "diff"] < t.at["Average", "hi"]
    # seeded: the same interval again; the other way round, mirrored
    again = stats.compare(frame, "nas-scam-p-sync", "random-p-sync").table.set_index("class")
    assert again.at["Average", "lo"] == t.at["Average", "lo"]
    back = stats.compare(frame, "random-p-sync", "nas-scam-p-sync").table.set_index("class")
    assert back.at["Average", "hi"] == pytest.approx(-t.at["Average", "lo"])
    assert back["excludes_zero"].all()


def test_bootstrap_interval_is_a_percentile_interval_and_needs_two_values():
    x = np.array([0.0, 10.0])
    lo, hi = stats.bootstrap_interval(x, resamples=4000, seed=3)
    assert lo == 0.0 and hi == 10.0  # the all-0 and all-10 resamples each have probability 1/4
    assert all(math.isnan(v) for v in stats.bootstrap_interval([5.0]))
    wide = stats.bootstrap_interval(np.random.default_rng(0).normal(size=40), resamples=3000)
    assert wide[0] < 0 < wide[1]
    with pytest.raises(stats.StatsError, match="resamples"):
        stats.bootstrap_interval(x, resamples=0)


def test_an_undefined_class_leaves_the_image_out_of_that_class_only(tmp_path):
    ep, ly, ne = "Epithelial", "Lymphocyte", "Neutrophil"  # Macrophage: undefined everywhere
    a = [image_row("i0", {ep: 0.8, ly: 0.6}),
         image_row("i1", {ep: 0.4, ne: 0.0}),  # Neutrophil predicted, absent from truth: 0
         image_row("i2", {ep: 0.6, ly: 0.2})]
    b = [image_row("i0", {ep: 0.6, ly: 0.6}),
         image_row("i1", {ep: 0.2, ly: 0.4}),  # Lymphocyte defined for B only
         image_row("i2", {ep: 0.6})]
    frame = frame_of(tmp_path, {"train__unet__seed0": a, "train__cbam__seed0": b})
    t = stats.compare(frame, "unet", "cbam", resamples=200).table.set_index("class")
    assert t.at["Epithelial", "n"] == 3 and t.at["Epithelial", "diff"] == pytest.approx(100 * (0.2 + 0.2 + 0) / 3)
    assert t.at["Lymphocyte", "n"] == 1 and t.at["Lymphocyte", "diff"] == pytest.approx(0.0)  # i0 only
    assert t.at["Neutrophil", "n"] == 0 and math.isnan(t.at["Neutrophil", "diff"])  # never defined for B
    assert math.isnan(t.at["Neutrophil", "lo"]) and not t.at["Neutrophil", "excludes_zero"]
    assert t.at["Macrophage", "n"] == 0
    # Average: each image's mean over its own defined classes (A i1: (0.4 + 0.0) / 2; B i2: 0.6)
    avg_a, avg_b = [0.7, 0.2, 0.4], [0.6, 0.3, 0.6]
    assert t.at["Average", "n"] == 3
    assert t.at["Average", "diff"] == pytest.approx(100 * np.mean(np.subtract(avg_a, avg_b)))
    # written as null in JSON, read back as NaN
    frame_a = frame[frame["method"] == "unet"].set_index("id")
    assert math.isnan(frame_a.at["i0", "dsc_Neutrophil"]) and frame_a.at["i1", "dsc_Neutrophil"] == 0.0


def test_images_pair_by_fold_and_id_and_pool_over_seeds_and_draws(tmp_path):
    e = "Epithelial"
    frame = frame_of(tmp_path, {
        # the same id in two folds is two images; seeds and draws of a fold pool per image
        "train__random-p-sync__seed0__draw0__fold0": [image_row("x", {e: 0.6}), image_row("only-a", {e: 0.9})],
        "train__random-p-sync__seed0__draw1__fold0": [image_row("x", {e: 0.8})],
        "train__random-p-sync__seed1__draw0__fold1": [image_row("x", {e: None})],  # undefined in one run ...
        "train__random-p-sync__seed2__draw0__fold1": [image_row("x", {e: 0.0})],  # ... predicted in another
        "train__unet__seed0__fold0": [image_row("x", {e: 0.5})],
        "train__unet__seed1__fold0": [image_row("x", {e: 0.5})],
        "train__unet__seed0__fold1": [image_row("x", {e: 0.2})],
    })
    mine = stats.method_images(frame, "random-p-sync", "")
    assert mine.loc[(0, "x"), e] == pytest.approx(0.7) and mine.loc[(1, "x"), e] == 0.0
    res = stats.compare(frame, "random-p-sync", "unet", resamples=100)
    t = res.table.set_index("class")
    assert res.n_paired == 2 and res.unpaired == {"random-p-sync": 1, "unet": 0}
    assert t.at["Epithelial", "n"] == 2
    assert t.at["Epithelial", "diff"] == pytest.approx(100 * ((0.7 - 0.5) + (0.0 - 0.2)) / 2)
    assert "one method only" in res.to_text()
    assert len(res.runs["random-p-sync"]) == 4 and len(res.runs["unet"]) == 3


def test_variants_are_compared_one_at_a_time(tmp_path):
    rows = [image_row("a", all_classes(0.5)), image_row("b", all_classes(0.7))]
    variants = ("data.stain=none", "data.stain=macenko")
    runs = {f"train__{m}__seed0__{v}": rows for m in ("unet", "scse") for v in variants}
    frame = frame_of(tmp_path, runs)
    with pytest.raises(stats.StatsError, match="several variants.*--variant.*data.stain=macenko"):
        stats.compare(frame, "unet", "scse")
    assert stats.compare(frame, "unet", "scse", variant="data.stain=none").variant == "data.stain=none"
    with pytest.raises(stats.StatsError, match="no run of variant 'x'.*data.stain=none"):
        stats.compare(frame, "unet", "scse", variant="x")
    with pytest.raises(stats.StatsError, match="method 'cbam'.*methods found: scse, unet"):
        stats.compare(frame, "unet", "cbam")


def test_organs_from_the_tcga_tissue_source_site(shared_data):
    assert stats.organ_of("TCGA-2Z-A9JG-01Z-00-DX1_1") == "kidney"
    assert stats.organ_of("TCGA-55-7570-01Z-00-DX1") == "lung"
    assert stats.organ_of("TCGA-A2-A0ES-01Z-00-DX1_2") == "breast"
    assert stats.organ_of("TCGA-G9-6356-01Z-00-DX1") == "prostate"
    assert stats.organ_of("synthetic_003") == stats.organ_of(None) == "unknown"
    # every patient of the MoNuSAC files we hold maps to one of MoNuSAC's four organs
    names = [p.name for p in (shared_data / "monusac_test_masks" / "images").iterdir()]
    names += [p.name for p in (shared_data / "monusac").rglob("TCGA-*")]
    assert names and {stats.organ_of(n) for n in names} <= {"lung", "kidney", "breast", "prostate"}


def test_breakdown_is_global_dsc_per_group_mean_over_repeats(tmp_path):
    ep = "Epithelial"

    def row(image_id, patient, inter, pixels=100):  # Epithelial only, 100 or 300 pixels each side
        r = image_row(image_id, {}, patient)
        r.update({f"inter_{ep}": inter, f"pred_{ep}": pixels, f"gt_{ep}": pixels, f"dsc_{ep}": inter / pixels})
        return r

    kidney, breast = "TCGA-2Z-A9JG-01Z-00-DX1", "TCGA-A2-A0ES-01Z-00-DX1"
    frame = frame_of(tmp_path, {
        "train__unet__seed0__fold0": [row("k1", kidney, 80), row("k2", kidney, 20, pixels=300)],
        "train__unet__seed0__fold1": [row("b1", breast, 50)],
        "train__unet__seed1__fold0": [row("k1", kidney, 60), row("k2", kidney, 60, pixels=300)],
        "train__unet__seed1__fold1": [row("b1", breast, 70)],
    })
    assert stats.breakdowns_available(frame) == ["fold", "patient", "organ"]
    by_fold = stats.breakdown(frame, "fold").set_index(["group", "class"])
    # fold 0, seed 0: 2 * (80 + 20) / (200 + 600) = 25%; seed 1: 2 * 120 / 800 = 30%; mean 27.5
    assert by_fold.at[("0", "Epithelial"), "mean"] == pytest.approx(27.5)
    assert by_fold.at[("0", "Average"), "mean"] == pytest.approx(27.5)  # the only defined class
    assert by_fold.at[("0", "Average"), "n_repeats"] == 2 and by_fold.at[("0", "Average"), "n_images"] == 2
    assert math.isnan(by_fold.at[("1", "Lymphocyte"), "mean"])
    by_organ = stats.breakdown(frame, "organ").set_index(["group", "class"])
    assert by_organ.at[("breast", "Average"), "mean"] == pytest.approx(60.0)
    assert by_organ.at[("kidney", "Average"), "mean"] == pytest.approx(27.5)
    md = stats.breakdown_markdown(frame, "patient")
    assert f"| {kidney} | 2 | 27.50 |" in md and "global" in md
    with pytest.raises(stats.StatsError, match="expected one of fold, patient, organ"):
        stats.breakdown(frame, "slide")


def _ablation(root):
    """nas-scam-p-sync better than its random control by 10 points on every image and class, except
    Neutrophil (undefined everywhere) and Lymphocyte (+20 on one image of two); U-Net equal to the control."""
    ep, ly, ma = CLASS_NAMES[0], CLASS_NAMES[1], CLASS_NAMES[3]
    patients = ["TCGA-2Z-A9JG-01Z-00-DX1", "TCGA-55-7570-01Z-00-DX1"]
    for seed in (0, 1):
        for fold, patient in enumerate(patients):
            ids = [f"{patient}_{k}" for k in (1, 2)]
            nas = [image_row(ids[0], {ep: 0.7, ly: 0.6, ma: 0.5}, patient),
                   image_row(ids[1], {ep: 0.5, ly: 0.6, ma: 0.3}, patient)]
            ctl = [image_row(ids[0], {ep: 0.6, ly: 0.4, ma: 0.4}, patient),
                   image_row(ids[1], {ep: 0.4, ly: 0.6, ma: 0.2}, patient)]
            hist = [{"epoch": 0, "train_loss": 1.0, "val_dsc": 0.3}]
            write_run(root, f"train__nas-scam-p-sync__seed{seed}__fold{fold}", nas, hist)
            write_run(root, f"train__random-p-sync__seed{seed}__draw0__fold{fold}", ctl, hist)
            write_run(root, f"train__unet__seed{seed}__fold{fold}", ctl, hist)
    old = root / "train__scse__seed0__fold0"  # a retrain from before the per-image rows
    old.mkdir()
    (old / "best.pt").write_bytes(b"")
    (old / "result.json").write_text(json.dumps({"test": {"dsc": {c: 0.1 for c in TABLE_ORDER}}, "history": []}))


def test_compare_cli_prints_the_paired_table(home, capsys):
    root = home / "runs" / "abl"
    _ablation(root)
    assert cli.main(["compare", "abl", "nas-scam-p-sync", "random-p-sync", "--resamples", "2000"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and
             line.split()[0] in TABLE_ORDER}
    # 4 images (2 folds x 2 images), each pooled over 2 seeds: Average per image +10 (image 1: (10+20+10)/3 ...)
    assert lines["Epithelial"] == ["Epithelial", "+10.00", "[+10.00,", "+10.00]", "4", "yes", "*"]
    assert lines["Macrophage"][1:5] == ["+10.00", "[+10.00,", "+10.00]", "4"]
    assert lines["Lymphocyte"][1] == "+10.00" and lines["Lymphocyte"][4] == "4"  # +20, 0 per fold's two images
    assert lines["Lymphocyte"][2:4] == ["[+0.00,", "+20.00]"] and lines["Lymphocyte"][-1] == "no"
    assert lines["Neutrophil"][1:5] == ["-", "-", "0", "no"]
    assert lines["Average"][1] == f"{100 * np.mean([(0.1 + 0.2 + 0.1) / 3, 0.2 / 3] * 2):+.2f}"
    assert "4 paired test images" in out and "10000" not in out and "2000 resamples" in out
    assert "per-image DSC" in out and "not from the global DSC of Table 2" in out

    assert cli.main(["compare", "abl", "nas-scam-p-sync", "unet", "--json", "--resamples", "100"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["class"]: r for r in data["rows"]}
    assert rows["Epithelial"]["diff"] == pytest.approx(10.0) and rows["Epithelial"]["excludes_zero"] is True
    assert rows["Neutrophil"]["diff"] is None and rows["Neutrophil"]["n"] == 0
    assert data["resamples"] == 100 and data["n_paired"] == 4 and len(data["runs"]["unet"]) == 4


def test_compare_cli_names_what_is_missing(home, capsys):
    root = home / "runs" / "abl"
    _ablation(root)
    assert cli.main(["compare", "abl", "nas-scam-p-sync", "cbam"]) == 2
    err = capsys.readouterr().err
    assert "method 'cbam'" in err and "methods found: nas-scam-p-sync, random-p-sync, scse, unet" in err
    assert cli.main(["compare", "abl", "scse", "unet"]) == 2
    err = capsys.readouterr().err
    assert "train__scse__seed0__fold0" in err and "per-image" in err
    assert cli.main(["compare", "nope", "unet", "scse"]) == 2
    assert "nope: no such run folder" in capsys.readouterr().err
    assert cli.main(["compare", "abl", "unet", "nas-scam-p-sync", "--variant", "data.stain=none"]) == 2
    assert "no run of variant 'data.stain=none'" in capsys.readouterr().err


def test_report_has_the_paired_and_breakdown_tables(home, tmp_path):
    root = home / "runs" / "abl"
    _ablation(root)
    md = write_report(root, tmp_path / "out").markdown
    assert "## Paired comparisons (per-image DSC)" in md and "not from the global DSC of Table 2" in md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if " - " in line and "|" in line}
    assert "+10.00 [+10.00, +10.00] n=4 *" in rows["nas-scam-p-sync - random-p-sync"]
    assert "nas-scam-p-sync - unet" in rows
    assert "left out (no per-image test rows): train__scse__seed0__fold0" in md
    for by in ("fold", "patient", "organ"):
        assert f"## DSC by {by} (global DSC)" in md
        assert (tmp_path / "out" / f"dsc_by_{by}.csv").is_file()
    assert "| kidney | 2 |" in md and "| lung | 2 |" in md and "| fold 1 | 2 |" in md
    paired = json.loads((tmp_path / "out" / "paired.json").read_text())
    assert [(p["a"], p["b"]) for p in paired] == [("nas-scam-p-sync", "random-p-sync"), ("nas-scam-p-sync", "unet")]
    assert pd.read_csv(tmp_path / "out" / "dsc_by_organ.csv")["group"].nunique() == 2


def test_an_axis_effect_pairs_each_variant_with_its_twin_and_pools_the_other_axes(tmp_path):
    """sampler=uniform minus sampler=balanced, over two stain levels: per image the mean of the two pairs."""
    runs = {}
    for stain, bonus in (("none", 0.10), ("macenko", 0.30)):
        for sampler, base in (("uniform", 0.5 + bonus), ("balanced", 0.5)):
            name = f"train__unet__seed0__fold0__data.stain={stain}+train.sampler={sampler}"
            runs[name] = [image_row(f"img{i}", all_classes(base + 0.01 * i)) for i in range(4)]
    frame = frame_of(tmp_path, runs)
    eff = stats.axis_effect(frame, "unet", "train.sampler", "uniform", "balanced", resamples=500)
    row = eff.table.set_index("class").loc["Average"]
    assert row["diff"] == pytest.approx(20.0) and row["n"] == 4  # mean of +10 and +30 points per image
    assert row["lo"] == pytest.approx(20.0) and row["excludes_zero"]  # every image moved by the same amount
    assert len(eff.runs["train.sampler=uniform"]) == 2
    back = stats.axis_effect(frame, "unet", "train.sampler", "balanced", "uniform", resamples=500)
    assert back.table.set_index("class").loc["Average", "diff"] == pytest.approx(-20.0)
    with pytest.raises(stats.StatsError, match="values of loss.name found: \\?"):
        stats.axis_effect(frame, "unet", "loss.name", "bce", "exp_log")


def test_area_ratios_sum_pixels_over_images_and_mark_over_prediction(tmp_path):
    rows = [image_row("a", all_classes(0.5)), image_row("b", all_classes(0.5))]
    for r in rows:  # Neutrophil predicted on 300 pixels of an image holding 100
        r["pred_Neutrophil"] = 300
    frame = frame_of(tmp_path, {"train__unet__seed0": rows, "train__unet__seed1": rows})
    t = stats.area_ratios(frame).set_index("class")
    assert t.at["Neutrophil", "ratio"] == pytest.approx(3.0) and t.at["Epithelial", "ratio"] == pytest.approx(1.0)
    assert t.at["Neutrophil", "true"] == 200  # summed over both images, mean over the two seeds
    md = stats.area_markdown(frame)
    assert "3.00 *" in md and "1.00 *" not in md
