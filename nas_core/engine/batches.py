"""The batch streams of the loops and their epoch lengths (method.md 5a).

Two streams: w batches from the training split's buckets and alpha batches from the validation images'
buckets, both augmented. Each stream is one sequence across the run: an epoch takes batches
``start .. start + n - 1`` of it, so every bucket is walked in stored order and wraps around, also
across a resume. ``epoch_lengths`` says how many iterations each kind of epoch runs.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from nas_core.config import ConfigError, RunConfig
from nas_core.engine.context import RunContext


def _bucket_batch(buckets: dict, per_class: int) -> int:
    return per_class * sum(1 for v in buckets.values() if len(v))


def epoch_lengths(cfg: RunConfig, data: Any) -> dict:
    """Iterations per epoch of each kind, by the rule the loops use (method.md 5a).

    ``data``: a PreparedData (``buckets``, ``alpha_buckets``, ``crops(split)``). Returns
    ``{"w": int, "alpha": int, "train": int, "batch": {"w", "alpha", "train"}, "crops": {"train",
    "alpha"}, "bucketed": {"train", "alpha"}, "anchor": {"train": (class, size), "alpha": ...}}``:
    a w-epoch (and an alternating epoch: one w step and one alpha step per iteration) runs ``w``
    iterations, an alpha-epoch ``alpha``, a retrain epoch ``train``; ``batch`` crops each;
    ``crops`` = all windows of the split's crop grid, ``bucketed`` = those with a nucleus (the only
    ones batches draw). Without ``iters_per_epoch``: w = train = ceil(n1 / 2), alpha = ceil(m1 / 2),
    n1 / m1 = class-1 crops in the training / alpha-update buckets (the largest bucket when class 1 is
    absent). ``search.iters_per_epoch`` sets every search epoch's length, ``train.iters_per_epoch``
    every retrain epoch's.
    """
    from nas_core.data.dataset import anchor_length, release_epoch_length

    s, t = cfg.search, cfg.train
    has_alpha = any(len(v) for v in data.alpha_buckets.values())
    n_w = release_epoch_length(data.buckets)
    n_alpha = release_epoch_length(data.alpha_buckets) if has_alpha else 0
    return {
        "w": s.iters_per_epoch or n_w,
        "alpha": (s.iters_per_epoch or n_alpha) if has_alpha else 0,
        "train": t.iters_per_epoch or n_w,
        "batch": {"w": _bucket_batch(data.buckets, s.per_class), "alpha": _bucket_batch(data.alpha_buckets, s.per_class),
                  "train": _bucket_batch(data.buckets, t.per_class)},
        "crops": {"train": int(len(data.crops("train"))), "alpha": int(len(data.crops("alpha")))},
        "bucketed": {"train": int(sum(len(v) for v in data.buckets.values())),
                     "alpha": int(sum(len(v) for v in data.alpha_buckets.values()))},
        "anchor": {"train": anchor_length(data.buckets), "alpha": anchor_length(data.alpha_buckets)},
    }


def search_steps(mode: str, lengths: dict) -> tuple[int, int]:
    """(w steps, alpha steps) of a search epoch in ``mode`` (w | alpha | alternate)."""
    if mode == "w":
        return lengths["w"], 0
    if mode == "alpha":
        return 0, lengths["alpha"]
    return lengths["w"], lengths["w"]


def train_batches(ctx: RunContext, per_class: int, n_batches: int, epoch: int, start: int,
                  sampler: str = "balanced") -> Iterator[dict]:
    """Augmented training batches ``start .. start + n_batches - 1`` of the w stream: class-balanced
    (the buckets are walked in stored order across epochs) or uniform over the split's windows
    (``sampler``, the config's ``train.sampler`` / ``search.sampler``); augmentation depends on (seed, epoch)."""
    yield from _bucket_batches(ctx, "train", ctx.data.buckets, per_class, n_batches, start,
                               seed=ctx.cfg.seed * 100003 + epoch, sampler=sampler)


def alpha_batches(ctx: RunContext, per_class: int, n_batches: int, epoch: int, start: int,
                  sampler: str = "balanced") -> Iterator[dict]:
    """Alpha-update batches: from the validation images' crops, drawn like the w batches (``sampler``)
    and augmented like them (the release's ``yield_data(search=True)``), batches ``start ..`` of the
    alpha stream."""
    if not any(len(v) for v in ctx.data.alpha_buckets.values()):
        raise ConfigError("the validation split has no crop with a nucleus: the alpha update needs validation images")
    yield from _bucket_batches(ctx, "val", ctx.data.alpha_buckets, per_class, n_batches, start,
                               seed=ctx.cfg.seed * 7919 + epoch + 1, sampler=sampler)


def _bucket_batches(ctx: RunContext, split: str, buckets: dict, per_class: int, n_batches: int, start: int,
                    seed: int, sampler: str = "balanced") -> Iterator[dict]:
    from nas_core.data import make_loader
    from nas_core.data.dataset import ClassBalancedBatchSampler, UniformBatchSampler

    dataset = ctx.dataset(split, augment=True)
    if sampler == "uniform":
        # the same batch size as the balanced sampler's, so steps and costs compare one to one
        sampler = UniformBatchSampler(len(ctx.data.crops(split)), _bucket_batch(buckets, per_class), n_batches,
                                      seed=ctx.cfg.seed, start=start)
    else:
        sampler = ClassBalancedBatchSampler(buckets, per_class=per_class, num_batches=n_batches,
                                            seed=ctx.cfg.seed, start=start)
    loader = make_loader(dataset, sampler, workers=ctx.cfg.data.workers, pin_memory=ctx.device.type == "cuda",
                         seed=seed)
    for batch in loader:
        yield to_device(batch, ctx)


def to_device(batch: dict, ctx: RunContext) -> dict:
    """A loader's batch on the run's device (images channels_last on CUDA when the config asks)."""
    out = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
    if ctx.cfg.channels_last and ctx.device.type == "cuda":
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out
