"""Learning a user can watch: each trial's learning curve and a "no learning" flag decided from its history.

The engine's per-epoch history (``TrainResult.history`` / ``SearchResult.history``: dicts with
``epoch``, ``train_loss``, ``alpha_loss`` in a search, and ``val_dsc`` on validation epochs) is what
both read; ``val_dsc`` per epoch also reaches MLflow as a metric (``Tracker.log_epoch``, step = epoch).

"No learning": every validation DSC after warm-up is 0 (within ``tol``). Warm-up is the search's
``search.warmup_epochs`` (the weights-only phase; alpha is frozen) and, for a retrain, which has no
warm-up of its own, its first quarter (at least one epoch), where an all-background prediction is
normal. A history with no validation after warm-up is not flagged: nothing shows it failed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from orchestrator.figures import pyplot, save_figure

log = logging.getLogger(__name__)
TAG = "no_learning"
FIGURE = "learning_curve.png"


def train_warmup(epochs: int) -> int:
    """Epochs of a retrain not judged by ``no_learning``: the first quarter, at least one."""
    return max(1, int(epochs) // 4)


def warmup_epochs(phase: str, cfg) -> int:
    """Warm-up of one phase of a RunConfig (see the module docstring)."""
    return int(cfg.search.warmup_epochs) if phase == "search" else train_warmup(cfg.train.epochs)


def no_learning(history: Sequence[Mapping[str, Any]], warmup: int, tol: float = 1e-6) -> bool:
    """True when the run validated at least once at epoch >= ``warmup`` and every such val_dsc <= ``tol``
    (NaN counts as 0: no class predicted or present anywhere)."""
    late = [h["val_dsc"] for h in history if "val_dsc" in h and int(h["epoch"]) >= warmup]
    return bool(late) and all(v is None or math.isnan(float(v)) or float(v) <= tol for v in late)


def retrain_did_not_learn(history: Sequence[Mapping[str, Any]]) -> bool:
    """A finished retrain's own verdict from its saved history (warm-up from the epochs it ran)."""
    return no_learning(history, train_warmup(len(history)))


def curve_figure(history: Sequence[Mapping[str, Any]], path: Path, title: str = "", warmup: int = 0,
                 flagged: bool = False) -> Path:
    """Train loss (and alpha loss in a search) and validation DSC (%) against epoch; warm-up shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for key, style in (("train_loss", "-"), ("alpha_loss", "--")):
        pts = [(h["epoch"] + 1, h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), style, color="tab:blue", label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    val = [(h["epoch"] + 1, 100 * float(h["val_dsc"])) for h in history if "val_dsc" in h]
    if val:
        ax2.plot(*zip(*val), "o-", color="tab:red", label="val DSC")
    ax2.set_ylabel("validation DSC (%)", color="tab:red")
    ax2.set_ylim(0, 100)
    if warmup:
        ax.axvspan(0.5, warmup + 0.5, color="0.9", zorder=0, label="warm-up")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper right")
    ax.set_title((title + (": NO LEARNING (val DSC 0 after warm-up)" if flagged else "")).strip(": "), fontsize=9)
    return save_figure(fig, path)


def publish(c, run_id: str, phase: str, cfg, result, out_dir: Path) -> bool:
    """After a phase: the curve into ``out_dir`` and the run's artifacts (figures/), the flag as a run
    tag and a warning line in the trial's log. Returns the flag."""
    history = list(getattr(result, "history", None) or [])
    warmup = warmup_epochs(phase, cfg)
    flagged = no_learning(history, warmup)
    path = curve_figure(history, Path(out_dir) / FIGURE, Path(out_dir).name, warmup, flagged)
    c.log_artifact(run_id, str(path), "figures")
    if flagged:
        c.set_tag(run_id, TAG, "true")
        log.warning("%s: validation DSC stayed 0 after warm-up (epochs >= %d): no learning; see %s",
                    Path(out_dir).name, warmup + 1, path)
    return flagged

