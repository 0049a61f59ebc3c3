"""First-order DARTS bilevel search of NAS-SCAM (method.md section 5).

Weights w are updated on class-balanced training crops, alpha on class-balanced alpha-update crops
(the validation images' buckets, augmented the same way), each with the other frozen. ``paper``
alternates a w step and an alpha step per iteration after the warm-up; ``code`` alternates per epoch
(``epoch % 3 == 0`` -> w epoch) and rebuilds Adam every epoch. Epoch lengths follow
:func:`nas_core.engine.batches.epoch_lengths`; each batch stream (w, alpha) walks its buckets on from
where the previous epoch left it.

Validation (method.md 5a): with ``val_timing="start"`` (both protocols) at the start of every epoch
with ``epoch % val_every == 0``, before that epoch trains, so the final state is never validated; the
genotype is the argmax of alpha in the best-validated checkpoint among ``search.genotype_epochs()``
(the release: epochs > 60; the paper: after the warm-up). ``best_epoch`` is the epoch of that
validation: with "start" timing, also the number of epochs its weights had trained.

``run_search`` tells an epoch's story in its own body: the set-up, then per epoch the validation due
at its start, the alternation of w and alpha steps, and the epoch tail (losses, alpha's softmax,
validation due at its end, ``last.pt``); then the genotype of the best checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from nas_core.config import ConfigError, RunConfig
from nas_core.engine.batches import alpha_batches, epoch_lengths, search_steps, train_batches
from nas_core.engine.callbacks import Callback, CallbackList
from nas_core.engine.checkpoint import read_checkpoint
from nas_core.engine.context import TrainingError, adam, prepare_model, setup_run
from nas_core.engine.rundir import guard_out_dir, read_result, resume_from_last, write_json
from nas_core.engine.steps import epoch_losses, optimisation_step, progress
from nas_core.engine.tail import EpochTail

# result.json's file entries, pointed into the run folder as it lies when read back
RESULT_PATHS = ("genotype_path", "alpha_history_path", "checkpoint_path")


@dataclass
class SearchResult:
    genotype: object  # nas_core.search_space.genotype.Genotype
    genotype_path: Path
    best_epoch: int
    best_val: dict
    history: list = field(default_factory=list)
    alpha_history_path: Path | None = None
    checkpoint_path: Path | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["genotype"] = self.genotype.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        from nas_core.search_space.genotype import Genotype

        d = dict(d)
        d["genotype"] = Genotype.from_json(d["genotype"])
        for k in RESULT_PATHS:
            d[k] = Path(d[k]) if d.get(k) else None
        return cls(**d)


def epoch_mode(cfg: RunConfig, epoch: int) -> str:
    """'w' (weights only), 'alternate' (w step then alpha step per iteration) or 'alpha' (alpha only)."""
    s = cfg.search
    if epoch < s.warmup_epochs:
        return "w"
    if s.alternation == "iteration":
        return "alternate"
    return "w" if epoch % 3 == 0 else "alpha"


@contextlib.contextmanager
def frozen(params):
    """Alpha steps compute no weight gradients: it is cheaper and leaves w exactly as it was."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _check_searchable(cfg: RunConfig) -> None:
    from nas_core.models import NAS_MODELS

    if cfg.model.name not in NAS_MODELS:
        raise ConfigError(f"model.name: search needs one of {', '.join(NAS_MODELS)}, got {cfg.model.name!r}")


def _supernet(cfg: RunConfig):
    """The supernet the config names, freshly initialised (from the seed ``setup_run`` set)."""
    from nas_core.models import create_model

    return create_model(cfg.model.name, supernet=cfg.model.search, zero_op=cfg.model.zero_op, impl=cfg.model.impl)


def _optimizers(model, cfg: RunConfig, device: torch.device) -> dict:
    return {
        "w": adam(model.weight_parameters(), cfg.search.lr_w, device),
        "alpha": adam(model.arch_parameters(), cfg.search.lr_alpha, device),
    }


def _stream_positions(cfg: RunConfig, lengths: dict, start: int) -> tuple[int, int]:
    """Batches the w and alpha streams gave the epochs before ``start`` (where a resume goes on)."""
    done = [search_steps(epoch_mode(cfg, e), lengths) for e in range(start)]
    return sum(d[0] for d in done), sum(d[1] for d in done)


def _record_alpha(state: dict, epoch: int, model) -> None:
    """Append softmax(alpha) of every module kind to the loop state (alpha_history.npz at the end)."""
    state["alpha_epochs"].append(epoch)
    for k, v in model.alphas().items():
        state["alpha"].setdefault(k, []).append(torch.softmax(v.detach().float(), dim=-1).cpu())


def _save_genotype(out_dir: Path, state: dict, window: set[int]) -> tuple[object, Path]:
    """The genotype of the best checkpoint in the window, written to genotype.json."""
    from nas_core.search_space.genotype import Genotype

    if state["best_epoch"] < 0:
        raise TrainingError(f"search ended without a validation in its genotype window (epochs {sorted(window)})")
    genotype = Genotype.from_json(read_checkpoint(out_dir / "best.pt")["genotype"])
    return genotype, genotype.save(out_dir / "genotype.json")


def _save_alpha_history(out_dir: Path, state: dict) -> Path:
    """softmax(alpha) after every epoch: ``epochs`` (E,) and one (E, *alpha shape) array per module kind."""
    path = out_dir / "alpha_history.npz"
    np.savez(path, epochs=np.asarray(state["alpha_epochs"]),
             **{k: torch.stack(v).numpy() for k, v in state["alpha"].items()})
    return path


def run_search(cfg: RunConfig, out_dir: Path, callbacks: Sequence[Callback] = (), resume: bool = True) -> SearchResult:
    """Search a NAS-SCAM genotype. Writes genotype.json, alpha_history.npz, best.pt, last.pt, result.json."""
    out_dir, cb = Path(out_dir), CallbackList(callbacks)
    if resume and (out_dir / "result.json").exists():
        return SearchResult.from_dict(read_result(out_dir, RESULT_PATHS))
    guard_out_dir(out_dir, resume, "search")
    _check_searchable(cfg)  # before any data work

    # set-up: data and loss, the supernet, both optimisers, the loop state (from last.pt on resume)
    s = cfg.search
    ctx = setup_run(cfg, out_dir)
    model = prepare_model(_supernet(cfg), ctx)
    opts = _optimizers(model, cfg, ctx.device)
    state = {"best_score": None, "best_epoch": -1, "best_val": {}, "history": [], "alpha_epochs": [], "alpha": {}}
    start = 0
    if resume:
        state, start = resume_from_last(out_dir, cfg, model, opts, state)
    cb.on_run_start("search", cfg, out_dir)
    lengths = epoch_lengths(cfg, ctx.data)
    window = set(s.genotype_epochs())
    w_pos, a_pos = _stream_positions(cfg, lengths, start)  # each stream goes on where earlier epochs left it
    tail = EpochTail("search", ctx, model, state, cb, s.validation_epochs(), s.val_timing,
                     may_be_best=window.__contains__, genotype=lambda: model.genotype().to_dict())

    for epoch in range(start, s.epochs):
        metrics = tail.begin(epoch)  # validates first when due at the epoch's start (the release)
        if s.reset_optimizer_each_epoch:  # the release rebuilds Adam every epoch
            opts = _optimizers(model, cfg, ctx.device)

        # the alternation: w steps with alpha frozen, alpha steps with w frozen, as the epoch's mode says
        mode = epoch_mode(cfg, epoch)
        n_w, n_a = search_steps(mode, lengths)
        model.train()
        w_losses, a_losses = [], []
        w_iter = train_batches(ctx, s.per_class, n_w, epoch, w_pos, s.sampler) if n_w else None
        a_iter = alpha_batches(ctx, s.per_class, n_a, epoch, a_pos, s.sampler) if n_a else None
        w_pos, a_pos = w_pos + n_w, a_pos + n_a
        n_iter = max(n_w, n_a)
        for it in progress(range(n_iter), n_iter, f"search {epoch + 1}/{s.epochs} [{mode}]"):
            where = f"search epoch {epoch} iteration {it}"
            if w_iter is not None:
                with frozen(model.arch_parameters()):
                    w_losses.append(optimisation_step(model, next(w_iter), opts["w"], ctx, where + " (w step)"))
            if a_iter is not None:
                with frozen(model.weight_parameters()):
                    a_losses.append(optimisation_step(model, next(a_iter), opts["alpha"], ctx, where + " (alpha step)"))

        # the epoch tail: mean losses, alpha's softmax, validation when due at the end, last.pt, callbacks
        metrics["mode_alpha"] = float(mode != "w")
        epoch_losses(metrics, "train_loss", w_losses, ctx)
        epoch_losses(metrics, "alpha_loss", a_losses, ctx)
        metrics.update({f"lr_{k}": float(o.param_groups[0]["lr"]) for k, o in opts.items()})  # lr_w, lr_alpha
        _record_alpha(state, epoch, model)
        tail.end(epoch, metrics, opts)

    # the outcome: the best checkpoint's genotype, alpha's history, result.json
    genotype, genotype_path = _save_genotype(out_dir, state, window)
    alpha_path = _save_alpha_history(out_dir, state)
    result = SearchResult(genotype=genotype, genotype_path=genotype_path, best_epoch=state["best_epoch"],
                          best_val=state["best_val"], history=state["history"], alpha_history_path=alpha_path,
                          checkpoint_path=out_dir / "best.pt")
    for path, kind in ((genotype_path, "genotype"), (alpha_path, "alpha_history"), (out_dir / "best.pt", "checkpoint")):
        cb.on_artifact("search", path, kind)
    write_json(out_dir / "result.json", result.to_dict())
    cb.on_run_end("search", result)
    return result


__all__ = ["SearchResult", "run_search", "epoch_mode"]
