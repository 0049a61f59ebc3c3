"""Engine: search, retrain, resume, tiled inference, prediction outputs, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_core.config import ConfigError, load_config
from nas_core.engine import (CheckpointError, TrainingError, load_checkpoint, run_search, run_train)
from nas_core.engine.evaluate import predict_probs
from nas_core.engine.predict import label_map, to_geojson
from nas_core.classes import CLASS_BY_ID
from nas_core.search_space.genotype import Genotype

TINY = [
    "data.synthetic_images=6", "data.synthetic_size=128", "data.crop_size=32", "data.stride=32",
    "data.split=0.5,0.25,0.25",
    "search.epochs=3", "search.warmup_epochs=1", "search.iters_per_epoch=2",
    "train.epochs=2", "train.iters_per_epoch=2",
    # validate at the start of every epoch (the release's timing, but every epoch: 3-epoch runs)
    "search.val_every=1", "train.val_every=1",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def tiny_cfg(data_root: Path, *extra: str):
    return load_config(overrides=[*TINY, f"data.cache_dir={data_root}", *extra])


def test_smoke_search_changes_alpha_and_writes_a_valid_genotype(data_root, tmp_path):
    cfg = tiny_cfg(data_root, "model.name=nas-scam-p")
    res = run_search(cfg, tmp_path / "search")
    g = Genotype.load(res.genotype_path)
    assert g.combine == "parallel" and g.search == "synchronous"
    hist = np.load(res.alpha_history_path)
    assert hist["sam"].shape == (3, 8, 6, 6) and hist["cam"].shape == (3, 8, 6, 8)
    # alpha is frozen during the warm-up epoch, then moves
    assert np.allclose(hist["sam"][0], 1 / 6, atol=1e-2)
    assert np.abs(hist["sam"][-1] - hist["sam"][0]).max() > 1e-4
    assert res.best_epoch >= cfg.search.warmup_epochs
    # the genotype is the argmax of the best checkpoint's alpha
    model, meta = load_checkpoint(res.checkpoint_path)
    assert meta["genotype"] == g.to_dict() == model.genotype().to_dict()


def test_code_protocol_alternates_per_epoch(data_root, tmp_path):
    from nas_core.engine.search import epoch_mode

    cfg = tiny_cfg(data_root, "protocol=code", "search.epochs=7", "search.warmup_epochs=1", "search.genotype_after=1")
    assert [epoch_mode(cfg, e) for e in range(7)] == ["w", "alpha", "alpha", "w", "alpha", "alpha", "w"]
    paper = tiny_cfg(data_root, "search.warmup_epochs=2", "search.genotype_after=1")
    assert [epoch_mode(paper, e) for e in range(3)] == ["w", "w", "alternate"]


def test_the_old_loop_module_re_exports_each_concern_modules_own_objects():
    """loop.py was split by concern (context, steps, batches, tail, rundir); its names still import from
    it (the orchestrator and bench do) and are the very objects the loops use, so a monkeypatch of the
    owning module is what runs."""
    from nas_core.engine import batches, context, loop, rundir, search, steps, tail, train

    owners = (context, steps, batches, tail, rundir)
    for name in loop.__all__:
        assert [m for m in owners if getattr(m, name, None) is getattr(loop, name)], name
    assert search.optimisation_step is steps.optimisation_step and train.train_batches is batches.train_batches
    assert search.EpochTail is train.EpochTail is tail.EpochTail


def test_retrain_from_genotype_and_checkpoint_describes_itself(data_root, tmp_path):
    g = Genotype(combine="serial", search="shared", sam=(("conv3",) * 6,) * 8, cam=(("conv5",) * 6,) * 8)
    gpath = g.save(tmp_path / "g.json")
    cfg = tiny_cfg(data_root, "model.name=nas-scam-s", f"model.genotype={gpath}")
    res = run_train(cfg, tmp_path / "train")
    assert set(res.test["dsc"]) == {"Average", "Epithelial", "Lymphocyte", "Macrophage", "Neutrophil"}
    model, meta = load_checkpoint(res.checkpoint_path)  # no flags needed
    assert meta["genotype"] == g.to_dict()
    assert json.loads((tmp_path / "train" / "metrics.json").read_text())["test"]["n_images"] >= 1
    # one row per test image in result.json: id, patient, DSC per class (null when undefined), pixel sums
    rows = json.loads((tmp_path / "train" / "result.json").read_text())["test"]["images"]
    from nas_core.data import ensure_dataset

    data = ensure_dataset(cfg.data, data_root, cfg.data.seed, progress=False)
    assert [r["id"] for r in rows] == data.image_ids("test") and len(rows) == res.test["n_images"]
    patients = {m["id"]: m["patient"] for m in data.manifest["images"]}
    assert all(r["patient"] == patients[r["id"]] is not None for r in rows)
    for name in CLASS_BY_ID.values():
        assert all(r[f"dsc_{name}"] is None or 0 <= r[f"dsc_{name}"] <= 1 for r in rows)
        assert all((r[f"dsc_{name}"] is None) == (r[f"pred_{name}"] + r[f"gt_{name}"] == 0) for r in rows)
        denom = sum(r[f"pred_{name}"] + r[f"gt_{name}"] for r in rows)
        if denom:  # the rows' sums give back the global DSC
            assert 2 * sum(r[f"inter_{name}"] for r in rows) / denom == pytest.approx(res.test["dsc"][name])


def test_a_run_depends_on_its_seed_not_on_the_process_rng(data_root, tmp_path):
    """Two identical retrains in one process (as in a Ray worker that runs several trials) give the
    same weights and scores whatever the global RNG state before each, and another seed differs."""
    runs = []
    for i, (rng_seed, run_seed) in enumerate([(11, 0), (12, 0), (11, 1)]):
        torch.manual_seed(rng_seed)
        torch.rand(rng_seed)
        # validated after the epoch, so best.pt holds trained weights
        cfg = tiny_cfg(data_root, "model.name=unet", "train.epochs=1", "train.val_timing=end", f"seed={run_seed}")
        res = run_train(cfg, tmp_path / f"t{i}")
        runs.append(load_checkpoint(res.checkpoint_path)[0].state_dict())
    for k in runs[0]:
        torch.testing.assert_close(runs[1][k], runs[0][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(runs[2][k], runs[0][k]) for k in runs[0] if runs[0][k].is_floating_point())


@pytest.mark.slow
def test_resume_gives_the_same_genotype_and_metrics(data_root, tmp_path):
    cfg = tiny_cfg(data_root, "model.name=nas-scam-p", "deterministic=true")
    full = run_search(cfg, tmp_path / "full")

    class Crash(Exception):
        pass

    from nas_core.engine import Callback

    class StopAfter(Callback):
        def on_epoch_end(self, phase, epoch, metrics, out_dir):
            if epoch == 1:
                raise Crash()

    with pytest.raises(Crash):
        run_search(cfg, tmp_path / "cut", callbacks=[StopAfter()])
    assert not (tmp_path / "cut" / "result.json").exists()
    resumed = run_search(cfg, tmp_path / "cut", resume=True)
    assert resumed.genotype == full.genotype
    assert resumed.best_epoch == full.best_epoch
    a, b = np.load(full.alpha_history_path), np.load(resumed.alpha_history_path)
    np.testing.assert_allclose(a["sam"], b["sam"], rtol=0, atol=1e-6)
    assert [h.get("val_dsc") for h in resumed.history] == pytest.approx([h.get("val_dsc") for h in full.history])


def _data_root_setting(monkeypatch, root: Path) -> None:
    """This machine's data root, as `nas-scam` reads it from the settings."""
    from orchestrator.settings import get_settings

    monkeypatch.setenv("NAS_SCAM_DATA_DIR", str(root))
    get_settings.cache_clear()


def test_a_fresh_run_never_overwrites_a_finished_one(data_root, tmp_path, home, monkeypatch):
    # run seed 3, data seed 0: evaluate must re-open the data by data.seed
    cfg = tiny_cfg(data_root, "model.name=unet", "train.epochs=1", "train.iters_per_epoch=1", "seed=3")
    res = run_train(cfg, tmp_path / "t")
    # `nas-scam evaluate` on the checkpoint alone finds the same data and split, so the same numbers
    from orchestrator.cli import main

    _data_root_setting(monkeypatch, data_root)

    assert main(["evaluate", "--checkpoint", str(res.checkpoint_path), "--out", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics_test.json").read_text())
    assert again["dsc"] == pytest.approx(res.test["dsc"], nan_ok=True)
    before = (tmp_path / "t" / "best.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds"):
        run_train(cfg, tmp_path / "t", resume=False)
    assert (tmp_path / "t" / "best.pt").read_bytes() == before


def test_a_run_folder_copied_to_another_machine_resumes_and_evaluates_there(tmp_path, home, monkeypatch):
    import shutil

    from orchestrator.cli import main
    from orchestrator.settings import get_settings

    # the reference: an uninterrupted retrain on "machine A" (its own data root)
    here = tmp_path / "a-data"
    args = ("model.name=unet", "train.epochs=3", "deterministic=true")
    full = run_train(tiny_cfg(here, *args), tmp_path / "a-full")

    class Crash(Exception):
        pass

    from nas_core.engine import Callback

    class StopAfter(Callback):
        def on_epoch_end(self, phase, epoch, metrics, out_dir):
            if epoch == 0:
                raise Crash()

    with pytest.raises(Crash):
        run_train(tiny_cfg(here, *args), tmp_path / "a-cut", callbacks=[StopAfter()])
    # the checkpoints name no machine path
    for name in ("last.pt", "best.pt"):
        saved = load_checkpoint(tmp_path / "a-cut" / name)[1]["config"]
        assert saved["data"]["cache_dir"] is None and saved["out_dir"] is None
    # "machine B": the run folder copied, machine A's data root and run folder gone, another home
    shutil.copytree(tmp_path / "a-cut", tmp_path / "b-runs" / "cut")
    shutil.rmtree(tmp_path / "a-cut")
    shutil.rmtree(here)
    monkeypatch.setenv("NAS_SCAM_HOME", str(tmp_path / "b-home"))
    get_settings.cache_clear()
    there = get_settings().data_root
    assert there == tmp_path / "b-home" / "data"
    resumed = run_train(tiny_cfg(there, *args), tmp_path / "b-runs" / "cut", resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert [h.get("val_dsc") for h in resumed.history] == pytest.approx([h.get("val_dsc") for h in full.history])
    assert resumed.test["dsc"] == pytest.approx(full.test["dsc"], nan_ok=True)
    # `nas-scam evaluate` there reads the data root from B's settings, not from the checkpoint
    ev = tmp_path / "b-eval"
    assert main(["evaluate", "--checkpoint", str(resumed.checkpoint_path), "--out", str(ev)]) == 0
    again = json.loads((ev / "metrics_test.json").read_text())
    assert again["dsc"] == pytest.approx(full.test["dsc"], nan_ok=True)
    assert not here.exists()
    # a finished folder copied on: its result names the files where they lie now
    shutil.copytree(tmp_path / "b-runs" / "cut", tmp_path / "c-runs" / "cut")
    done = run_train(tiny_cfg(there, *args), tmp_path / "c-runs" / "cut", resume=True)
    assert done.checkpoint_path == tmp_path / "c-runs" / "cut" / "best.pt"
    assert done.metrics_path == tmp_path / "c-runs" / "cut" / "metrics.json"
    assert done.test["dsc"] == pytest.approx(full.test["dsc"], nan_ok=True)


def test_tiled_inference_equals_whole_image_inference():
    from nas_core.models import create_model

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # a per-pixel model has no context, so any tiling must reproduce whole-image inference exactly
    pointwise = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Sigmoid())
    image = rng.integers(0, 255, (75, 130, 3), dtype=np.uint8)
    with torch.no_grad():
        direct = pointwise(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    for tile, stride in ((32, 16), (64, 32), (32, 32), (256, 128)):
        tiled = predict_probs(pointwise, image, tile=tile, stride=stride, binary=False)
        assert tiled.shape == (4, 75, 130)
        np.testing.assert_allclose(tiled, direct, atol=1e-6)
        assert (predict_probs(pointwise, image, tile=tile, stride=stride) == (direct > 0.5)).all()
    # the U-Net (GroupNorm sees the whole input): equal when the image is exactly one tile
    unet = create_model("unet").eval()
    square = image[:64, :64].copy()
    with torch.no_grad():
        whole = unet(torch.from_numpy(square).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    np.testing.assert_allclose(predict_probs(unet, square, tile=64, stride=32, binary=False, grid="flush"), whole,
                               atol=1e-5)
    # the release grid also runs the half-padded window at 32, which owns rows/columns 48..63
    release = predict_probs(unet, square, tile=64, stride=32, binary=False)
    np.testing.assert_allclose(release[:, :48, :48], whole[:, :48, :48], atol=1e-5)
    assert np.abs(release[:, 48:, 48:] - whole[:, 48:, 48:]).max() > 1e-3


def test_geojson_round_trip_counts_polygons_and_classes(tmp_path):
    labels = np.zeros((40, 40), np.uint8)
    labels[2:8, 2:8] = 1
    labels[20:30, 5:12] = 1
    labels[10:14, 30:36] = 2
    labels[30:38, 30:38] = 4
    labels[0, 39] = 3  # one pixel: below min_area, no polygon
    path = tmp_path / "n.geojson"
    path.write_text(json.dumps(to_geojson(labels)))
    geo = json.loads(path.read_text())
    names = [f["properties"]["classification"]["name"] for f in geo["features"]]
    assert sorted(names) == sorted(["Epithelial", "Epithelial", "Lymphocyte", "Macrophage"])
    for f in geo["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
    big = next(f for f in geo["features"] if f["properties"]["area_px"] == 70)
    xs = [p[0] for p in big["geometry"]["coordinates"][0]]
    ys = [p[1] for p in big["geometry"]["coordinates"][0]]
    assert (min(xs), max(xs), min(ys), max(ys)) == (5, 11, 20, 29)  # x = column, y = row


def test_label_map_takes_most_probable_channel():
    p = np.zeros((4, 1, 3), np.float32)
    p[:, 0, 0] = [0.9, 0.6, 0, 0]
    p[:, 0, 1] = [0.6, 0.2, 0.1, 0.95]
    assert label_map(p).tolist() == [[1, 4, 0]]
    assert set(CLASS_BY_ID) == {1, 2, 3, 4}


def test_bad_inputs_stop_with_clear_messages(data_root, tmp_path):
    # a genotype whose combination does not fit the model
    g = Genotype(combine="parallel", search="shared", sam=(("conv1",) * 6,) * 8, cam=(("conv1",) * 6,) * 8)
    g.save(tmp_path / "p.json")
    with pytest.raises(ValueError, match="parallel|serial"):
        run_train(tiny_cfg(data_root, "model.name=nas-scam-s", f"model.genotype={tmp_path / 'p.json'}"), tmp_path / "x")
    with pytest.raises(ConfigError, match="model.genotype"):
        run_train(tiny_cfg(data_root, "model.name=nas-scam-p"), tmp_path / "y")
    with pytest.raises(ConfigError, match="model.name"):
        run_search(tiny_cfg(data_root, "model.name=unet"), tmp_path / "z")
    # a checkpoint from another model
    from nas_core.engine.checkpoint import load_weights, read_checkpoint, save_checkpoint
    from nas_core.models import create_model

    unet = create_model("unet")
    ck = save_checkpoint(tmp_path / "u.pt", model=unet, config={}, phase="train", epoch=0)
    with pytest.raises(CheckpointError, match="saved for model 'unet'"):
        load_weights(create_model("cbam"), read_checkpoint(ck), ck)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    # an image smaller than a tile is padded, not refused; a wrong tile size is refused
    small = np.zeros((20, 20, 3), np.uint8)
    assert predict_probs(unet.eval(), small, tile=32, stride=16).shape == (4, 20, 20)
    with pytest.raises(ValueError, match="multiple of 16"):
        predict_probs(unet, small, tile=30, stride=15)


def test_nan_loss_stops_without_overwriting(data_root, tmp_path):
    # lr 1e30: the first step blows the weights up, every later loss is NaN; the guard skips steps
    # 2 and 3 and fails the run at the third in a row (max_nonfinite_steps, default 3)
    cfg = tiny_cfg(data_root, "model.name=unet", "train.epochs=2", "train.iters_per_epoch=4", "train.lr=1e30")
    with pytest.raises(TrainingError, match=r"train epoch 0 iteration 3: the loss is nan, 3 steps in a row"):
        run_train(cfg, tmp_path / "nan")
    assert not (tmp_path / "nan" / "result.json").exists()


@pytest.mark.slow
def test_retrain_learns_the_synthetic_classes(tmp_path):
    """A short U-Net training on synthetic MoNuSAC separates the classes far above an untrained net."""
    from nas_core.data import ensure_dataset
    from nas_core.engine.evaluate import evaluate_split
    from nas_core.models import create_model

    cfg = load_config(preset="smoke", overrides=[
        f"data.cache_dir={tmp_path / 'data'}", "data.synthetic_size=256", "data.synthetic_images=10",
        "data.crop_size=64", "data.stride=32", "model.name=unet", "train.epochs=6", "train.iters_per_epoch=25",
        "train.lr=3e-3", "augment.pipeline=none"])
    res = run_train(cfg, tmp_path / "train")
    torch.manual_seed(0)
    data = ensure_dataset(cfg.data, tmp_path / "data", cfg.data.seed)
    untrained = evaluate_split(create_model("unet"), data, "test", tile=cfg.data.crop_size, stride=cfg.data.stride)
    trained = res.test["dsc"]
    assert trained["Average"] > untrained["dsc"]["Average"] + 0.2, (trained, untrained["dsc"])
    assert trained["Epithelial"] > 0.5, trained
    for cls in ("Epithelial", "Lymphocyte", "Macrophage", "Neutrophil"):
        assert trained[cls] > untrained["dsc"][cls], (cls, trained, untrained["dsc"])


def test_predict_cli_writes_masks_overlays_and_geojson(tmp_path, shared_data):
    import cv2

    from nas_core.engine.checkpoint import save_checkpoint
    from nas_core.models import create_model
    from orchestrator.cli import main

    torch.manual_seed(0)
    cfg = load_config(overrides=["model.name=unet", "data.crop_size=64", "data.stride=32"])
    ckpt = save_checkpoint(tmp_path / "u.pt", model=create_model("unet"), config=cfg.to_dict(), phase="train",
                           epoch=0)
    image = shared_data / "he_samples" / "histo.jpg"
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "pred")]) == 0
    labels = cv2.imread(str(tmp_path / "pred" / "histo_labels.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(tmp_path / "pred" / "histo_overlay.png"))
    assert labels.shape == (300, 500) and overlay.shape == (300, 500, 3)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
    geo = json.loads((tmp_path / "pred" / "histo.geojson").read_text())
    assert len(geo["features"]) == len(to_geojson(labels)["features"])
    # a missing input names the file and exits 2
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2


def test_predict_feeds_the_model_the_checkpoints_stain_normalisation(tmp_path, monkeypatch):
    # a model trained on Macenko-normalised crops must predict on normalised images too (predict applied
    # none: a macenko checkpoint saw raw colours); --bgr swaps R and B first, as the folder reader does
    import cv2

    from nas_core.data.stain import StainNormalizer
    from nas_core.data.synthetic import render_synthetic
    from nas_core.engine import evaluate as evaluate_mod
    from nas_core.engine.checkpoint import save_checkpoint
    from nas_core.engine.predict import predict_files
    from nas_core.models import create_model

    image, _, _ = render_synthetic((64, 80), np.random.default_rng(3))
    path = tmp_path / "he.png"
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    cfg = load_config(overrides=["model.name=unet", "data.crop_size=32", "data.stride=32", "data.stain=macenko"])
    ckpt = save_checkpoint(tmp_path / "u.pt", model=create_model("unet"), config=cfg.to_dict(), phase="train",
                           epoch=0)
    seen = []
    real = evaluate_mod.predict_probs
    monkeypatch.setattr(evaluate_mod, "predict_probs", lambda model, img, **kw: seen.append(img) or real(model, img, **kw))
    predict_files(ckpt, [path], tmp_path / "out", device="cpu")
    predict_files(ckpt, [path], tmp_path / "out2", device="cpu", bgr=True)
    expected = StainNormalizer("macenko")(image)
    assert not np.array_equal(expected, image)  # normalisation changes this image
    np.testing.assert_array_equal(seen[0], expected)
    np.testing.assert_array_equal(seen[1], StainNormalizer("macenko")(np.ascontiguousarray(image[..., ::-1])))


def test_uniform_sampler_feeds_the_loops_windows_of_every_kind(data_root, tmp_path, monkeypatch):
    """train.sampler / search.sampler reach the loops: uniform batches may hold windows without a nucleus
    (the balanced sampler's buckets never do) and have the balanced batch size."""
    from nas_core.data import dataset as ds

    seen = {"uniform": [], "balanced": []}
    real_u, real_b = ds.UniformBatchSampler.batch, ds.ClassBalancedBatchSampler.batch
    monkeypatch.setattr(ds.UniformBatchSampler, "batch", lambda s, k: seen["uniform"].append(real_u(s, k))
                        or seen["uniform"][-1])
    monkeypatch.setattr(ds.ClassBalancedBatchSampler, "batch", lambda s, k: seen["balanced"].append(real_b(s, k))
                        or seen["balanced"][-1])
    cfg = tiny_cfg(data_root, "model.name=nas-scam-p", "search.sampler=uniform")
    run_search(cfg, tmp_path / "search")
    assert seen["uniform"] and not seen["balanced"]  # w and alpha batches both uniform
    run_train(tiny_cfg(data_root, "model.name=unet", "train.sampler=uniform", "train.epochs=1",
                       "train.iters_per_epoch=40"), tmp_path / "train")
    bucketed = set()
    from nas_core.data.prepare import ensure_dataset

    data = ensure_dataset(cfg.data, data_root, cfg.data.seed, progress=False)
    for v in data.buckets.values():
        bucketed |= {int(i) for i in v}
    drawn = {i for b in seen["uniform"][-40:] for i in b}
    n_windows = len(data.crops("train"))
    assert all(len(b) == len(set(b)) == sum(1 for v in data.buckets.values() if len(v)) for b in seen["uniform"][-40:])
    assert drawn <= set(range(n_windows))
    if len(bucketed) < n_windows:  # windows without a nucleus exist: uniform batches reach them
        assert drawn - bucketed


# ---------------------------------------------------------------- the loops' non-finite guard
def _ctx(max_in_row: int = 3):
    from nas_core.engine.loop import RunContext, StepGuard

    cfg = load_config(overrides=[f"max_nonfinite_steps={max_in_row}"])
    return RunContext(cfg=cfg, out_dir=Path("."), device=torch.device("cpu"), data=None,
                      loss_fn=lambda probs, target, ignore: ((probs - target) ** 2).mean(),
                      guard=StepGuard(cfg.max_nonfinite_steps))


def test_a_non_finite_gradient_skips_the_step_and_too_many_fail_the_run():
    from nas_core.engine.loop import optimisation_step

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ctx = _ctx()
    batch = {"image": torch.randn(2, 3, 4, 4), "target": torch.rand(2, 4, 4, 4)}
    finite = ctx.loss_fn

    def nan_grad(probs, target, ignore):
        # value finite, gradient NaN: 0 * d sqrt(x)/dx at x = 0 is 0 * inf
        return finite(probs, target, ignore) + 0.0 * torch.sqrt(probs.sum() * 0.0)

    before = [p.detach().clone() for p in model.parameters()]
    ctx.loss_fn = nan_grad
    assert optimisation_step(model, batch, opt, ctx, "here") is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched
    assert not opt.state  # Adam's moments never saw the NaN
    ctx.loss_fn = finite
    loss = optimisation_step(model, batch, opt, ctx, "here")
    assert loss is not None and np.isfinite(loss) and ctx.guard.in_row == 0
    assert ctx.guard.take() == 1 and ctx.guard.take() == 0
    ctx.loss_fn = lambda probs, target, ignore: finite(probs, target, ignore) * float("nan")
    assert optimisation_step(model, batch, opt, ctx, "search epoch 4 iteration 0") is None
    assert optimisation_step(model, batch, opt, ctx, "search epoch 4 iteration 1") is None
    with pytest.raises(TrainingError, match=r"search epoch 4 iteration 2: the loss is nan, 3 steps in a row"):
        optimisation_step(model, batch, opt, ctx, "search epoch 4 iteration 2")


def test_a_retrain_skips_and_counts_a_non_finite_step(tmp_path, monkeypatch):
    import nas_core.losses as losses

    real = losses.create_loss
    calls = {"n": 0}

    def create_loss(name):
        fn = real(name)

        def loss(probs, target, ignore=None):
            calls["n"] += 1
            value = fn(probs, target, ignore)
            return value * float("nan") if calls["n"] == 2 else value  # the second step only
        return loss

    monkeypatch.setattr(losses, "create_loss", create_loss)
    cfg = load_config(overrides=[
        f"data.cache_dir={tmp_path / 'data'}", "data.synthetic_images=4", "data.synthetic_size=64",
        "data.crop_size=32", "data.stride=32", "data.split=0.5,0.25,0.25", "model.name=unet",
        "train.epochs=2", "train.iters_per_epoch=3"])
    res = run_train(cfg, tmp_path / "train")
    assert [h["skipped_steps"] for h in res.history] == [1, 0]
    assert all(np.isfinite(h["train_loss"]) for h in res.history)
