"""Pieces shared by the search and retrain loops: set-up, one optimisation step, the epoch tail, bookkeeping.

Loops are functions of their inputs: the config, an output folder and callbacks. Everything a run
writes lives in ``out_dir``; ``last.pt`` is the resumable state after each epoch, ``best.pt`` the
best-validation checkpoint, ``result.json`` marks a finished run.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import torch
from torch import nn

from nas_core.config import ConfigError, RunConfig
from nas_core.engine.checkpoint import save_checkpoint
from nas_core.engine.device import autocast, resolve_device, rng_state, seed_everything, set_float32_precision
from nas_core.engine.evaluate import evaluate_split
from nas_core.metrics import flatten_metrics


class TrainingError(RuntimeError):
    """The run cannot go on (NaN losses, for instance); the message says where it happened."""


class StepGuard:
    """Skips optimisation steps whose loss or gradient is not finite, counts them, and fails the run
    after ``max_in_row`` such steps in a row (bf16 or a too-high learning rate meet them now and then;
    a model that only produces NaN must stop, not train on)."""

    def __init__(self, max_in_row: int):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.skipped = 0  # since the last ``take``

    def passed(self) -> None:
        self.in_row = 0

    def skip(self, where: str, problem: str) -> None:
        self.in_row += 1
        self.skipped += 1
        if self.in_row >= self.max_in_row:
            raise TrainingError(f"{where}: {problem}, {self.in_row} steps in a row (max_nonfinite_steps="
                                f"{self.max_in_row}); stopping before anything is overwritten")

    def take(self) -> int:
        """Steps skipped since the last call (one epoch's count)."""
        n, self.skipped = self.skipped, 0
        return n


@dataclass
class RunContext:
    cfg: RunConfig
    out_dir: Path
    device: torch.device
    data: Any  # nas_core.data.PreparedData
    loss_fn: Any
    guard: StepGuard = field(default_factory=lambda: StepGuard(RunConfig.max_nonfinite_steps))
    _datasets: dict = field(default_factory=dict)

    def dataset(self, split: str, augment: bool):
        """One CropDataset per (split, augment) for the whole run: images are loaded once."""
        from nas_core.data import CropDataset, build_augmentation

        key = (split, augment)
        if key not in self._datasets:
            transform = build_augmentation(self.cfg.augment_pipeline, self.cfg.augment.strength) if augment else None
            self._datasets[key] = CropDataset(self.data, split, transform=transform)
        return self._datasets[key]

    @property
    def amp(self) -> bool:
        return self.cfg.amp and self.device.type == "cuda"


def setup_run(cfg: RunConfig, out_dir: Path) -> RunContext:
    """Seed, choose the device, make sure the dataset is prepared, build the loss."""
    from nas_core.data import ensure_dataset
    from nas_core.losses import create_loss

    if not cfg.data.cache_dir:
        raise ConfigError("data.cache_dir must name the data root (synthetic data and caches live there)")
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    set_float32_precision(device, cfg.tf32)
    data = ensure_dataset(cfg.data, Path(cfg.data.cache_dir), cfg.data.seed, progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(cfg=cfg, out_dir=out_dir, device=device, data=data, loss_fn=create_loss(cfg.loss_name),
                      guard=StepGuard(cfg.max_nonfinite_steps))


def prepare_model(model: nn.Module, ctx: RunContext) -> nn.Module:
    """Device, channels_last (CUDA) and, when ``cfg.compile`` is not "off", torch.compile in place."""
    from nas_core.models.perf import maybe_compile

    model = model.to(ctx.device)
    if ctx.cfg.channels_last and ctx.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if ctx.cfg.compile != "off":
        maybe_compile(model, enabled=True, mode=ctx.cfg.compile)
    return model


def adam(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam; the fused kernel on CPU/CUDA (one kernel over all tensors: the supernet has ~2,400 of
    them, and the per-tensor loop cost about 4x more per step on CPU)."""
    return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))


def to_device(batch: dict, ctx: RunContext) -> dict:
    out = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
    if ctx.cfg.channels_last and ctx.device.type == "cuda":
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def compute_loss(model: nn.Module, batch: dict, ctx: RunContext) -> torch.Tensor:
    """Forward + loss in float32 (the model may run under bf16 autocast on CUDA)."""
    with autocast(ctx.device, ctx.amp):
        probs = model(batch["image"])  # (B, 4, H, W)
    return ctx.loss_fn(probs.float(), batch["target"], batch.get("ignore"))


def optimisation_step(model: nn.Module, batch: dict, optimizer: torch.optim.Optimizer, ctx: RunContext,
                      where: str) -> float | None:
    """One step of ``optimizer``; None when skipped for a non-finite loss or gradient (``ctx.guard``
    counts it and raises TrainingError after too many in a row)."""
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(model, batch, ctx)
    value = float(loss.detach())
    problem = None
    if not math.isfinite(value):
        problem = f"the loss is {value}"
    else:
        loss.backward()
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            problem = f"a gradient is not finite (loss {value:.4g})"
    if problem is not None:
        optimizer.zero_grad(set_to_none=True)  # Adam's moments must not see it either
        ctx.guard.skip(where, problem)
        return None
    optimizer.step()
    ctx.guard.passed()
    return value


def epoch_losses(metrics: dict, key: str, losses: list, ctx: RunContext) -> None:
    """Mean of the steps taken (absent if every step was skipped) and the epoch's skipped-step count."""
    taken = [v for v in losses if v is not None]
    if taken:
        metrics[key] = float(sum(taken) / len(taken))
    metrics["skipped_steps"] = metrics.get("skipped_steps", 0) + ctx.guard.take()


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


class EpochTail:
    """The chores around every epoch, one implementation for the search and the retrain loop.

    ``begin(epoch)`` opens the epoch's metrics and validates when the epoch is due with
    ``val_timing="start"``; ``end(epoch, metrics, optimizers)`` validates when due with "end", appends
    the metrics to ``state["history"]``, writes the resumable ``last.pt`` and calls
    ``on_epoch_end``, in that order. A validation records ``val_dsc``/``val_pq`` and, when its score
    ``improves`` on the best among the epochs ``may_be_best`` accepts, updates ``state`` (best score,
    epoch, flattened metrics) and writes ``best.pt`` with ``genotype()``.
    """

    def __init__(self, phase: str, ctx: RunContext, model: nn.Module, state: dict, callbacks: Any,
                 val_epochs: Collection[int], val_timing: str,
                 may_be_best: Callable[[int], bool] = lambda epoch: True,
                 genotype: Callable[[], dict | None] = lambda: None):
        self.phase, self.ctx, self.model, self.state, self.callbacks = phase, ctx, model, state, callbacks
        self.val_epochs, self.val_timing = set(val_epochs), val_timing
        self.may_be_best, self.genotype = may_be_best, genotype

    def begin(self, epoch: int) -> dict:
        metrics: dict = {"epoch": epoch}
        if self.val_timing == "start" and epoch in self.val_epochs:
            self._validate(epoch, metrics)
        return metrics

    def end(self, epoch: int, metrics: dict, optimizers: dict) -> None:
        if self.val_timing == "end" and epoch in self.val_epochs:
            self._validate(epoch, metrics)
        self.state["history"].append(metrics)
        save_checkpoint(self.ctx.out_dir / "last.pt", model=self.model, config=self.ctx.cfg.portable_dict(),
                        phase=self.phase, epoch=epoch, metrics=metrics, optimizers=optimizers, rng=rng_state(),
                        state=self.state)
        self.callbacks.on_epoch_end(self.phase, epoch, metrics, self.ctx.out_dir)

    def _validate(self, epoch: int, metrics: dict) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        val = evaluate_split(self.model, ctx.data, "val", device=ctx.device, amp=ctx.amp,
                             tile=cfg.data.crop_size, stride=cfg.data.stride, grid=cfg.data.grid)
        score = val["dsc"]["Average"]
        metrics.update({"val_dsc": score, "val_pq": val["pq"]["Average"]})
        if self.may_be_best(epoch) and improves(score, self.state["best_score"]):
            self.state.update(best_score=score, best_epoch=epoch, best_val=flatten_metrics(val))
            save_checkpoint(ctx.out_dir / "best.pt", model=self.model, config=cfg.portable_dict(), phase=self.phase,
                            epoch=epoch, metrics=dict(metrics), genotype=self.genotype())


def improves(score: float, best: float | None) -> bool:
    """A validation score beats the best so far (the first one always counts; NaN never beats a number)."""
    if best is None or math.isnan(best):
        return True
    return score > best


def read_result(out_dir: Path, path_keys: tuple[str, ...]) -> dict:
    """A finished run's ``result.json``, its files (``path_keys``) pointed into ``out_dir`` as it lies
    now: the folder may have been copied from another folder or machine."""
    data = json.loads((out_dir / "result.json").read_text())
    for key in path_keys:
        if data.get(key):
            data[key] = str(out_dir / Path(data[key]).name)
    return data


def write_json(path: Path, data: Any) -> Path:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def guard_out_dir(out_dir: Path, resume: bool, phase: str) -> None:
    """A fresh (non-resuming) run never overwrites another run's results; the folder must take files."""
    if not resume and ((out_dir / "result.json").exists() or (out_dir / "last.pt").exists()):
        raise ConfigError(f"{out_dir} already holds a {phase} run; pass --resume to continue it or choose another --out")
    ensure_writable_dir(out_dir)


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` and prove it takes files, so a read-only or non-folder output fails at once with
    an OSError naming it (not after an epoch, where torch.save reports a RuntimeError)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    os.unlink(probe)
    return path


def progress(iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=os.environ.get("NAS_SCAM_PROGRESS") == "0")


def resume_from_last(out_dir: Path, cfg: RunConfig, model: nn.Module, optimizers: dict,
                     state: dict) -> tuple[dict, int]:
    """Restore weights, optimisers, RNG and loop state from ``out_dir/last.pt`` if it exists.

    Returns (state, first epoch to run). A last.pt written with another config is refused; where the
    files lie (``LOCATION_PATHS``: data root, source folder, genotype file) may differ, so a run folder
    copied to another machine resumes there.
    """
    from nas_core.config import config_from_dict
    from nas_core.engine.checkpoint import load_weights, read_checkpoint
    from nas_core.engine.device import set_rng_state

    last = out_dir / "last.pt"
    if not last.exists():
        return state, 0
    payload = read_checkpoint(last)
    differences = config_from_dict(payload["config"]).run_differences(cfg)
    if differences:
        raise ConfigError(f"{last} was written with a different config ({', '.join(differences[:5])} differ); "
                          f"resume with the same config or another --out")
    load_weights(model, payload, last)
    for key, opt in optimizers.items():
        opt.load_state_dict(payload["optimizers"][key])
    set_rng_state(payload["rng"])
    return payload["state"], payload["epoch"] + 1

