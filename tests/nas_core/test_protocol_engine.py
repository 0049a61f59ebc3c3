"""The loops do what method.md 5a says the release does: epoch lengths, bucket streams, alpha batches,
validation timing and the genotype window. Optimisation steps and validation scores are replaced by
recorders here, so 70-epoch schedules run in seconds; the real steps are covered by test_engine.py."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nas_core.config import ConfigError, load_config
from nas_core.engine import batches as batch_streams
from nas_core.engine import context, run_search, run_train, tail
from nas_core.engine import search as search_mod
from nas_core.engine import train as train_mod
from nas_core.search_space.genotype import Genotype

TINY = ["data.synthetic_images=6", "data.synthetic_size=128", "data.crop_size=32", "data.stride=32",
        "data.split=0.5,0.25,0.25"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _buckets(*sizes):
    out, k = {}, 0
    for c, n in enumerate(sizes, start=1):
        out[c] = np.arange(k, k + n)
        k += n
    return out


def _fake_data(train_sizes, alpha_sizes, n_train=100, n_alpha=40):
    return SimpleNamespace(buckets=_buckets(*train_sizes), alpha_buckets=_buckets(*alpha_sizes),
                           crops=lambda split: np.zeros((n_train if split == "train" else n_alpha, 3)))


def test_epoch_lengths_come_from_the_class_1_buckets():
    code = load_config(overrides=["protocol=code"])
    n = batch_streams.epoch_lengths(code, _fake_data((10, 5, 3, 2), (7, 1, 0, 2)))
    assert (n["w"], n["alpha"], n["train"]) == (5, 4, 5)
    assert n["batch"] == {"w": 4, "alpha": 3, "train": 4}  # an empty alpha bucket is skipped
    assert n["crops"] == {"train": 100, "alpha": 40} and n["bucketed"] == {"train": 20, "alpha": 10}
    # the release's MoNuSAC buckets: 2,445 / 1,017 class-1 crops
    n = batch_streams.epoch_lengths(code, _fake_data((2445, 1588, 401, 369), (1017, 543, 85, 92)))
    assert (n["w"], n["alpha"], n["train"]) == (1223, 509, 1223)
    # paper: the same composition (the paper gives none); an explicit length overrides every epoch kind
    paper = load_config(overrides=["search.iters_per_epoch=3", "train.iters_per_epoch=2"])
    n = batch_streams.epoch_lengths(paper, _fake_data((10, 5, 3, 2), (7, 1, 0, 2)))
    assert (n["w"], n["alpha"], n["train"]) == (3, 3, 2)
    assert batch_streams.search_steps("w", n) == (3, 0) and batch_streams.search_steps("alpha", n) == (0, 3)
    assert batch_streams.search_steps("alternate", n) == (3, 3)  # paper: one alpha step after every w step


def test_validation_schedules_and_genotype_windows():
    code = load_config(overrides=["protocol=code"])
    assert code.search.validation_epochs() == list(range(0, 120, 3))  # never after the last epoch
    assert code.search.genotype_epochs() == list(range(63, 120, 3))
    assert code.train.validation_epochs() == list(range(0, 300, 3))
    paper = load_config()
    assert paper.search.genotype_epochs()[:2] == [42, 45]  # after the 40-epoch warm-up
    assert load_config(overrides=["protocol=code", "search.epochs=70"]).search.genotype_epochs() == [63, 66, 69]
    end = load_config(overrides=["search.val_timing=end", "search.val_every=1", "search.epochs=5",
                                 "search.warmup_epochs=2"])
    assert end.search.validation_epochs() == [0, 1, 2, 3, 4] and end.search.genotype_epochs() == [2, 3, 4]
    with pytest.raises(ConfigError, match="search.genotype_after: no validation can give the genotype"):
        load_config(overrides=["protocol=code", "search.epochs=63"])
    with pytest.raises(ConfigError, match="search.val_timing"):
        load_config(overrides=["search.val_timing=middle"])


def _skip_last_checkpoint(monkeypatch, module):
    """Pickling the supernet's resumable state every epoch is most of a 70-epoch schedule's time on a
    CPU; these tests are about the schedule, so only best.pt (which gives the genotype) is written."""
    real = module.save_checkpoint

    def save(path, **kw):
        return path if path.name == "last.pt" else real(path, **kw)
    monkeypatch.setattr(module, "save_checkpoint", save)


class Recorder:
    """Stands in for optimisation_step (no gradient work) and evaluate_split (scripted scores)."""

    def __init__(self, scores):
        self.scores, self.steps, self.validated, self.genotypes = scores, [], [], {}
        self.gen = torch.Generator().manual_seed(0)

    def step(self, model, batch, optimizer, ctx, where):
        assert batch["image"].shape[0] == sum(1 for v in ctx.data.buckets.values() if len(v))
        kind = "alpha" if "alpha step" in where else "w"
        epoch = int(where.split(" epoch ")[1].split()[0])
        self.steps.append((epoch, kind))
        if kind == "alpha":  # move alpha so that every epoch has its own genotype
            with torch.no_grad():
                for p in model.arch_parameters():
                    p.add_(torch.randn(p.shape, generator=self.gen))
        return 0.5

    def evaluate(self, model, data, split, **kw):
        epoch = len(self.validated) * 3
        self.validated.append(epoch)
        if hasattr(model, "genotype"):
            self.genotypes[epoch] = model.genotype().to_dict()
        score = self.scores(epoch)
        return {"dsc": {"Average": score}, "pq": {"Average": 0.0}}


def test_code_search_of_70_epochs_takes_the_genotype_from_63_66_or_69(data_root, tmp_path, monkeypatch):
    # the best score of all is at epoch 30, outside the release's window (epochs > 60)
    scores = {30: 0.9, 63: 0.5, 66: 0.7, 69: 0.6}
    rec = Recorder(lambda e: scores.get(e, 0.1))
    monkeypatch.setattr(search_mod, "optimisation_step", rec.step)
    monkeypatch.setattr(tail, "evaluate_split", rec.evaluate)
    _skip_last_checkpoint(monkeypatch, tail)
    starts = []
    real = {"w": search_mod.train_batches, "alpha": search_mod.alpha_batches}

    def spy(kind):
        def batches(ctx, per_class, n, epoch, start, sampler="balanced"):
            starts.append((epoch, kind, n, start))
            return real[kind](ctx, per_class, n, epoch, start, sampler)
        return batches
    monkeypatch.setattr(search_mod, "train_batches", spy("w"))
    monkeypatch.setattr(search_mod, "alpha_batches", spy("alpha"))

    cfg = load_config(overrides=[*TINY, f"data.cache_dir={data_root}", "protocol=code", "search.epochs=70"])
    res = run_search(cfg, tmp_path / "s")
    assert rec.validated == list(range(0, 70, 3))  # at the start of 0, 3, ..., 69; never after epoch 69
    assert res.best_epoch == 66
    assert res.genotype.to_dict() == rec.genotypes[66] != rec.genotypes[63]
    assert Genotype.load(res.genotype_path) == res.genotype

    # epoch lengths from the class-1 buckets; w-epochs: epoch < 20 or epoch % 3 == 0
    from nas_core.data import ensure_dataset

    data = ensure_dataset(cfg.data, data_root, cfg.data.seed, progress=False)
    n_w, n_a = math.ceil(len(data.buckets[1]) / 2), math.ceil(len(data.alpha_buckets[1]) / 2)
    per_epoch = {e: [k for ep, k in rec.steps if ep == e] for e in range(70)}
    for e in range(70):
        w_epoch = e < 20 or e % 3 == 0
        assert per_epoch[e] == (["w"] * n_w if w_epoch else ["alpha"] * n_a), e
    # each stream goes on where its previous epoch stopped
    for kind in ("w", "alpha"):
        seq = [(n, start) for _, k, n, start in starts if k == kind]
        assert [s for _, s in seq] == list(np.cumsum([0] + [n for n, _ in seq[:-1]]))


def test_paper_search_alternates_per_iteration_after_the_warm_up(data_root, tmp_path, monkeypatch):
    rec = Recorder(lambda e: float(e))
    monkeypatch.setattr(search_mod, "optimisation_step", rec.step)
    monkeypatch.setattr(tail, "evaluate_split", rec.evaluate)
    _skip_last_checkpoint(monkeypatch, tail)
    cfg = load_config(overrides=[*TINY, f"data.cache_dir={data_root}", "search.epochs=7", "search.warmup_epochs=2",
                                 "search.iters_per_epoch=3"])
    res = run_search(cfg, tmp_path / "s")
    assert rec.validated == [0, 3, 6] and res.best_epoch == 6  # window: epochs > warm-up (2)
    assert [k for e, k in rec.steps if e == 1] == ["w"] * 3
    assert [k for e, k in rec.steps if e == 2] == ["w", "alpha"] * 3


def test_retrain_keeps_the_best_of_all_validations(data_root, tmp_path, monkeypatch):
    rec = Recorder(lambda e: 0.9 if e == 0 else 0.2 + e / 100)
    monkeypatch.setattr(train_mod, "optimisation_step", rec.step)
    evaluate = lambda model, data, split, **kw: (  # noqa: E731
        rec.evaluate(model, data, split) if split == "val" else {"dsc": {"Average": 0.0}})
    monkeypatch.setattr(tail, "evaluate_split", evaluate)  # validations (the epoch tail)
    monkeypatch.setattr(train_mod, "evaluate_split", evaluate)  # the test split
    cfg = load_config(overrides=[*TINY, f"data.cache_dir={data_root}", "protocol=code", "model.name=unet",
                                 "train.epochs=8"])
    res = run_train(cfg, tmp_path / "t")
    assert rec.validated == [0, 3, 6]
    assert res.best_epoch == 0  # the release keeps the untrained state when it validates best
    from nas_core.data import ensure_dataset

    data = ensure_dataset(cfg.data, data_root, cfg.data.seed, progress=False)
    assert len(rec.steps) == 8 * math.ceil(len(data.buckets[1]) / 2)


def test_alpha_batches_are_class_balanced_augmented_validation_crops(data_root, tmp_path):
    cfg = load_config(overrides=[*TINY, f"data.cache_dir={data_root}", "protocol=code"])
    ctx = context.setup_run(cfg, tmp_path / "run")
    seen = []
    ds = ctx.dataset("val", augment=True)
    assert ds.transform.choices == ctx.dataset("train", augment=True).transform.choices == (("gaussian_blur", 0.2),)
    orig = type(ds).__getitem__

    def spy(self, k):
        seen.append((self.split, k))
        return orig(self, k)
    type(ds).__getitem__ = spy
    try:
        batches = list(batch_streams.alpha_batches(ctx, 1, 3, epoch=0, start=2))
    finally:
        type(ds).__getitem__ = orig
    assert all(split == "val" for split, _ in seen) and len(seen) == 3 * len(batches[0]["image"])
    present = [c for c, v in sorted(ctx.data.alpha_buckets.items()) if len(v)]
    for b, idx in zip(range(3), range(0, len(seen), len(present))):
        ks = sorted(k for _, k in seen[idx:idx + len(present)])
        want = sorted(int(ctx.data.alpha_buckets[c][(2 + b) % len(ctx.data.alpha_buckets[c])]) for c in present)
        assert ks == want  # one crop of every alpha bucket, walked in stored order from batch 2


class _Everywhere(torch.nn.Module):
    """Says every class everywhere: (B, 4, H, W) ones, so any padding it saw would be counted."""

    def forward(self, x):
        return torch.ones(x.shape[0], 4, *x.shape[2:])


def test_padding_never_reaches_a_metric_and_is_ignored_in_crops(data_root):
    from nas_core.data import CropDataset, ensure_dataset
    from nas_core.engine.evaluate import evaluate_images

    image = np.random.default_rng(0).integers(0, 255, (75, 75, 3), dtype=np.uint8)
    label = np.zeros((75, 75), np.uint8)
    label[10:30, 10:30] = 1
    # release grid, 32/16: windows at 0..64 per axis reach 96 px; the stitched output is cropped to 75
    res = evaluate_images(_Everywhere(), [(image, label, None, None)], tile=32, stride=16)
    assert res["dsc"]["Epithelial"] == pytest.approx(2 * 400 / (75 * 75 + 400))
    # training / alpha crops: the zero padding beyond the image is marked ignore (the loss skips it)
    cfg = load_config(overrides=[*TINY, f"data.cache_dir={data_root}"])
    data = ensure_dataset(cfg.data, data_root, cfg.data.seed, progress=False)
    ds = CropDataset(data, "train")
    rows = data.crops("train")
    # 128 px, 32/32: windows at 0, 32, 64, 96 and 128 (the release's 128 // 32 + 1); the last is padding
    k = next(i for i, (_, y, x) in enumerate(rows) if y == 0 and x == 128)
    item = ds[k]
    assert item["ignore"].all() and item["image"].abs().sum() == 0 and item["target"].sum() == 0
    assert k not in np.concatenate(list(data.buckets.values()))  # no nucleus: never drawn
    inside = ds[next(i for i, (_, y, x) in enumerate(rows) if y == 0 and x == 96)]
    assert not inside["ignore"].all()
