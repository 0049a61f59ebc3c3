"""Pieces shared by the search and retrain loops: set-up, one optimisation step, bookkeeping.

Loops are functions of their inputs: the config, an output folder and callbacks. Everything a run
writes lives in ``out_dir``; ``last.pt`` is the resumable state after each epoch, ``best.pt`` the
best-validation checkpoint, ``result.json`` marks a finished run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from nas_core.config import ConfigError, RunConfig
from nas_core.engine.device import autocast, resolve_device, seed_everything, set_float32_precision


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, for instance); the message says where it happened."""


@dataclass
class RunContext:
    cfg: RunConfig
    out_dir: Path
    device: torch.device
    data: Any  # nas_core.data.PreparedData
    loss_fn: Any
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
    return RunContext(cfg=cfg, out_dir=out_dir, device=device, data=data, loss_fn=create_loss(cfg.loss_name))


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
                      where: str) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = compute_loss(model, batch, ctx)
    if not torch.isfinite(loss):
        raise TrainingError(f"{where}: the loss is {loss.item()} (not finite); stopping before anything is overwritten")
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def batch_size(per_class: int, data: Any) -> int:
    return per_class * max(1, sum(1 for v in data.buckets.values() if len(v)))


def iterations(per_epoch: int | None, data: Any, per_class: int) -> int:
    """Batches per epoch: the setting, or one pass over the training crops."""
    if per_epoch:
        return per_epoch
    n = sum(len(v) for v in data.buckets.values())
    return max(1, math.ceil(n / batch_size(per_class, data)))


def epoch_lengths(cfg: RunConfig, data: Any) -> dict:
    """PROVISIONAL (today's rule, kept until the release's epoch composition lands): iterations per
    epoch and the crops each epoch draws from.

    Returns ``{"w": int, "alpha": int, "train": int, "crops": {"train": int, "alpha": int}}``:
    ``w`` = iterations of a search w-epoch (also of an alternating epoch), ``alpha`` = of an alpha-epoch
    (today the same as ``w``), ``train`` = of a retrain epoch; ``crops`` = the crops in the class
    buckets (train) and the alpha-update crops (the validation images'). The iteration counts follow
    :func:`iterations`: ``iters_per_epoch`` when set, else one pass over the bucketed training crops.
    """
    s, t = cfg.search, cfg.train
    w = iterations(s.iters_per_epoch, data, s.per_class)
    return {"w": w, "alpha": w, "train": iterations(t.iters_per_epoch, data, t.per_class),
            "crops": {"train": int(sum(len(v) for v in data.buckets.values())),
                      "alpha": int(len(data.crops("alpha")))}}


def train_batches(ctx: RunContext, per_class: int, n_batches: int, epoch: int) -> Iterator[dict]:
    """Class-balanced, augmented training batches; order and augmentation depend only on (seed, epoch)."""
    from nas_core.data import ClassBalancedBatchSampler, make_loader

    dataset = ctx.dataset("train", augment=True)
    seed = ctx.cfg.seed * 100003 + epoch
    sampler = ClassBalancedBatchSampler(ctx.data.buckets, per_class=per_class, num_batches=n_batches, seed=seed)
    loader = make_loader(dataset, sampler, workers=ctx.cfg.data.workers, pin_memory=ctx.device.type == "cuda",
                         seed=seed)
    for batch in loader:
        yield to_device(batch, ctx)


def alpha_batches(ctx: RunContext, size: int, n_batches: int, epoch: int) -> Iterator[dict]:
    """Random batches of the alpha-update crops (the validation images' crops), not augmented.

    Assumption (method.md is silent): alpha crops are drawn uniformly, not class-balanced.
    """
    from nas_core.data import make_loader

    dataset = ctx.dataset("val", augment=False)
    if len(dataset) == 0:
        raise ConfigError("the validation split has no crops: the alpha update needs validation images")
    g = torch.Generator().manual_seed(ctx.cfg.seed * 7919 + epoch)
    order = torch.randint(len(dataset), (n_batches, size), generator=g).tolist()
    loader = make_loader(dataset, order, workers=ctx.cfg.data.workers, pin_memory=ctx.device.type == "cuda",
                         seed=ctx.cfg.seed * 7919 + epoch)
    for batch in loader:
        yield to_device(batch, ctx)


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
    """A fresh (non-resuming) run never overwrites another run's results."""
    if not resume and ((out_dir / "result.json").exists() or (out_dir / "last.pt").exists()):
        raise ConfigError(f"{out_dir} already holds a {phase} run; pass --resume to continue it or choose another --out")


def due(epoch: int, every: int, epochs: int) -> bool:
    return (epoch + 1) % every == 0 or epoch == epochs - 1


def progress(iterable, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=os.environ.get("NAS_SCAM_PROGRESS") == "0")


def resume_from_last(out_dir: Path, cfg: RunConfig, model: nn.Module, optimizers: dict,
                     state: dict) -> tuple[dict, int]:
    """Restore weights, optimisers, RNG and loop state from ``out_dir/last.pt`` if it exists.

    Returns (state, first epoch to run). A last.pt written with another config is refused.
    """
    from nas_core.config import config_from_dict
    from nas_core.engine.checkpoint import load_weights, read_checkpoint
    from nas_core.engine.device import set_rng_state

    last = out_dir / "last.pt"
    if not last.exists():
        return state, 0
    payload = read_checkpoint(last)
    if config_from_dict(payload["config"]) != cfg:
        raise ConfigError(f"{last} was written with a different config; resume with the same config or another --out")
    load_weights(model, payload, last)
    for key, opt in optimizers.items():
        opt.load_state_dict(payload["optimizers"][key])
    set_rng_state(payload["rng"])
    return payload["state"], payload["epoch"] + 1

