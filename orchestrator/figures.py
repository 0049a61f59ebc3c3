"""Figures logged with the runs: each slot's searched cell, and the evolution of alpha during search.

Both read the engine's files (genotype JSON, alpha_history.npz) and write PNGs with matplotlib's Agg
backend; edge and op orders come from ``nas_core.search_space.ops``, nothing is typed in here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nas_core.search_space.ops import N_NODES, OP_TABLES, edge_list

SLOT_NAMES = ("down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4")


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _node_xy(n_nodes: int = N_NODES) -> dict[int, tuple[float, float]]:
    # input and output on the base line, hidden nodes on a row above: every edge label lands apart
    xy = {0: (0.0, 0.0), n_nodes: (float(n_nodes), 0.0)}
    for k in range(1, n_nodes):
        xy[k] = (float(k), 1.0)
    return xy


def _draw_cell(ax, ops: list[str], title: str) -> None:
    xy = _node_xy()
    for (src, dst), op in zip(edge_list(), ops):
        (x0, y0), (x1, y1) = xy[src], xy[dst]
        zero = op == "zero"
        # edges between hidden nodes would run through the nodes between them: bend those
        rad = -0.4 if dst - src > 1 and y0 == y1 and y0 > 0 else 0.0
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", lw=0.8, color="0.75" if zero else "tab:blue",
                                    linestyle="--" if zero else "-", shrinkA=7, shrinkB=7,
                                    connectionstyle=f"arc3,rad={rad}"))
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2 - rad * (x1 - x0) / 2
        ax.text(mx, my, op, fontsize=5.5, ha="center", va="center", color="0.5" if zero else "black",
                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
    for k, (x, y) in xy.items():
        ax.scatter([x], [y], s=90, c="tab:orange" if k in (0, N_NODES) else "tab:green", zorder=3)
        ax.text(x, y, str(k), fontsize=6, ha="center", va="center", zorder=4)
    ax.set_title(title, fontsize=7)
    ax.set_xlim(-0.4, N_NODES + 0.4)
    ax.set_ylim(-0.4, 1.5)
    ax.axis("off")


def genotype_figure(genotype: Mapping[str, Any], path: Path) -> Path:
    """One row per module kind present (SAM, CAM), one DAG panel per slot, op names on the edges.

    ``genotype`` is the public JSON dict (``Genotype.to_dict()``): ``sam``/``cam`` = slots x edges names.
    """
    plt = _plt()
    kinds = [k for k in OP_TABLES if genotype.get(k)]
    n_slots = len(genotype[kinds[0]])
    fig, axes = plt.subplots(len(kinds), n_slots, figsize=(2.0 * n_slots, 1.6 * len(kinds)), squeeze=False)
    for r, kind in enumerate(kinds):
        for s, ops in enumerate(genotype[kind]):
            name = SLOT_NAMES[s] if s < len(SLOT_NAMES) else f"slot{s}"
            _draw_cell(axes[r][s], list(ops), f"{kind.upper()} slot {s} ({name})")
    fig.suptitle(f"genotype: {genotype.get('combine', '?')} combine, {genotype.get('search', '?')} search",
                 fontsize=8)
    return save_figure(fig, path, dpi=130)


def alpha_figure(npz_path: Path, path: Path) -> Path:
    """Softmaxed alpha over search epochs: rows = module kind, columns = edges, one line per op.

    Arrays are (E, [slots,] edges, ops); synchronous alpha are averaged over the slots (the band shows
    the min..max over slots).
    """
    plt = _plt()
    data = np.load(npz_path)
    epochs = data["epochs"]
    kinds = [k for k in OP_TABLES if k in data.files]
    edges = edge_list()
    fig, axes = plt.subplots(len(kinds), len(edges), figsize=(2.4 * len(edges), 2.2 * len(kinds)),
                             squeeze=False, sharex=True)
    for r, kind in enumerate(kinds):
        arr = data[kind]  # (E, edges, ops) shared or (E, slots, edges, ops) synchronous
        if arr.ndim == 3:
            arr = arr[:, None]
        names = list(OP_TABLES[kind])
        for e, (src, dst) in enumerate(edges):
            ax = axes[r][e]
            for o, op in enumerate(names):
                w = arr[:, :, e, o]  # (E, slots)
                line, = ax.plot(epochs, w.mean(1), lw=1, label=op)
                if w.shape[1] > 1:
                    ax.fill_between(epochs, w.min(1), w.max(1), color=line.get_color(), alpha=0.15, lw=0)
            ax.set_title(f"{kind.upper()} edge {src}->{dst}", fontsize=7)
            ax.tick_params(labelsize=6)
        axes[r][0].set_ylabel("softmax(alpha)", fontsize=7)
        axes[r][-1].legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=7)
    return save_figure(fig, path, dpi=110)
