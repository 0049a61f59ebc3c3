"""The epoch tail: the chores around every epoch, one implementation for the search and the retrain.

Validation when it is due (method.md 5a: at the epoch's start or end), the best-validation checkpoint,
the epoch's metrics in the history, the resumable ``last.pt`` and the ``on_epoch_end`` callback.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection

from torch import nn

from nas_core.engine.checkpoint import save_checkpoint
from nas_core.engine.context import RunContext
from nas_core.engine.device import rng_state
from nas_core.engine.evaluate import evaluate_split
from nas_core.metrics import flatten_metrics


class EpochTail:
    """The chores around every epoch of one loop.

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
