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


def run_title(phase: str, out_dir: Path, cfg=None) -> str:
    """A curve's title, who the run is: ``retrain: nas-scam-p-sync, seed 1 (draw 1, fold 2)``, read
    from the run folder's name (``specs.run_name``). A folder named otherwise (an HPO trial's
    ``train__METHOD__TRIALID``, a single run's own folder) gives its method where it names one, else the
    config's model, and the config's seed."""
    from orchestrator.specs import parse_run_name

    label = "search" if phase == "search" else "retrain"
    name = Path(out_dir).name
    run = parse_run_name(name)
    if run is not None:
        extra = [f"{k} {v}" for k, v in (("draw", run.draw), ("fold", run.fold)) if v is not None]
        extra += [run.variant] if run.variant else []
        return f"{label}: {run.method}, seed {run.seed}" + (f" ({', '.join(extra)})" if extra else "")
    parts = name.split("__")
    method = parts[1] if len(parts) > 1 and parts[0] in ("search", "train") else getattr(
        getattr(cfg, "model", None), "name", name)
    seed = getattr(cfg, "seed", None)
    return f"{label}: {method}" + (f", seed {seed}" if seed is not None else "")


def curve_figure(history: Sequence[Mapping[str, Any]], path: Path, title: str = "", warmup: int = 0,
                 flagged: bool = False, judged_from: int | None = None) -> Path:
    """Train loss (and alpha loss in a search) and validation DSC (%) against epoch (1-based integer
    ticks); ``warmup`` epochs shaded (a search's weights-only phase; a retrain has none: pass 0). The
    legend sits outside the axes, right of them, where it covers no line. ``flagged`` adds "no learning"
    to the title, judged from epoch ``judged_from`` + 1 (default: after the warm-up)."""
    from orchestrator.figures import epoch_ticks

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.0, 4.5), layout="constrained")  # 16:9
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
    epoch_ticks(ax, max([int(h["epoch"]) + 1 for h in history] or [1]))
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    if lines[0] or lines2[0]:
        fig.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="outside right upper", frameon=False)
    if flagged:
        note = f"NO LEARNING (val DSC 0 from epoch {(warmup if judged_from is None else judged_from) + 1})"
        title = f"{title}: {note}" if title else note
    ax.set_title(title, fontsize=11)
    return save_figure(fig, path, layout=False)


def learning_curve(phase: str, cfg, result, out_dir: Path) -> tuple[Path, bool]:
    """After a phase: its curve written into ``out_dir`` (``FIGURE``) and whether it did not learn, with a
    warning line in the trial's log when it did not: (path, flag). The recorder logs both (the figure
    under figures/, the flag as the run's ``no_learning`` tag)."""
    history = list(getattr(result, "history", None) or [])
    warmup = warmup_epochs(phase, cfg)
    flagged = no_learning(history, warmup)
    # only a search has a warm-up to shade; a retrain's unjudged first epochs are no phase of its own
    path = curve_figure(history, Path(out_dir) / FIGURE, run_title(phase, out_dir, cfg),
                        warmup if phase == "search" else 0, flagged, judged_from=warmup)
    if flagged:
        log.warning("%s: validation DSC stayed 0 after warm-up (epochs >= %d): no learning; see %s",
                    Path(out_dir).name, warmup + 1, path)
    return path, flagged
