"""`nas-scam report NAME`: an ablation's Markdown page from its run folder (DSC + PQ over seeds, curves,
genotypes, overlays of the best method)."""

import json

import pytest

from nas_core.classes import TABLE_ORDER
from nas_core.config import load_config
from nas_core.data.synthetic import write_synthetic
from nas_core.engine.checkpoint import save_checkpoint
from nas_core.models import create_model
from nas_core.search_space.genotype import Genotype
from orchestrator import cli
from orchestrator.rescore import RescoreError
from orchestrator.report import write_report

CLASSES = TABLE_ORDER
# test scores (fractions) per (method, seed) in the table's column order: Average, Epithelial, Lymphocyte,
# Macrophage, Neutrophil
SCORES = {("unet", 0): (0.20, 0.6, 0.2, 0.0, 0.0), ("unet", 1): (0.30, 0.7, 0.3, 0.2, 0.0),
          ("scse", 0): (0.40, 0.8, 0.4, 0.4, 0.0), ("scse", 1): (0.50, 0.9, 0.5, 0.6, 0.0)}


def _run_folder(root):
    """The folder an ablation leaves: ablation.json, train__METHOD__seedN/{best.pt,result.json}, a search."""
    import torch

    root.mkdir(parents=True)
    (root / "ablation.json").write_text(json.dumps({"spec": {"std": "population", "repeat": "retrain"}}))
    cfg = load_config(None, preset="smoke", overrides=["data.crop_size=32", "data.stride=32", "data.stain=none"])
    for (method, seed), scores in SCORES.items():
        d = root / f"train__{method}__seed{seed}"
        torch.manual_seed(seed)
        model = create_model({"unet": "unet", "scse": "unet-scse"}[method])
        save_checkpoint(d / "best.pt", model=model, config=cfg.to_dict(), phase="train", epoch=3)
        dsc = dict(zip(CLASSES, scores))
        pq = {c: v / 2 for c, v in dsc.items()}
        hist = [{"epoch": e, "train_loss": 1.0, **({"val_dsc": scores[0] * (e + 1) / 4} if e % 2 else {})}
                for e in range(4)]
        (d / "result.json").write_text(json.dumps({"best_epoch": 3, "history": hist,
                                                   "test": {"dsc": dsc, "pq": pq}}))
    search = root / "search__nas-scam-p-sync__seed0"
    Genotype(combine="parallel", search="synchronous", sam=(("conv3",) * 6,) * 8,
             cam=(("conv5",) * 6,) * 8).save(search / "genotype.json")


def test_report_tables_curves_genotypes_and_overlays(tmp_path):
    root = tmp_path / "runs" / "abl"
    _run_folder(root)
    images = write_synthetic(tmp_path / "syn", n_images=2, size=64, seed=1)
    tif = sorted(images.rglob("*.tif"))[0]
    report = write_report(root, tmp_path / "out", overlays=[tif], device="cpu")
    md = report.markdown

    # DSC beside the paper: scSE mean 45.00, population std 5.00 (two seeds 40, 50)
    assert "| scSE | 2 | ours | 45.00 ± 5.00 | 85.00 ± 5.00 | 45.00 ± 5.00 | 50.00 ± 10.00 | 0.00 ± 0.00 |" in md
    assert "| U-Net | 2 | ours | 25.00 ± 5.00 |" in md
    # PQ = half the DSC here, same spread halved
    assert "| scSE | 2 | 22.50 ± 2.50 | 42.50 ± 2.50 | 22.50 ± 2.50 | 25.00 ± 5.00 | 0.00 ± 0.00 |" in md
    # the curve: validations at epochs 2 and 4 (1-based), best epoch 4, test Average
    assert "| ep 2 | ep 4 | best epoch | test Average |" in md
    assert "| unet__seed1 | 15.00 | 30.00 | 4 | 30.00 |" in md
    for key in ("table", "curves", "genotype:nas-scam-p-sync", "md"):
        assert report.paths[key].is_file() and report.paths[key].stat().st_size > 0, key
    assert report.paths["table"].suffix == ".svg"
    # overlays come from the best method by mean test Average DSC (scSE), its best seed (1)
    assert "best method (scse, seed 1, test Average DSC 50.00%)" in md
    overlay = report.paths[f"overlay:{tif.name}"]
    assert overlay.is_file() and overlay.parent.name == "overlays" and tif.stem in overlay.name


def test_report_cli_and_bad_input_names_the_culprit(home, tmp_path, capsys):
    _run_folder(home / "runs" / "abl")
    assert cli.main(["report", "abl", "--format", "png"]) == 0
    out = capsys.readouterr().out
    assert "# Report: abl" in out and (home / "runs" / "abl" / "report" / "table2.png").is_file()
    with pytest.raises(RescoreError, match="no_such.png"):
        write_report(home / "runs" / "abl", tmp_path / "o", overlays=[tmp_path / "no_such.png"])
    with pytest.raises(RescoreError, match="nope"):
        write_report(home / "runs" / "nope", tmp_path / "o")
    bad = home / "runs" / "abl" / "train__unet__seed0" / "result.json"
    bad.write_text(json.dumps({"history": []}))
    with pytest.raises(RescoreError, match="train__unet__seed0"):
        write_report(home / "runs" / "abl", tmp_path / "o")
    syn = write_synthetic(tmp_path / "syn", n_images=2, size=64, seed=0)
    for text, why in (('{"history": [', "unreadable"), ("[1, 2]", "not a JSON object")):
        bad.write_text(text)  # a retrain's result.json cut short or replaced: one line naming it, for both readers
        with pytest.raises(RescoreError, match=f"train__unet__seed0.result.json: {why}"):
            write_report(home / "runs" / "abl", tmp_path / "o")
        assert cli.main(["table", "abl", "--eval-data", str(syn), "--device", "cpu"]) != 0
        err = capsys.readouterr().err
        assert "train__unet__seed0/result.json" in err and why in err and "Traceback" not in err
