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
                   channel_order="rgb", grid="flush", progress=False)
    d = PreparedData.open(path)
    crops = d.crops("train")
    assert len(crops) == 12  # flush grid: 3 images x 2x2 crops
    by_pos = {(int(y), int(x)): set() for _, y, x in crops}
    for c, idx in d.buckets.items():
        for k in idx:
            by_pos[tuple(int(v) for v in crops[k][1:])].add(c)
    assert by_pos[(0, 0)] == {1} and by_pos[(32, 32)] == {2, 3} and by_pos[(0, 32)] == set()
    assert d.class_stats["train"]["empty_crops"] == 6
    # the release grid (stride = crop: 64 // 32 + 1 = 3 windows per axis): the windows at 64 are all
    # padding, hold no nucleus and stay out of the buckets; the buckets are the same crops
    d = PreparedData.open(prepare(tmp_path / "src", tmp_path / "cache", split="3,0,0", crop_size=32, stride=32,
                                  channel_order="rgb", progress=False))
    assert len(d.crops("train")) == 27 and d.class_stats["train"]["empty_crops"] == 21
    rows = {c: [tuple(d.crops("train")[k].tolist()) for k in v] for c, v in d.buckets.items()}
    assert rows[1] == [(i, 0, 0) for i in range(3)] and sorted(rows[2] + rows[3]) == [(i, 32, 32) for i in range(3)]


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
    # nothing half-written, old intact; the stain cache beside the caches holds only whole files
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "stain-normalised") == [first.name]
    assert all(p.name.endswith(".npy") and ".tmp" not in p.name for p in (tmp_path / "stain-normalised").iterdir())
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


def test_sampler_walks_buckets_in_stored_order_across_epochs():
    buckets = {1: np.arange(0, 10), 2: np.arange(10, 13), 3: np.array([20]), 4: np.arange(30, 35)}
    s = ClassBalancedBatchSampler(buckets, per_class=1, num_batches=7, seed=1)
    batches = list(s)
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)
    for k, b in enumerate(batches):
        # one crop of each bucket, each bucket walked in its stored order, wrapping around
        assert sorted(b) == sorted([k % 10, 10 + k % 3, 20, 30 + k % 5])
    # the crops sit in the batch in random order (not always bucket 1 first), reproducibly
    assert len({tuple(np.argsort(b)) for b in batches}) > 1
    assert list(ClassBalancedBatchSampler(buckets, 1, 7, seed=1)) == batches
    # a later epoch goes on where the stream stopped: batches 7.. of the same walk
    more = list(ClassBalancedBatchSampler(buckets, 1, 3, seed=1, start=7))
    assert more == [s.batch(k) for k in (7, 8, 9)] and sorted(more[0]) == [7, 11, 20, 32]
    two = list(ClassBalancedBatchSampler(buckets, per_class=2, num_batches=2, seed=0))
    assert sorted(two[1]) == sorted([2, 3, 12, 10, 20, 20, 32, 33])
    with pytest.warns(UserWarning, match=r"\[3\] are empty"):
        s2 = ClassBalancedBatchSampler({1: [0, 1], 2: [2], 3: [], 4: [5]}, seed=0)
    assert s2.batch_size == 3 and len(s2) == 1  # ceil(2 / 2)


def test_epoch_length_rule_from_the_class_1_bucket():
    from nas_core.data.dataset import anchor_length, release_epoch_length

    sizes = lambda *n: {c: np.arange(k) for c, k in enumerate(n, start=1)}  # noqa: E731
    assert release_epoch_length(sizes(10, 5, 3, 2)) == 5
    assert release_epoch_length(sizes(2445, 1588, 401, 369)) == 1223  # the release's numbers
    assert release_epoch_length(sizes(1017, 543, 85, 92)) == 509
    assert release_epoch_length(sizes(11, 50, 3, 2)) == 6  # class 1, not the largest
    assert anchor_length(sizes(0, 7, 9, 2)) == (3, 9)  # no class 1: the largest bucket
    with pytest.raises(ValueError, match="every class bucket is empty"):
        release_epoch_length(sizes(0, 0, 0, 0))


def test_one_of_picks_exactly_one_method_by_cumulative_probability(monkeypatch):
    from nas_core.data import augment
    from nas_core.data.augment import OneOf

    t = OneOf([("rotate", 0.2), ("flip", 0.3), ("elastic", 0.1)], seed=0)
    assert [t.pick(u) for u in (0.0, 0.2, 0.21, 0.5, 0.55, 0.6, 0.61, 0.99)] == \
        ["rotate", "rotate", "flip", "flip", "elastic", "elastic", None, None]
    calls = []
    for name in ("rotate", "flip", "elastic"):
        monkeypatch.setitem(augment.METHODS, name, lambda image, masks, rng, name=name: (calls.append(name), (image, masks))[1])
    img, lab = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    for _ in range(4000):
        n = len(calls)
        t(image=img, masks=[lab, lab])
        assert len(calls) - n <= 1  # never two methods on one crop
    share = {n: calls.count(n) / 4000 for n in ("rotate", "flip", "elastic")}
    assert share == pytest.approx({"rotate": 0.2, "flip": 0.3, "elastic": 0.1}, abs=0.03)
    with pytest.raises(ValueError, match="sum to 1.2"):
        OneOf([("rotate", 0.6), ("flip", 0.6)])
    with pytest.raises(ValueError, match="method 'warp'"):
        OneOf([("warp", 0.1)])


def test_pipelines_of_the_protocols():
    from nas_core.data.augment import PIPELINES

    assert build_augmentation("code").choices == (("gaussian_blur", 0.2),)
    assert [n for n, _ in build_augmentation("paper").choices] == \
        ["rotate", "flip", "gaussian_blur", "median_blur", "elastic"]
    assert sum(p for _, p in PIPELINES["paper"]) == pytest.approx(1.0)
    assert build_augmentation("paper", strength=0.5).choices[0] == ("rotate", 0.1)
    assert build_augmentation("none") is None and build_augmentation("code", strength=0) is None
    with pytest.raises(ValueError, match="pipeline 'x'"):
        build_augmentation("x")


@pytest.mark.parametrize("method", ["rotate", "flip", "gaussian_blur", "median_blur", "elastic"])
def test_each_method_keeps_labels_in_their_set(method):
    from nas_core.data.augment import METHODS

    img, label, _ = render_synthetic(128, np.random.default_rng(1))
    ignore = np.zeros_like(label)
    ignore[:10] = 1
    rng = np.random.default_rng(0)
    changed = blurred = 0
    for _ in range(6):
        out_img, (lab, ign) = METHODS[method](img.copy(), [label.copy(), ignore.copy()], rng)
        assert out_img.shape == img.shape and out_img.dtype == np.uint8
        assert lab.shape == label.shape and set(np.unique(lab)) <= set(np.unique(label))
        assert set(np.unique(ign)) <= {0, 1}
        changed += not np.array_equal(lab, label)
        blurred += not np.array_equal(out_img, img)
    if method in ("gaussian_blur", "median_blur"):
        assert changed == 0 and blurred >= 4  # sigma ~ U(0, 2): a tiny sigma may leave uint8 pixels as they were
    else:
        assert changed >= 5


def test_rotation_is_an_integer_angle_with_zero_fill_marked_ignore():
    from nas_core.data.augment import METHODS

    img = np.full((64, 64, 3), 200, np.uint8)
    lab = np.ones((64, 64), np.uint8)
    ign = np.zeros((64, 64), np.uint8)
    out, (lab2, ign2) = METHODS["rotate"](img, [lab, ign], np.random.default_rng(3))
    corner = ign2.astype(bool)
    assert corner[0, 0] and corner[-1, -1] and (out[0, 0] == 0).all() and lab2[0, 0] == 0
    assert not corner[32, 32] and lab2[32, 32] == 1


def test_elastic_field_equals_the_releases_3d_gaussian():
    from scipy.ndimage import gaussian_filter

    from nas_core.data.augment import smooth_field

    noise = np.random.default_rng(5).uniform(-1, 1, (48, 40, 7))
    for sigma in (0.07 * 40, 1.3):
        ref = gaussian_filter(noise, sigma, mode="reflect")[:, :, 3]  # what the release smooths
        np.testing.assert_allclose(smooth_field(noise, sigma), ref, atol=2e-6)


def test_elastic_strength_matches_the_release():
    from nas_core.data.augment import elastic_fields

    rng = np.random.default_rng(0)
    stds, affine_shift = [], []
    for _ in range(6):
        affine, dx, dy = elastic_fields(256, 256, rng)
        stds += [dx.std(), dy.std()]
        # the affine part moves the three control points by up to 0.09 W = 23 px
        pts = np.float32([[213, 213, 1], [213, 43, 1], [43, 43, 1]])
        affine_shift.append(np.abs(pts @ affine.T - pts[:, :2]).max())
    # release: sigma 0.07 W, alpha 3 W over 7 stacked planes -> about 2.9 px per axis at W = 256
    # (the former albumentations warp: 0.44 px)
    assert 2.4 < np.mean(stds) < 3.6, np.mean(stds)
    assert 3 < np.mean(affine_shift) <= 23.05
    # alpha and sigma are both fractions of W and the std goes as alpha / sigma: the same few pixels
    # at any crop width (smoother at larger W)
    small = [elastic_fields(64, 64, rng)[1].std() for _ in range(20)]
    assert 0.7 < np.mean(small) / np.mean(stds) < 1.4


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
    assert data.grid == "release" and sum(len(v) for v in data.alpha_buckets.values()) > 0
    b = batches[0]
    assert b["image"].shape == (4, 3, 64, 64) and b["image"].dtype == torch.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["target"].shape == (4, 4, 64, 64) and b["ignore"].shape == (4, 64, 64)
    # the batch holds one crop of each bucket (in random order), so every class is present
    assert all(b["target"][:, k].sum() > 0 for k in range(4))
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


def test_uniform_sampler_draws_distinct_windows_reproducibly():
    from nas_core.data.dataset import UniformBatchSampler

    s = UniformBatchSampler(num_windows=50, batch_size=4, num_batches=300, seed=3)
    batches = list(s)
    assert len(batches) == 300 and all(len(b) == len(set(b)) == 4 for b in batches)
    assert all(0 <= i < 50 for b in batches for i in b)
    counts = np.bincount([i for b in batches for i in b], minlength=50)
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()  # every window, none favoured
    # batch k depends only on (seed, k): a resumed stream continues where it stopped
    again = UniformBatchSampler(num_windows=50, batch_size=4, num_batches=100, seed=3, start=200)
    assert list(again) == batches[200:]
    assert list(UniformBatchSampler(50, 4, 5, seed=4)) != batches[:5]
    assert len(UniformBatchSampler(2, 4, 1).batch(0)) == 2  # fewer windows than a batch: all of them


def test_sampler_is_a_config_key_of_both_loops():
    from nas_core.config import ConfigError, load_config

    for protocol in ("paper", "code"):
        cfg = load_config(overrides=[f"protocol={protocol}"])
        assert (cfg.train.sampler, cfg.search.sampler) == ("balanced", "balanced")  # the release's
    cfg = load_config(overrides=["train.sampler=uniform", "search.sampler=uniform"])
    assert (cfg.train.sampler, cfg.search.sampler) == ("uniform", "uniform")
    with pytest.raises(ConfigError, match="train.sampler"):
        load_config(overrides=["train.sampler=random"])
