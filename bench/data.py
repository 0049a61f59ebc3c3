"""Crops/s of the training input pipeline (load + augment + collate) per protocol and worker count.

    .venv/bin/python bench/data.py [--batches 40] [--crop 256] [--workers 0 2]

Prints numbers, never passes or fails. Data: a synthetic MoNuSAC-layout set prepared into a temporary
cache (12 images of 512x512, crops 256 at stride 128). A training step consumes one batch of 4; the
ratio "pipeline crops/s / step crops/s" must stay above 1 for the loader to keep up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args()

    import torch
    from nas_core.data.augment import build_augmentation
    from nas_core.data.dataset import ClassBalancedBatchSampler, CropDataset, PreparedData, make_loader
    from nas_core.data.prepare import prepare
    from nas_core.data.synthetic import write_synthetic

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_synthetic(Path(tmp) / "src", 12, 512, seed=0)
        t0 = time.perf_counter()
        data = PreparedData.open(prepare(src, Path(tmp) / "cache", crop_size=args.crop, stride=args.crop // 2,
                                         progress=False))
        print(f"prepare: {time.perf_counter() - t0:.2f} s for 12 images of 512x512")
        print(f"{'pipeline':<8}{'workers':>8}{'crops/s':>10}")
        for pipeline in ("paper", "code", "none"):
            for workers in args.workers:
                ds = CropDataset(data, "train", transform=build_augmentation(pipeline, seed=0))
                sampler = ClassBalancedBatchSampler(data.buckets, per_class=1, num_batches=args.batches + 5, seed=0)
                it = iter(make_loader(ds, sampler, workers=workers, seed=0))
                for _ in range(5):  # warm-up: worker start and first prefetch
                    next(it)
                t0 = time.perf_counter()
                n = sum(next(it)["image"].shape[0] for _ in range(args.batches))
                rate = n / (time.perf_counter() - t0)
                print(f"{pipeline:<8}{workers:>8}{rate:>10.1f}")
                del it


if __name__ == "__main__":
    main()
