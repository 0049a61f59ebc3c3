"""Retraining ("rebuild") of any registry model from scratch; best-validation checkpoint, then test.

Epochs of ``epoch_lengths(...)["train"]`` iterations walk the training buckets on across epochs. The
best checkpoint is the best over all validations (method.md 5a: with ``val_timing="start"`` they run
at the start of every ``val_every``-th epoch, the untrained state at epoch 0 included, the final
state never).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nas_core.config import ConfigError, RunConfig
from nas_core.engine.batches import epoch_lengths, train_batches
from nas_core.engine.callbacks import Callback, CallbackList
from nas_core.engine.checkpoint import load_weights, read_checkpoint
from nas_core.engine.context import adam, prepare_model, setup_run
from nas_core.engine.device import seed_everything
from nas_core.engine.evaluate import evaluate_split
from nas_core.engine.rundir import guard_out_dir, read_result, resume_from_last, write_json
from nas_core.engine.steps import epoch_losses, optimisation_step, progress
from nas_core.engine.tail import EpochTail


@dataclass
class TrainResult:
    checkpoint_path: Path
    best_epoch: int
    best_val: dict
    test: dict
    history: list = field(default_factory=list)
    metrics_path: Path | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainResult":
        d = dict(d)
        d["checkpoint_path"] = Path(d["checkpoint_path"])
        d["metrics_path"] = Path(d["metrics_path"]) if d.get("metrics_path") else None
        return cls(**d)


def build_model(cfg: RunConfig):
    """The registry model the config names; NAS-SCAM variants are built from ``model.genotype``."""
    from nas_core.models import NAS_MODELS, create_model
    from nas_core.search_space.genotype import Genotype

    if cfg.model.name in NAS_MODELS:
        if not cfg.model.genotype:
            raise ConfigError(f"model.genotype must name a genotype JSON to retrain {cfg.model.name}; run a search first")
        genotype = Genotype.load(cfg.model.genotype)
        return create_model(cfg.model.name, genotype=genotype, zero_op=cfg.model.zero_op, impl=cfg.model.impl)
    return create_model(cfg.model.name)


def run_train(cfg: RunConfig, out_dir: Path, callbacks: Sequence[Callback] = (), resume: bool = True) -> TrainResult:
    """Train from scratch, keep the best-validation weights, test them. Writes best.pt, last.pt, metrics.json."""
    out_dir = Path(out_dir)
    cb = CallbackList(callbacks)
    if resume and (out_dir / "result.json").exists():
        return TrainResult.from_dict(read_result(out_dir, ("checkpoint_path", "metrics_path")))
    guard_out_dir(out_dir, resume, "train")
    # seeded first: the initial weights depend on cfg.seed only, not on what the process drew before
    seed_everything(cfg.seed, cfg.deterministic)
    model = build_model(cfg)  # before any data work: a bad genotype fails fast
    ctx = setup_run(cfg, out_dir)
    model = prepare_model(model, ctx)
    t = cfg.train
    opt = adam(model.parameters(), t.lr, ctx.device)
    state = {"best_score": None, "best_epoch": -1, "best_val": {}, "history": []}
    start = 0
    if resume:
        state, start = resume_from_last(out_dir, cfg, model, {"w": opt}, state)
    cb.on_run_start("train", cfg, out_dir)
    genotype = (getattr(model, "model_spec", None) or {}).get("options", {}).get("genotype")

    n_iter = epoch_lengths(cfg, ctx.data)["train"]
    tail = EpochTail("train", ctx, model, state, cb, t.validation_epochs(), t.val_timing, genotype=lambda: genotype)

    for epoch in range(start, t.epochs):
        metrics = tail.begin(epoch)
        model.train()
        batches = train_batches(ctx, t.per_class, n_iter, epoch, start=epoch * n_iter, sampler=t.sampler)
        losses = [optimisation_step(model, next(batches), opt, ctx, f"train epoch {epoch} iteration {it}")
                  for it in progress(range(n_iter), n_iter, f"train {epoch + 1}/{t.epochs}")]
        epoch_losses(metrics, "train_loss", losses, ctx)
        metrics["lr"] = float(opt.param_groups[0]["lr"])
        tail.end(epoch, metrics, {"w": opt})

    best = read_checkpoint(out_dir / "best.pt")
    load_weights(model, best, out_dir / "best.pt")
    # test["images"]: per-image rows, so paired comparisons and per-patient breakdowns need no re-scoring
    test = evaluate_split(model, ctx.data, "test", device=ctx.device, amp=ctx.amp,
                          tile=cfg.data.crop_size, stride=cfg.data.stride, grid=cfg.data.grid, images=True)
    metrics_path = write_json(out_dir / "metrics.json", {"best_epoch": state["best_epoch"], "val": state["best_val"],
                                                        "test": test})
    result = TrainResult(checkpoint_path=out_dir / "best.pt", best_epoch=state["best_epoch"],
                         best_val=state["best_val"], test=test, history=state["history"], metrics_path=metrics_path)
    cb.on_artifact("train", out_dir / "best.pt", "checkpoint")
    cb.on_artifact("train", metrics_path, "metrics")
    write_json(out_dir / "result.json", result.to_dict())
    cb.on_run_end("train", result)
    return result
