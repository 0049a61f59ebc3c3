"""A run's set-up: what every step of the search and the retrain works with (``RunContext``).

``setup_run`` seeds, picks the device, prepares (or opens) the dataset and builds the loss the config
names; ``prepare_model`` puts a model on that device; ``adam`` builds the one optimiser kind both
loops use. The context carries the run's ``StepGuard``, which ends the run with a ``TrainingError``
after too many non-finite steps in a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas_core.config import ConfigError, RunConfig
from nas_core.engine.device import resolve_device, seed_everything, set_float32_precision


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
            transform = build_augmentation(self.cfg.augment.pipeline, self.cfg.augment.strength) if augment else None
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
    return RunContext(cfg=cfg, out_dir=out_dir, device=device, data=data, loss_fn=create_loss(cfg.loss.name),
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
