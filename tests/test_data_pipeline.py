"""Synthetic data, preparation cache, buckets, sampler, augmentation, stain normalisation, loader."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_core.config import DataConfig
from nas_core.data import prepare as prep_mod
from nas_core.data.augment import build_augmentation
from nas_core.data.dataset import ClassBalancedBatchSampler, CropDataset, PreparedData, make_loader
from nas_core.data.prepare import assign_splits, crop_bucket, ensure_dataset, parse_split, prepare
from nas_core.data.readers import DataError, list_samples
from nas_core.data.stain import StainNormalizer, macenko, macenko_stats, reinhard, reinhard_stats
from nas_core.data.synthetic import render_synthetic, write_synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("syn") / "src", n_images=6, size=256, seed=3)


def test_synthetic_round_trip_identical_masks(synth):
    layout, refs = list_samples(synth)
    assert layout == "monusac" and [r.patient for r in refs] == ["SYN-P001"] * 3 + ["SYN-P002"] * 3
    assert refs[0].id.endswith("_1") and refs[3].id.endswith("_001")  # suffix variants exercised
    for i, ref in enumerate(refs[:3]):
        s = ref.load()
        rng = np.random.default_rng(np.random.SeedSequence([3, i]))
        # regenerate without tint jitter: geometry and labels do not depend on colour
        _, label, nuclei = render_synthetic(256, rng, np.zeros(3, np.float32) + rng.normal(0, 2, 3).astype(np.float32))
        assert np.array_equal(s.label, label)
        assert sum(s.nuclei.values()) == len(nuclei) == s.instances.max()


def test_synthetic_deterministic(tmp_path):
    a = write_synthetic(tmp_path / "a", 2, 64, seed=5)
    b = write_synthetic(tmp_path / "b", 2, 64, seed=5)
    for f in sorted(a.rglob("*.*")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()


def test_synthetic_class_cues_and_imbalance():
    area, dark, count, present = {c: [] for c in range(1, 5)}, {c: [] for c in range(1, 5)}, np.zeros(5), np.zeros(5)
    import cv2
    for seed in range(8):
        img, label, nuclei = render_synthetic(256, np.random.default_rng(seed))
        gray = img.mean(2)
        for c, pts in nuclei:
            m = np.zeros(label.shape, np.uint8)
            cv2.fillPoly(m, [pts], 1)
            m = m.astype(bool) & (label == c)
            if m.sum() > 10:
                area[c].append(m.sum())
                dark[c].append(gray[m].mean())
            count[c] += 1
        present[np.unique(label)] += 1
    a = {c: np.mean(v) for c, v in area.items()}
    d = {c: np.mean(v) for c, v in dark.items()}
    assert a[4] > a[1] > a[3] > a[2]            # macrophage > epithelial > neutrophil > lymphocyte
    assert d[2] < d[3] < d[1] < d[4]            # lymphocyte darkest, macrophage palest
    assert count[1] > 4 * count[3] and count[2] > 4 * count[4]  # imbalance
    assert present[3] >= 6 and present[4] >= 6  # rare classes still in most images


def test_split_parsing():
    assert parse_split("120,39,50", 209) == [120, 39, 50]
    assert parse_split("0.6,0.2,0.2", 3) == [1, 1, 1]
    assert parse_split("0.6,0.2,0.2", 10) == [6, 2, 2]
    with pytest.raises(ValueError, match="sum to 208"):
        parse_split("120,39,49", 209)
    s = assign_splits(list("abcdef"), ["p", "p", "q", "q", "r", "r"], "0.34,0.33,0.33", "patient", 0)
    for i in (0, 2, 4):  # whole patients stay together
        assert s[i] == s[i + 1]


def test_bucket_rule():
    rarity = [3, 4, 2, 1]  # neutrophil rarest
    counts = lambda d: np.array([0] + [d.get(c, 0) for c in range(1, 5)])  # noqa: E731
    assert crop_bucket(counts({1: 500, 3: 4}), rarity) == 3
    assert crop_bucket(counts({1: 500, 2: 40, 4: 1}), rarity) == 4
    assert crop_bucket(counts({1: 500}), rarity) == 1
    assert crop_bucket(counts({}), rarity) == 0
    assert crop_bucket(counts({1: 500, 3: 4}), rarity, min_pixels=5) == 1


def test_prepare_buckets_on_hand_made_labels(tmp_path):
    import cv2
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "masks").mkdir()
    for k in range(3):
        lab = np.zeros((64, 64), np.uint8)
        lab[2:30, 2:30] = 1           # top-left: lots of class 1
        lab[40:44, 40:44] = 2 + k % 2  # bottom-right: a little class 2 or 3
        cv2.imwrite(str(tmp_path / "src" / "masks" / f"im_{k}.png"), lab)
        cv2.imwrite(str(tmp_path / "src" / "images" / f"im_{k}.png"), np.full((64, 64, 3), 200, np.uint8))
    path = prepare(tmp_path / "src", tmp_path / "cache", split="3,0,0", crop_size=32, stride=32,
                   channel_order="rgb", progress=False)
    d = PreparedData.open(path)
    crops = d.crops("train")
    assert len(crops) == 12  # 3 images x 2x2 crops
    by_pos = {(int(y), int(x)): set() for _, y, x in crops}
    for c, idx in d.buckets.items():
        for k in idx:
            by_pos[tuple(int(v) for v in crops[k][1:])].add(c)
    assert by_pos[(0, 0)] == {1} and by_pos[(32, 32)] == {2, 3} and by_pos[(0, 32)] == set()
    assert d.class_stats["train"]["empty_crops"] == 6


def test_prepare_idempotent_and_atomic(synth, tmp_path, monkeypatch):
    kw = dict(split="4,1,1", crop_size=128, stride=64, progress=False)
    first = prepare(synth, tmp_path, **kw)
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert prepare(synth, tmp_path, **kw) == first and (first / "manifest.json").stat().st_mtime_ns == mtime
    m = json.loads((first / "manifest.json").read_text())
    assert sorted(sum(m["splits"].values(), [])) == sorted(i["id"] for i in m["images"])

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated interruption")
    monkeypatch.setattr(prep_mod, "crop_bucket", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(synth, tmp_path, stain="reinhard", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # nothing half-written, old intact
    assert PreparedData.open(first).crops("train").shape[1] == 3


def test_skip_bad_reports_instead_of_failing(synth, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(synth, src)
    bad = sorted(src.rglob("*.xml"))[1]
    bad.write_text("<Annotations><broken")
    with pytest.raises(DataError, match=bad.name):
        prepare(src, tmp_path / "c", layout="monusac", split="0.6,0.2,0.2", progress=False)
    path = prepare(src, tmp_path / "c", layout="monusac", skip_bad=True, progress=False)
    m = json.loads((path / "manifest.json").read_text())
    assert len(m["images"]) == 5 and bad.name in m["skipped"][0]["error"]


def test_sampler_batches_and_seeding():
    buckets = {1: np.arange(0, 10), 2: np.arange(10, 13), 3: np.array([20]), 4: np.arange(30, 35)}
    s = ClassBalancedBatchSampler(buckets, per_class=2, num_batches=7, seed=1)
    batches = list(s)
    assert len(batches) == 7 and all(len(b) == 8 for b in batches)
    for b in batches:
        assert all(0 <= i < 10 for i in b[0:2]) and all(10 <= i < 13 for i in b[2:4])
        assert b[4:6] == [20, 20] and all(30 <= i < 35 for i in b[6:8])
    assert sorted(set(i for b in batches for i in b[0:2])) == list(range(10))  # permutation: all seen
    assert list(ClassBalancedBatchSampler(buckets, 2, 7, seed=1)) == batches
    s.set_epoch(1)
    assert list(s) != batches
    with pytest.warns(UserWarning, match=r"\[3\] are empty"):
        s2 = ClassBalancedBatchSampler({1: [0, 1], 2: [2], 3: [], 4: [5]}, seed=0)
    assert s2.batch_size == 3 and len(s2) == 2


@pytest.mark.parametrize("pipeline", ["paper", "code"])
def test_augmentation_keeps_labels(pipeline):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # albumentations 2.x warns about ignored arguments: none here
        t = build_augmentation(pipeline, strength=1.0, seed=0)
    img, label, _ = render_synthetic(128, np.random.default_rng(1))
    changed = 0
    for _ in range(30):
        out = t(image=img, masks=[label, np.zeros_like(label)])
        assert set(np.unique(out["masks"][0])) <= set(np.unique(label))
        assert out["image"].shape == img.shape and out["image"].dtype == np.uint8
        changed += not np.array_equal(out["masks"][0], label)
    assert (changed > 10) if pipeline == "paper" else changed == 0
    assert build_augmentation("none") is None
    with pytest.raises(ValueError, match="pipeline 'x'"):
        build_augmentation("x")


def test_stain_moves_statistics_toward_target():
    img, _, _ = render_synthetic(128, np.random.default_rng(2))
    target_img, _, _ = render_synthetic(128, np.random.default_rng(9), tint=np.array([-30, 10, 25], np.float32))
    target = reinhard_stats(target_img)
    before = np.abs(np.subtract(reinhard_stats(img)["mean"], target["mean"])).sum()
    n = StainNormalizer("reinhard").fit(target_img)
    after = np.abs(np.subtract(reinhard_stats(n(img))["mean"], target["mean"])).sum()
    assert after < 0.2 * before
    # Macenko on Beer-Lambert mixtures of two known stain pairs: the result carries the target's stains
    src, tgt = _two_stain_image(((0.65, 0.07), (0.70, 0.99), (0.29, 0.11)), 0), \
        _two_stain_image(((0.50, 0.25), (0.80, 0.80), (0.33, 0.55)), 1)
    norm = StainNormalizer("macenko").fit(tgt)
    err = lambda im: np.abs(macenko_stats(im)["stains"] - np.asarray(norm.target["stains"])).max()  # noqa: E731
    assert err(norm(src)) < 0.05 < err(src)
    # default targets work without any file
    assert reinhard(img).shape == img.shape and macenko(img).shape == img.shape


def _two_stain_image(stains, seed):
    rng = np.random.default_rng(seed)
    s = np.asarray(stains, float)
    s /= np.linalg.norm(s, axis=0)
    conc = np.stack([np.clip(rng.gamma(0.6, 0.6, 64 * 64), 0, 3), np.clip(rng.gamma(2.0, 0.2, 64 * 64), 0, 3)])
    return np.clip(240 * np.exp(-(s @ conc)).T, 0, 255).astype(np.uint8).reshape(64, 64, 3)


def test_stain_agrees_with_torchstain():
    ts = pytest.importorskip("torchstain.numpy.normalizers")
    src, _, _ = render_synthetic(96, np.random.default_rng(4))
    tgt, _, _ = render_synthetic(96, np.random.default_rng(5), tint=np.array([-20, 5, 20], np.float32))
    ref = ts.NumpyMacenkoNormalizer()
    ref.fit(tgt)
    ours = StainNormalizer("macenko").fit(tgt)
    assert np.allclose(np.asarray(ours.target["stains"]), ref.HERef, atol=1e-6)
    theirs, _, _ = ref.normalize(src, stains=False)
    assert np.abs(ours(src).astype(int) - theirs).mean() < 1.0
    r = ts.NumpyReinhardNormalizer()
    r.fit(tgt)
    assert np.abs(StainNormalizer("reinhard").fit(tgt)(src).astype(int) - r.normalize(src)).mean() < 1.5


def test_ensure_dataset_and_loader(tmp_path):
    cfg = DataConfig(synthetic_images=6, synthetic_size=128, crop_size=64, stride=32)
    data = ensure_dataset(cfg, tmp_path, seed=0, progress=False)
    again = ensure_dataset(cfg, tmp_path, seed=0, progress=False)
    assert data.root == again.root and (tmp_path / "synthetic").is_dir()
    assert data.crops("alpha").tolist() == data.crops("val").tolist()
    assert data.load_image(data.image_ids("train")[0]).shape == (128, 128, 3)
    ds = CropDataset(data, "train", transform=build_augmentation("paper", seed=0))
    sampler = ClassBalancedBatchSampler(data.buckets, per_class=1, num_batches=3, seed=0)
    batches = [b for b in make_loader(ds, sampler, workers=0, seed=0)]
    b = batches[0]
    assert b["image"].shape == (4, 3, 64, 64) and b["image"].dtype == torch.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["target"].shape == (4, 4, 64, 64) and b["ignore"].shape == (4, 64, 64)
    # crop k of the batch comes from bucket k+1, so it holds that class
    assert all(b["target"][k, k].sum() > 0 for k in range(4))
    ds2 = CropDataset(data, "train", transform=build_augmentation("paper", seed=0))
    sampler2 = ClassBalancedBatchSampler(data.buckets, per_class=1, num_batches=3, seed=0)
    again = [x for x in make_loader(ds2, sampler2, workers=0, seed=0)]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(batches, again))


def test_cli_data_commands(tmp_path, capsys):
    from orchestrator.cli import main
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--images", "3", "--size", "96"]) == 0
    assert main(["data", "inspect", str(tmp_path / "s"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert rep["layout"] == "monusac" and len(rep["images"]) == 3 and rep["mpp"] == [0.25]
    assert main(["data", "prepare", str(tmp_path / "s"), "--out", str(tmp_path / "c"), "--crop-size", "64",
                 "--stride", "32", "--split", "1,1,1"]) == 0
    assert main(["data", "inspect", str(tmp_path / "nothing")]) == 2
