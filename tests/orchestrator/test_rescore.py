"""Scoring a checkpoint on every image of a folder (`evaluate --all`) and an ablation's checkpoints
(`table NAME --eval-data`), on a tiny synthetic MoNuSAC folder and a cropped real images/+masks/ folder."""

import csv
import json
import shutil

import numpy as np
import pytest

from nas_core.config import load_config
from nas_core.data.readers import DataError, list_samples
from nas_core.data.synthetic import write_synthetic
from nas_core.engine.checkpoint import save_checkpoint
from nas_core.engine.score import score_checkpoint, write_scores
from nas_core.classes import CLASS_NAMES
from nas_core.models import create_model
from orchestrator import cli
from orchestrator.rescore import RescoreError, default_out, find_checkpoints, rescore_ablation


def _checkpoint(path, seed=0, model="unet"):
    """An untrained model saved as a training run would save it, at 32 px tiles (fast on a CPU)."""
    import torch

    torch.manual_seed(seed)
    cfg = load_config(None, preset="smoke", overrides=["data.crop_size=32", "data.stride=32", "data.stain=none"])
    return save_checkpoint(path, model=create_model(model), config=cfg.to_dict(), phase="train", epoch=0)


@pytest.fixture(scope="module")
def syn_folder(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "monusac", n_images=4, size=64, seed=1)


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory, shared_data):
    """images/ + masks/ of 3 real MoNuSAC test images, cropped to 96 px (PNG, lossless masks)."""
    import cv2

    src = shared_data / "monusac_test_masks"
    if not (src / "images").is_dir():
        pytest.skip(f"{src} is absent on this machine")
    dst = tmp_path_factory.mktemp("real") / "lab"
    for sub in ("images", "masks"):
        (dst / sub).mkdir(parents=True)
    for img in sorted((src / "images").iterdir())[:3]:
        mask = next((src / "masks").glob(img.stem + ".*"))
        for kind, f in (("images", img), ("masks", mask)):
            arr = cv2.imread(str(f), cv2.IMREAD_COLOR)
            cv2.imwrite(str(dst / kind / f"{img.stem}.png"), arr[:96, :96])
    return dst


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck") / "run" / "best.pt")


@pytest.mark.parametrize("which", ["syn_folder", "real_folder"])
def test_scores_every_image_and_global_dsc_is_the_sum_of_rows(request, which, ckpt, tmp_path):
    folder = request.getfixturevalue(which)
    _, refs = list_samples(folder)
    result = score_checkpoint(ckpt, folder, device="cpu")
    assert result["n_images"] == len(refs) == len(result["images"])
    assert [r["id"] for r in result["images"]] == [r.id for r in refs]
    assert result["tile"] == 32 and result["stride"] == 32
    rows = result["images"]
    for name in CLASS_NAMES:
        inter = sum(r[f"inter_{name}"] for r in rows)
        denom = sum(r[f"pred_{name}"] + r[f"gt_{name}"] for r in rows)
        expect = 2 * inter / denom if denom else float("nan")
        np.testing.assert_allclose(result["global"]["dsc"][name], expect, equal_nan=True)
        for r in rows:  # each row's DSC from its own counts
            d = r[f"pred_{name}"] + r[f"gt_{name}"]
            np.testing.assert_allclose(r[f"dsc_{name}"], 2 * r[f"inter_{name}"] / d if d else float("nan"),
                                       equal_nan=True)
    assert sum(r[f"gt_{n}"] for r in rows for n in CLASS_NAMES) > 0  # the folder has nuclei

    paths = write_scores(result, tmp_path / "out")
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(refs)
    saved = json.loads(paths["json"].read_text())
    assert saved["n_images"] == len(refs) and saved["folder"] == str(folder.resolve())


def test_evaluate_all_cli_defaults_out_beside_the_checkpoint(syn_folder, ckpt, capsys):
    rc = cli.main(["evaluate", "--checkpoint", str(ckpt), "--data", str(syn_folder), "--all", "--device", "cpu"])
    assert rc == 0
    out = default_out(ckpt, syn_folder)
    assert out.parent == ckpt.parent and (out / "per_image.csv").is_file()
    assert json.loads((out / "scores.json").read_text())["n_images"] == 4
    assert '"n_images": 4' in capsys.readouterr().out
    # a second run never replaces the scores silently: one line naming the file, then --overwrite
    before = (out / "scores.json").stat().st_mtime_ns
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data", str(syn_folder), "--all", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "scores.json exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "scores.json").stat().st_mtime_ns == before
    assert cli.main([*argv, "--overwrite"]) == 0


def test_missing_or_corrupt_folder_names_it(ckpt, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        score_checkpoint(ckpt, missing, device="cpu")
    rc = cli.main(["evaluate", "--checkpoint", str(ckpt), "--data", str(missing), "--all", "--out", str(tmp_path / "o")])
    assert rc == 2 and str(missing) in capsys.readouterr().err

    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    (bad / "images" / "a.png").write_bytes(b"not a png")
    (bad / "masks" / "a.png").write_bytes(b"not a png either")
    with pytest.raises(DataError, match="a.png"):
        score_checkpoint(ckpt, bad, device="cpu")


def _fake_ablation(root, methods=("unet", "scse"), seeds=(0, 1)):
    """The run folder an ablation leaves: ablation.json + train__METHOD__seedN/{best.pt,result.json}."""
    model = {"unet": "unet", "scse": "unet-scse"}
    root.mkdir(parents=True)
    (root / "ablation.json").write_text(json.dumps({"parent_run_id": "x", "spec": {"std": "sample",
                                                                                    "repeat": "retrain"}}))
    for m in methods:
        for s in seeds:
            d = root / f"train__{m}__seed{s}"
            _checkpoint(d / "best.pt", seed=10 * s + len(m), model=model[m])
            zero = m == "scse" and s == 1  # a run whose val DSC stayed 0: flagged in the table
            hist = [{"epoch": e, "train_loss": 1.0, "val_dsc": 0.0 if zero else 0.1 * e} for e in range(4)]
            (d / "result.json").write_text(json.dumps({"history": hist}))
    unfinished = root / "train__cbam__seed0"
    unfinished.mkdir()
    _checkpoint(unfinished / "last.pt")
    (root / "search__nas-scam-p-sync__seed0").mkdir()  # not a train run: ignored


def test_table_eval_data_rescores_each_kept_checkpoint(syn_folder, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    root = home / "runs" / "abl"
    _fake_ablation(root)
    found, skipped = find_checkpoints(root)
    assert sorted((r.method, r.seed) for r, _ in found) == [("scse", 0), ("scse", 1), ("unet", 0), ("unet", 1)]
    assert skipped and "train__cbam__seed0" in skipped[0]

    outcome = rescore_ablation(root, syn_folder, device="cpu")
    assert len(outcome.records) == 4
    one = score_checkpoint(root / "train__scse__seed1" / "best.pt", syn_folder, device="cpu")
    rec = next(r for r in outcome.records if r["method"] == "scse" and r["seed"] == 1)
    assert rec["Average"] == pytest.approx(one["global"]["dsc"]["Average"])
    avg = outcome.table[(outcome.table["method"] == "unet") & (outcome.table["class"] == "Average")].iloc[0]
    unet = [100 * r["Average"] for r in outcome.records if r["method"] == "unet"]
    assert avg["n"] == 2 and avg["mean"] == pytest.approx(np.mean(unet))
    assert avg["std"] == pytest.approx(np.std(unet, ddof=1))  # the spec's std: sample
    assert str(syn_folder.resolve()) in outcome.text and "skipped: train__cbam__seed0" in outcome.text
    assert "[no learning 1/2]" in outcome.text and outcome.text.count("no learning") == 1
    assert (root / "eval-monusac" / "table2.md").is_file()
    assert (root / "eval-monusac" / "train__unet__seed0" / "per_image.csv").is_file()

    monkeypatch.setenv("NAS_SCAM_HOME", str(home))
    monkeypatch.delenv("NAS_SCAM_RUNS_DIR", raising=False)
    out = tmp_path / "t"
    assert cli.main(["table", "abl", "--eval-data", str(syn_folder), "--out", str(out), "--device", "cpu"]) == 0
    assert f"on {syn_folder.resolve()}" in capsys.readouterr().out and (out / "table2.csv").is_file()
    with pytest.raises(RescoreError, match="nope"):
        rescore_ablation(home / "runs" / "nope", syn_folder)


def test_relative_data_source_of_a_spec_is_resolved_from_the_current_folder(tmp_path, monkeypatch):
    """A spec naming ../shared/data works although Ray starts each trial in its own folder."""
    from orchestrator.commands.ablate import _load

    (tmp_path / "work" / "exp").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    spec = tmp_path / "work" / "exp" / "s.yaml"
    spec.write_text("kind: ablation\nname: rel\nmethods: [unet]\nseeds: 1\n"
                    "data: {source: ../data, split_by: patient}\n")
    monkeypatch.chdir(tmp_path / "work")
    args = cli.build_parser().parse_args(["ablate", str(spec)])
    loaded = _load(args, "ablation")
    assert loaded.data.source == str((tmp_path / "data").resolve()) and loaded.data.split_by == "patient"


def _retrain_folder(d, data_root, seed):
    """A finished retrain as the engine leaves it: best.pt and result.json whose test rows the engine
    scored on the run's own test split (synthetic data of the smoke preset, prepared under data_root)."""
    from nas_core.config import config_from_dict
    from nas_core.data import ensure_dataset
    from nas_core.engine.checkpoint import load_checkpoint
    from nas_core.engine.evaluate import evaluate_split
    from nas_core.engine.score import json_ready

    _checkpoint(d / "best.pt", seed=seed)
    model, meta = load_checkpoint(d / "best.pt")
    cfg = config_from_dict(meta["config"])
    data = ensure_dataset(cfg.data, data_root, cfg.data.seed, progress=False)
    test = evaluate_split(model, data, "test", tile=cfg.data.crop_size, stride=cfg.data.stride, images=True)
    hist = [{"epoch": e, "train_loss": 1.0, "val_dsc": 0.1 * e} for e in range(3)]
    (d / "result.json").write_text(json.dumps(json_ready({"history": hist, "test": test})))


def test_table_calibrate_fits_on_val_scores_test_and_leaves_the_runs_alone(home, capsys):
    from nas_core.engine.calibrate import GRID
    from orchestrator.calibration import calibrate_ablation
    from orchestrator.settings import get_settings

    settings = get_settings()
    root = settings.runs_root / "cal"
    root.mkdir(parents=True)
    (root / "ablation.json").write_text(json.dumps({"spec": {"std": "population", "repeat": "retrain"}}))
    for s in (0, 1):
        _retrain_folder(root / f"train__unet__seed{s}", settings.data_root, seed=s)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert cli.main(["table", "cal", "--calibrate", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "per-class thresholds fitted" in out and "unet - unet@0.5" in out
    assert {p: p.read_bytes() for p in before} == before  # the runs' own files are untouched
    assert "differ from the run's own result.json" not in out  # 0.5 re-scored = the engine's own test

    for s in (0, 1):
        saved = json.loads((root / "calibrated" / f"train__unet__seed{s}" / "calibration.json").read_text())
        assert saved["matches_run"] is True
        cal = saved["calibration"]
        half = cal["grid"].index(0.5)
        for k, (t, px) in enumerate(zip(cal["thresholds"], cal["val_pixels"])):
            assert any(t == pytest.approx(g) for g in GRID)
            if px == 0:
                assert t == 0.5 and not cal["fitted"][k]
            else:  # the fitted cut is at least as good on val as 0.5
                chosen = cal["val_dsc"][k][cal["grid"].index(t)]
                assert chosen >= (cal["val_dsc"][k][half] or 0.0)
        own = json.loads((root / f"train__unet__seed{s}" / "result.json").read_text())["test"]["dsc"]
        for c, v in own.items():
            again = saved["test"]["fixed"]["dsc"][c]
            assert (v is None and again is None) or v == pytest.approx(again, abs=1e-4)

    outcome = calibrate_ablation(root, settings.data_root, home / "elsewhere", device="cpu")
    saved = json.loads((home / "elsewhere" / "train__unet__seed1" / "calibration.json").read_text())
    rec = next(r for r in outcome.records if r["seed"] == 1)
    assert rec["Average"] == pytest.approx(saved["test"]["calibrated"]["dsc"]["Average"])
    md = (home / "elsewhere" / "calibration.md").read_text()
    assert "| unet@0.5 |" in md and "| train__unet__seed0 |" in md

    assert cli.main(["table", "cal", "--calibrate", "--eval-data", str(home)]) == 2
    assert "give one" in capsys.readouterr().err
