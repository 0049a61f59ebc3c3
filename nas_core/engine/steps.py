"""One optimisation step, an epoch's mean loss and the progress bar over an epoch's steps.

A step whose loss or gradient is not finite is skipped before Adam sees it; the run's ``StepGuard``
(``ctx.guard``, nas_core/engine/context.py) counts such steps and stops the run after
``max_nonfinite_steps`` in a row.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from nas_core.engine.context import RunContext
from nas_core.engine.device import autocast


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


def progress(iterable, total: int, desc: str):
    """A progress bar over an epoch's iterations (off with NAS_SCAM_PROGRESS=0)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=os.environ.get("NAS_SCAM_PROGRESS") == "0")
