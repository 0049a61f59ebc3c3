"""Dataset preparation: read any supported layout once, write a cache that training reads fast.

Cache folder ``<cache_root>/<layout>-<key>`` where ``key`` hashes the *source fingerprint* (every
file's relative path, size and mtime in nanoseconds; no pixel hashing, so a touched or copied dataset
is re-prepared) together with the options and ``CACHE_VERSION``. Contents::

    manifest.json        options, images (id, patient, split, shape, mpp, files), splits, warnings, skipped
    class_stats.json     per split: images, crops, pixels and nuclei per class; rarity order; bucket sizes
    images/NNNN.npy      (H, W, 3) uint8 RGB, stain-normalised
    labels/NNNN.npy      (H, W) uint8 class map     ignore/NNNN.npy (H, W) bool
    instances/NNNN.npy   (H, W) int32
    crops_{train,val,test}.npy   (N, 3) int64 rows (image index, y, x) of every window of the crop grid
                         (``grid``: release | flush, see tiling.py); alpha-update crops = crops_val
    bucket_{1..4}.npy    indices into crops_train: the crop's rarest present class (empty crops dropped)
    bucket_val_{1..4}.npy  the same rule over crops_val: the alpha-update buckets (method.md 5a: alpha
                         batches are class-balanced from the validation images' crops)

Built in a temporary sibling folder and renamed into place at the end, so an interrupted run leaves
any earlier cache untouched and no half-written one. A second call with the same inputs returns at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from .readers import NUM_CLASSES, DataError, list_samples
from .stain import StainError, StainNormalizer
from .tiling import GRIDS, pad_window, tile_positions

CACHE_VERSION = 2  # 2: crop grid option (release grid default), alpha-update buckets
SYNTHETIC_VERSION = 1
SPLITS = ("train", "val", "test")


def progress_bar(iterable=None, *, total: Optional[int] = None, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar on stderr, shown only on a terminal (tqdm's ``disable=None``), never when ``enabled`` is
    False or ``NAS_SCAM_PROGRESS=0`` (trials, tests); a disabled bar still counts and closes quietly."""
    from tqdm.auto import tqdm

    off = not enabled or os.environ.get("NAS_SCAM_PROGRESS") == "0"
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=True if off else None)


def source_fingerprint(source: Path) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file under ``source``."""
    h = hashlib.sha256()
    source = Path(source)
    for p in sorted(source.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            h.update(f"{p.relative_to(source).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def parse_split(spec: str, n: int) -> list[int]:
    """'120,39,50' (counts, must sum to n) or '0.6,0.2,0.2' (fractions) -> [train, val, test] counts."""
    try:
        parts = [float(x) for x in str(spec).split(",")]
    except ValueError:
        raise ValueError(f"split {spec!r}: expected three counts '120,39,50' or fractions '0.6,0.2,0.2'") from None
    if len(parts) != 3 or any(p < 0 for p in parts):
        raise ValueError(f"split {spec!r}: expected three non-negative numbers (train,val,test)")
    if all(p.is_integer() for p in parts) and sum(parts) > 1.0 + 1e-9:
        counts = [int(p) for p in parts]
        if sum(counts) != n:
            raise ValueError(f"split {spec!r}: counts sum to {sum(counts)} but there are {n} units to split")
        return counts
    if abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"split {spec!r}: fractions must sum to 1, got {sum(parts):g}")
    counts = [int(round(p * n)) for p in parts[:2]]
    counts.append(n - sum(counts))
    if counts[2] < 0:
        counts[1] += counts[2]
        counts[2] = 0
    # every split asked for gets at least one unit when there are enough units
    for i, p in enumerate(parts):
        if p > 0 and counts[i] == 0 and n >= sum(q > 0 for q in parts):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[i] += 1
    if counts[0] < 1:
        raise ValueError(f"split {spec!r}: no training image among {n}")
    return counts


def fold_groups(patients: list[str], folds: int, seed: int) -> list[list[str]]:
    """The patients dealt into ``folds`` groups: shuffled with ``seed``, then each patient (most images
    first) to the group with the fewest images so far, so the test sets are of similar size. Every
    patient is in exactly one group."""
    uniq = sorted(set(patients))
    if folds > len(uniq):
        raise ValueError(f"data.folds={folds}: only {len(uniq)} patients to deal into folds")
    rng = np.random.default_rng([seed, 17])
    order = [uniq[i] for i in rng.permutation(len(uniq))]
    order.sort(key=lambda p: -patients.count(p))  # stable: ties keep the shuffled order
    groups: list[list[str]] = [[] for _ in range(folds)]
    sizes = [0] * folds
    for p in order:
        g = min(range(folds), key=lambda i: (sizes[i], len(groups[i]), i))
        groups[g].append(p)
        sizes[g] += patients.count(p)
    return [sorted(g) for g in groups]


def _fold_splits(patients: list[str], split: str, folds: int, fold: int, seed: int) -> list[str]:
    """Split per image for fold ``fold``: its group tests; the other patients go to train / val by the
    train:val ratio of ``split`` (at least one val and one train patient), val drawn with ``seed``."""
    test = set(fold_groups(patients, folds, seed)[fold])
    rest = sorted(set(patients) - test)
    parts = [float(x) for x in str(split).split(",")]
    if len(parts) != 3 or any(x < 0 for x in parts) or parts[0] <= 0:
        raise ValueError(f"split {split!r}: expected three non-negative numbers (train,val,test)")
    n_val = int(round(len(rest) * parts[1] / (parts[0] + parts[1])))
    n_val = min(max(n_val, 1), len(rest) - 1)
    if n_val < 1:
        raise ValueError(f"data.folds={folds}: fold {fold} leaves {len(rest)} patient(s) for train and val; need 2")
    rng = np.random.default_rng([seed, 31, fold])
    val = {rest[i] for i in rng.permutation(len(rest))[:n_val]}
    return ["test" if p in test else "val" if p in val else "train" for p in patients]


def assign_splits(ids: list[str], patients: list[str], split: str, split_by: str, seed: int,
                  folds: int = 1, fold: int = 0) -> list[str]:
    """Split name per image. By image: shuffle and cut. By patient: whole patients, greedily to the
    split furthest below its image target (targets from ``split`` applied to images). With ``folds``
    > 1 (by patient only): fold ``fold`` of :func:`fold_groups` tests, the rest splits into train/val."""
    n = len(ids)
    if folds > 1:
        if split_by != "patient":
            raise ValueError(f"data.folds={folds} needs split_by 'patient', got {split_by!r}")
        return _fold_splits(patients, split, folds, fold, seed)
    rng = np.random.default_rng(seed)
    if split_by == "image":
        counts = parse_split(split, n)
        order = rng.permutation(n)
        out = [""] * n
        bounds = np.cumsum([0] + counts)
        for s, name in enumerate(SPLITS):
            for i in order[bounds[s]:bounds[s + 1]]:
                out[i] = name
        return out
    if split_by != "patient":
        raise ValueError(f"split_by {split_by!r}: expected 'image' or 'patient'")
    uniq = sorted(set(patients))
    targets = np.array(parse_split(split, len(uniq)) if _is_counts(split) else parse_split(split, n), float)
    if _is_counts(split):  # counts are patients; convert to image targets by mean images per patient
        targets = targets / max(len(uniq), 1) * n
    got = np.zeros(3)
    split_of = {}
    for p in [uniq[i] for i in rng.permutation(len(uniq))]:
        k = patients.count(p)
        s = int(np.argmax(targets - got))
        split_of[p] = SPLITS[s]
        got[s] += k
    return [split_of[p] for p in patients]


def _is_counts(split: str) -> bool:
    parts = [float(x) for x in split.split(",")]
    return all(p.is_integer() for p in parts) and sum(parts) > 1.0 + 1e-9


def crop_bucket(counts: np.ndarray, rarity_order: list[int], min_pixels: int = 1) -> int:
    """Bucket of a crop: the rarest class (first in ``rarity_order``) with >= ``min_pixels`` pixels;
    0 when no class is present. ``counts``: pixels per class id, length NUM_CLASSES + 1."""
    for c in rarity_order:
        if counts[c] >= min_pixels:
            return c
    return 0


def cache_key(source: Path, options: dict) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "src": source_fingerprint(source), "opt": options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def prepare(source: str | Path, cache_root: str | Path, *, layout: str = "auto", stain: str = "none",
            split: str = "0.6,0.2,0.2", split_by: str = "image", seed: int = 0, crop_size: int = 256,
            folds: int = 1, fold: int = 0,
            stride: int = 128, grid: str = "release", channel_order: str = "auto", stain_target: Optional[str] = None,
            min_pixels: int = 1, skip_bad: bool = False, progress: bool = True) -> Path:
    """Prepare ``source`` into ``cache_root``; returns the cache folder (see the module docstring).

    ``skip_bad``: files that fail to load are reported in manifest["skipped"] instead of aborting.
    Images smaller than a crop are kept: their one crop is zero-padded and the padding is ignored.
    """
    source, cache_root = Path(source), Path(cache_root)
    layout, refs = list_samples(source, layout=layout, channel_order=channel_order)
    if crop_size < 16 or not 0 < stride <= crop_size:
        raise ValueError(f"crop_size {crop_size} / stride {stride}: need crop_size >= 16 and 0 < stride <= crop_size")
    if grid not in GRIDS:
        raise ValueError(f"crop grid {grid!r}: expected one of {', '.join(GRIDS)}")
    options = {"layout": layout, "stain": stain, "split": str(split), "split_by": split_by, "seed": int(seed),
               "crop_size": int(crop_size), "stride": int(stride), "grid": grid, "channel_order": channel_order,
               "stain_target": _file_digest(stain_target), "min_pixels": int(min_pixels),
               "skip_bad": bool(skip_bad)}
    if folds > 1:  # only then: caches prepared before folds existed keep their keys
        options.update(folds=int(folds), fold=int(fold))
    normalizer = StainNormalizer(stain)
    if stain_target is not None and stain != "none":
        from .readers import read_image_file
        normalizer.fit(read_image_file(Path(stain_target)))
    final = cache_root / f"{layout}-{cache_key(source, options)}"
    return publish_atomically(final, "manifest.json",
                              lambda tmp: _build(tmp, source, refs, options, normalizer, progress,
                                                 cache_root / "stain-normalised"))


def publish_atomically(final: Path, marker: str, build) -> Path:
    """Build a folder in a temp sibling, then rename it into place; ``marker`` marks a complete one.

    An interrupted build leaves the previous folder (or nothing); a concurrent twin that finished
    first wins and our copy is discarded.
    """
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / marker).is_file():  # not a concurrent twin: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _file_digest(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"stain target image {p} does not exist")
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def _normalised(s, normalizer, stain_cache: Optional[Path], options: dict) -> np.ndarray:
    """``normalizer(s.image)``, kept in ``stain_cache`` per (image content, stain options): the caches of
    the K patient folds (or of other crop sizes) of one source hold the same pixels, and Macenko takes
    seconds per image."""
    if stain_cache is None or normalizer.method == "none":
        return normalizer(s.image)
    pixels = np.ascontiguousarray(s.image)
    h = hashlib.sha256(json.dumps([CACHE_VERSION, options["stain"], options["stain_target"],
                                   options["channel_order"], list(pixels.shape), str(pixels.dtype)]).encode())
    h.update(pixels.tobytes())
    path = stain_cache / f"{h.hexdigest()[:24]}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError):  # a torn or empty file: compute it again
            path.unlink(missing_ok=True)
    image = normalizer(s.image)
    stain_cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp.npy")
    np.save(tmp, image)
    os.replace(tmp, path)
    return image


def _build(tmp: Path, source: Path, refs, options: dict, normalizer, progress: bool,
           stain_cache: Optional[Path] = None) -> None:
    for sub in ("images", "labels", "ignore", "instances"):
        (tmp / sub).mkdir(parents=True)
    images, skipped, notes = [], [], []
    pix = []  # per kept image: pixels per class (ignore excluded)
    nuc = []
    stain = "" if options["stain"] == "none" else f", {options['stain']} stain normalisation"
    for ref in progress_bar(refs, desc=f"prepare {source.name} (read{stain})", unit="image", enabled=progress):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the notes are collected into the manifest instead
                s = ref.load()
        except DataError as exc:
            if not options["skip_bad"]:
                raise
            skipped.append({"id": ref.id, "files": [str(f) for f in ref.files], "error": str(exc)})
            continue
        try:
            image = _normalised(s, normalizer, stain_cache, options)
        except StainError as exc:
            image = s.image
            s.warnings.append(f"{s.id}: stain normalisation skipped ({exc})")
        idx = len(images)
        np.save(tmp / "images" / f"{idx:04d}.npy", image)
        np.save(tmp / "labels" / f"{idx:04d}.npy", s.label)
        np.save(tmp / "ignore" / f"{idx:04d}.npy", s.ignore)
        np.save(tmp / "instances" / f"{idx:04d}.npy", s.instances)
        pix.append(np.bincount(s.label[~s.ignore].ravel(), minlength=NUM_CLASSES + 1)[: NUM_CLASSES + 1])
        nuc.append([s.nuclei.get(c, 0) for c in range(1, NUM_CLASSES + 1)])
        notes += s.warnings
        images.append({"index": idx, "id": s.id, "patient": s.patient, "height": int(s.label.shape[0]),
                       "width": int(s.label.shape[1]), "mpp": s.mpp,
                       "files": [str(Path(f).relative_to(source)) for f in ref.files]})
    if not images:
        raise DataError(f"{source}: no image could be read ({len(skipped)} skipped)")
    splits = assign_splits([m["id"] for m in images], [m["patient"] for m in images],
                           options["split"], options["split_by"], options["seed"],
                           options.get("folds", 1), options.get("fold", 0))
    for m, sp in zip(images, splits):
        m["split"] = sp
    pix_arr, nuc_arr = np.array(pix), np.array(nuc)
    train = np.array([sp == "train" for sp in splits])
    train_pix = pix_arr[train].sum(0)
    freq = train_pix[1:] / max(train_pix.sum(), 1)
    rarity = [int(c) + 1 for c in np.argsort(freq, kind="stable")]
    tile, stride, grid = options["crop_size"], options["stride"], options["grid"]
    stats: dict = {"rarity_order": rarity, "train_pixel_frequency": {str(c): float(freq[c - 1]) for c in range(1, 5)}}
    for name in SPLITS:
        rows = []
        for m in images:
            if m["split"] != name:
                continue
            for y, x in tile_positions(m["height"], m["width"], tile, stride, grid):
                rows.append((m["index"], int(y), int(x)))
        crops = np.array(rows, np.int64).reshape(-1, 3)
        np.save(tmp / f"crops_{name}.npy", crops)
        sel = np.array([sp == name for sp in splits])
        stats[name] = {"images": int(sel.sum()), "crops": int(len(crops)),
                       "pixels": {str(c): int(pix_arr[sel, c].sum()) if sel.any() else 0 for c in range(1, 5)},
                       "nuclei": {str(c): int(nuc_arr[sel, c - 1].sum()) if sel.any() else 0 for c in range(1, 5)}}
        if name == "test":
            continue
        # training buckets feed the w batches, validation buckets the alpha batches; both use the
        # training set's rarity order
        buckets, empty = _bucket_crops(tmp, crops, tile, rarity, options["min_pixels"], progress, name)
        stats[name]["bucket_sizes"] = {str(c): len(v) for c, v in buckets.items()}
        stats[name]["empty_crops"] = empty
        prefix = "bucket" if name == "train" else "bucket_val"
        for c, v in buckets.items():
            np.save(tmp / f"{prefix}_{c}.npy", np.array(v, np.int64))
            if not v and name == "train":
                notes.append(f"class {c} has no training crop: its bucket is empty")
    (tmp / "class_stats.json").write_text(json.dumps(stats, indent=1))
    manifest = {"version": CACHE_VERSION, "source": str(source), "options": options,
                "stain": normalizer.describe(), "images": images,
                "splits": {n: [m["id"] for m in images if m["split"] == n] for n in SPLITS},
                "warnings": notes, "skipped": skipped}
    # written last: its presence marks a complete cache
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _bucket_crops(tmp: Path, crops: np.ndarray, tile: int, rarity: list[int], min_pixels: int,
                  progress: bool = False, split: str = "train") -> tuple[dict[int, list[int]], int]:
    """Crop indices per class bucket (stored in crop order) and the number of crops with no nucleus."""
    buckets: dict[int, list[int]] = {c: [] for c in range(1, NUM_CLASSES + 1)}
    empty = 0
    for k, (i, y, x) in enumerate(progress_bar(crops, desc=f"prepare: class buckets of the {split} crops",
                                               unit="crop", enabled=progress)):
        lab = pad_window(np.load(tmp / "labels" / f"{i:04d}.npy", mmap_mode="r"), y, x, tile)
        ign = pad_window(np.load(tmp / "ignore" / f"{i:04d}.npy", mmap_mode="r"), y, x, tile, fill=True)
        counts = np.bincount(np.asarray(lab)[~np.asarray(ign)], minlength=NUM_CLASSES + 1)
        b = crop_bucket(counts, rarity, min_pixels)
        if b:
            buckets[b].append(k)
        else:
            empty += 1
    return buckets, empty


# ---------------------------------------------------------------- default dataset for the engine
def ensure_synthetic(root: str | Path, n_images: int, size: int, seed: int, progress: bool = True) -> Path:
    """Generate (once) the synthetic dataset under ``root/synthetic/<key>``; atomic like prepare.
    ``progress``: a bar counting the images written (a terminal only)."""
    from .synthetic import write_synthetic

    key = hashlib.sha256(json.dumps([SYNTHETIC_VERSION, n_images, size, seed]).encode()).hexdigest()[:12]
    final = Path(root) / "synthetic" / f"n{n_images}-s{size}-seed{seed}-{key}"

    def build(tmp: Path) -> None:
        with _counting_files(tmp, "*/*.xml", progress_bar(total=n_images, unit="image", enabled=progress,
                                                          desc=f"generate {n_images} synthetic images of {size} px")):
            write_synthetic(tmp, n_images, size, seed)
        (tmp / ".complete").write_text("ok\n")

    return publish_atomically(final, ".complete", build)


@contextmanager
def _counting_files(folder: Path, pattern: str, bar, every: float = 0.5):
    """Advance ``bar`` to the number of files matching ``pattern`` under ``folder`` every ``every`` s while
    the body runs (write_synthetic writes one annotation file per image, last), and close it after."""
    import threading

    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            done = sum(1 for _ in folder.glob(pattern))
            if done > bar.n:
                bar.update(done - bar.n)

    thread = threading.Thread(target=tick, daemon=True) if not bar.disable else None
    if thread is not None:
        thread.start()
    try:
        yield bar
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        bar.close()


def ensure_dataset(data_cfg, root: Path, seed: int, progress: bool = True):
    """Config -> opened :class:`PreparedData`. ``data_cfg``: nas_core.config.DataConfig. With
    ``source`` None the synthetic dataset (``synthetic_images`` x ``synthetic_size``, generated with
    ``seed``) is used. ``seed`` also drives the split. ``root`` is the data root the caller's settings
    name (synthetic data under root/synthetic, caches under root/cache)."""
    from .dataset import PreparedData

    root = Path(root)
    if data_cfg.source is None:
        source = ensure_synthetic(root, data_cfg.synthetic_images, data_cfg.synthetic_size, seed, progress)
        layout = "monusac"
    else:
        source, layout = Path(data_cfg.source).expanduser(), data_cfg.layout
    cache = prepare(source, root / "cache", layout=layout, stain=data_cfg.stain, split=data_cfg.split,
                    split_by=data_cfg.split_by, seed=seed, crop_size=data_cfg.crop_size,
                    stride=data_cfg.stride, grid=data_cfg.grid, folds=getattr(data_cfg, "folds", 1),
                    fold=getattr(data_cfg, "fold", 0), progress=progress)
    return PreparedData.open(cache)
