"""Reading a prepared cache: PreparedData, CropDataset, ClassBalancedBatchSampler, make_loader."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .readers import NUM_CLASSES, DataError
from .tiling import pad_window

ImageKey = Union[int, str]


class PreparedData:
    """A prepared cache (see prepare.py). Images are memory-mapped; ``preload()`` reads them into RAM."""

    def __init__(self, root: Path, manifest: dict, class_stats: dict):
        self.root = Path(root)
        self.manifest = manifest
        self.class_stats = class_stats
        self.crop_size = int(manifest["options"]["crop_size"])
        self.stride = int(manifest["options"]["stride"])
        self.grid = str(manifest["options"].get("grid", "flush"))  # caches before version 2: flush grid
        self._index = {m["id"]: m["index"] for m in manifest["images"]}
        self._crops = {s: np.load(self.root / f"crops_{s}.npy") for s in ("train", "val", "test")}
        # class buckets (crop indices in stored order): training crops for w, validation crops for alpha
        self.buckets = {c: np.load(self.root / f"bucket_{c}.npy") for c in range(1, NUM_CLASSES + 1)}
        self.alpha_buckets = {c: _load_or_empty(self.root / f"bucket_val_{c}.npy") for c in range(1, NUM_CLASSES + 1)}
        self._cache: dict = {}

    @classmethod
    def open(cls, cache_dir: str | Path) -> "PreparedData":
        root = Path(cache_dir)
        mf = root / "manifest.json"
        if not mf.is_file():
            raise DataError(f"{root}: not a prepared dataset (no manifest.json); run `nas-scam data prepare`")
        return cls(root, json.loads(mf.read_text()), json.loads((root / "class_stats.json").read_text()))

    # ---- images
    def image_ids(self, split: Optional[str] = None) -> list[str]:
        """Image ids of a split (train | val | alpha (= val) | test), or all when None."""
        if split is None:
            return [m["id"] for m in self.manifest["images"]]
        return list(self.manifest["splits"][_split_name(split)])

    def index_of(self, key: ImageKey) -> int:
        if isinstance(key, (int, np.integer)):
            return int(key)
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"image id {key!r} is not in {self.root}") from None

    def _load(self, kind: str, key: ImageKey) -> np.ndarray:
        i = self.index_of(key)
        arr = self._cache.get((kind, i))
        if arr is None:
            arr = np.load(self.root / kind / f"{i:04d}.npy", mmap_mode="r")
        return arr

    def load_image(self, key: ImageKey) -> np.ndarray:
        return self._load("images", key)  # (H, W, 3) uint8 RGB

    def load_label(self, key: ImageKey) -> np.ndarray:
        return self._load("labels", key)  # (H, W) uint8

    def load_ignore(self, key: ImageKey) -> np.ndarray:
        return self._load("ignore", key)  # (H, W) bool

    def load_instances(self, key: ImageKey) -> np.ndarray:
        return self._load("instances", key)  # (H, W) int32

    def preload(self, split: Optional[str] = None) -> "PreparedData":
        """Read a split's (or all) images/labels/ignore masks into memory (small datasets)."""
        for key in self.image_ids(split):
            i = self.index_of(key)
            for kind in ("images", "labels", "ignore"):
                if (kind, i) not in self._cache:
                    self._cache[(kind, i)] = np.load(self.root / kind / f"{i:04d}.npy")
        return self

    # ---- crops
    def crops(self, split: str) -> np.ndarray:
        """(N, 3) int64 rows (image index, y, x); ``alpha`` = the validation images' crops."""
        return self._crops[_split_name(split)]

    def __repr__(self) -> str:
        n = {s: len(self.image_ids(s)) for s in ("train", "val", "test")}
        return f"PreparedData({self.root}, images={n}, crop={self.crop_size}/{self.stride})"


def _load_or_empty(path: Path) -> np.ndarray:
    return np.load(path) if path.is_file() else np.zeros(0, np.int64)


def _split_name(split: str) -> str:
    if split == "alpha":
        return "val"
    if split not in ("train", "val", "test"):
        raise ValueError(f"split {split!r}: expected train, val, alpha or test")
    return split


class CropDataset(Dataset):
    """Crops of one split. Item: {"image": float32 (3, h, w) in [0, 1], "target": float32 (4, h, w)
    multi-hot (channel c-1 = class c), "ignore": bool (h, w)}. Padding beyond the image border is
    ignored. ``transform``: an augment.OneOf (see augment.py) or None."""

    def __init__(self, data: PreparedData, split: str, transform: Optional[Callable] = None,
                 preload: bool = True):
        self.data, self.split, self.transform = data, split, transform
        self.rows = data.crops(split)
        if preload:
            data.preload(split)

    def __len__(self) -> int:
        return len(self.rows)

    def reseed(self, seed: int) -> None:
        """Give the transform its own random stream (called per DataLoader worker)."""
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(seed) % (2 ** 32))

    def __getitem__(self, k: int) -> dict:
        i, y, x = (int(v) for v in self.rows[k])
        t = self.data.crop_size
        image = pad_window(np.asarray(self.data.load_image(i)), y, x, t)
        label = pad_window(np.asarray(self.data.load_label(i)), y, x, t)
        ignore = pad_window(np.asarray(self.data.load_ignore(i)), y, x, t, fill=True)
        if self.transform is not None:
            out = self.transform(image=image, masks=[label, ignore.astype(np.uint8)])
            image, (label, ign) = out["image"], out["masks"]
            ignore = ign.astype(bool)
        target = np.stack([label == c for c in range(1, NUM_CLASSES + 1)]).astype(np.float32)
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0),
                "target": torch.from_numpy(target),
                "ignore": torch.from_numpy(np.ascontiguousarray(ignore))}


def anchor_length(buckets: dict) -> tuple[int, int]:
    """(class, size) of the bucket that sets the epoch length: class 1 (Epithelial) as in the release,
    or the largest bucket when class 1 has no crop (a dataset without that class)."""
    sizes = {int(c): len(v) for c, v in buckets.items()}
    if sizes.get(1, 0):
        return 1, sizes[1]
    c = max(sizes, key=lambda k: (sizes[k], -k), default=1)
    return c, sizes.get(c, 0)


def release_epoch_length(buckets: dict) -> int:
    """Iterations of one epoch by the release's rule: ``ceil(n1 / 2)``, n1 = crops in the class-1
    bucket (2,445 training crops -> 1,223; 1,017 alpha-update crops -> 509); see :func:`anchor_length`."""
    _, n = anchor_length(buckets)
    if n == 0:
        raise ValueError("every class bucket is empty (no crop has a nucleus): no epoch can be formed")
    return math.ceil(n / 2)


class ClassBalancedBatchSampler(Sampler):
    """Class-balanced batches the way the release draws them (method.md 5a).

    Every batch takes ``per_class`` crops from each non-empty class bucket, walking each bucket in its
    stored order and wrapping around, then puts the crops in a random order. The sampler is one
    window of an endless stream: ``start`` batches were drawn before it (by earlier epochs), so the
    walk goes on where they left it, as the release's one generator per stream does across epochs.
    Batch ``k`` depends only on (buckets, per_class, seed, start + k): resuming or rebuilding the
    sampler per epoch changes nothing. ``num_batches`` None = :func:`release_epoch_length`.
    """

    def __init__(self, buckets: dict, per_class: int = 1, num_batches: Optional[int] = None,
                 seed: int = 0, start: int = 0):
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.buckets = {int(c): np.asarray(v, np.int64) for c, v in sorted(buckets.items()) if len(v)}
        empty = sorted(int(c) for c, v in buckets.items() if not len(v))
        if not self.buckets:
            raise ValueError("ClassBalancedBatchSampler: every class bucket is empty (no crop has a nucleus)")
        if empty:
            warnings.warn(f"class bucket(s) {empty} are empty and skipped: batches have "
                          f"{len(self.buckets) * per_class} crops", stacklevel=2)
        self.per_class, self.seed, self.start = per_class, seed, start
        self.num_batches = num_batches if num_batches is not None else release_epoch_length(self.buckets)

    @property
    def batch_size(self) -> int:
        return self.per_class * len(self.buckets)

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, k: int) -> list[int]:
        """The stream's batch number ``k`` (0 = the first batch ever drawn)."""
        picks = [int(v[(k * self.per_class + j) % len(v)]) for v in self.buckets.values()
                 for j in range(self.per_class)]
        order = np.random.default_rng([self.seed, k]).permutation(len(picks))
        return [picks[i] for i in order]

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.start + self.num_batches):
            yield self.batch(k)


class UniformBatchSampler(Sampler):
    """Batches of crops drawn uniformly at random from all windows of a split (``train.sampler: uniform``).

    The alternative to :class:`ClassBalancedBatchSampler` for small datasets, where one crop per class
    bucket builds a quarter of every batch around a handful of rare nuclei: here every window of the
    split's crop grid (those without a nucleus included) is equally likely, so classes appear at their
    natural frequency. Each batch draws ``batch_size`` distinct windows; batch ``k`` depends only on
    (windows, batch_size, seed, start + k), like the balanced sampler, so resuming changes nothing.
    """

    def __init__(self, num_windows: int, batch_size: int, num_batches: int, seed: int = 0, start: int = 0):
        if num_windows < 1:
            raise ValueError("UniformBatchSampler: the split has no crop window")
        if batch_size < 1 or num_batches < 0 or start < 0:
            raise ValueError(f"batch_size {batch_size} must be >= 1, num_batches {num_batches} and start {start} >= 0")
        self.num_windows, self.size = int(num_windows), int(batch_size)
        self.num_batches, self.seed, self.start = int(num_batches), seed, start

    @property
    def batch_size(self) -> int:
        return self.size

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, k: int) -> list[int]:
        """The stream's batch number ``k``: window indices into the split's crop rows."""
        rng = np.random.default_rng([self.seed, k, 1])  # 1: a stream apart from the balanced sampler's
        return [int(i) for i in rng.choice(self.num_windows, size=min(self.size, self.num_windows), replace=False)]

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, self.start + self.num_batches):
            yield self.batch(k)


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % (2 ** 32))
    if hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed)


def make_loader(dataset: Dataset, batch_sampler: Optional[Sampler] = None, workers: int = 0,
                pin_memory: bool = False, batch_size: int = 4, shuffle: bool = False,
                seed: int = 0) -> DataLoader:
    """DataLoader over a CropDataset. With ``batch_sampler`` (training) its batches are used; without
    one (evaluation) fixed-size batches in order. Workers reseed the augmentation from torch's
    per-worker seed, which a seeded generator makes reproducible. Batches: image (B, 3, h, w),
    target (B, 4, h, w), ignore (B, h, w)."""
    gen = torch.Generator().manual_seed(seed)
    if workers == 0 and hasattr(dataset, "reseed"):
        dataset.reseed(seed)
    common = dict(num_workers=workers, pin_memory=pin_memory, generator=gen,
                  worker_init_fn=_worker_init if workers > 0 else None,
                  persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, **common)
