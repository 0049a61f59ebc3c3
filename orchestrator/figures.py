"""Figures logged with the runs: each slot's searched cell, the final alpha, their evolution during search.

Both read the engine's files (genotype JSON, alpha_history.npz) and write PNGs with matplotlib's Agg
backend; edge and op orders come from ``nas_core.search_space.ops``, nothing is typed in here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from nas_core.search_space.ops import N_NODES, OP_TABLES, edge_list

SLOT_NAMES = ("down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4")


def save_figure(fig, path: Path, dpi: int = 110, layout: bool = True) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend with SVG text kept as text (every figure module draws with it)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text: a fifth of the size, searchable
    import matplotlib.pyplot as plt

    return plt


# one colour per op, the same in every figure (op tables share their leading names)
def _op_colours() -> dict[str, Any]:
    import matplotlib

    names = [op for op in dict.fromkeys(op for table in OP_TABLES.values() for op in table) if op != "zero"]
    cmap = matplotlib.colormaps["tab10"]
    palette = [cmap(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]  # tab10 without its grey: grey means zero
    return {"zero": "0.6", **{op: palette[i % len(palette)] for i, op in enumerate(names)}}


def _draw_cell(ax, sam: list[str] | None, cam: list[str] | None, title: str) -> None:
    """One slot: nodes 0..N on a line, SAM edges as arcs above it and CAM edges as arcs below.

    Each arc rises in proportion to the span of its edge, so an op's label sits at its arc's apex:
    arcs of one span have apexes one node apart, arcs of different spans different heights; no two
    labels meet. A ``zero`` edge is drawn dashed and grey (the edge is absent from the cell).
    """
    from matplotlib.patches import Arc

    colours = _op_colours()
    for sign, ops, kind in ((1, sam, "SAM"), (-1, cam, "CAM")):
        if not ops:
            continue
        for (src, dst), op in zip(edge_list(), ops):
            span, mid = dst - src, (src + dst) / 2
            height = 0.42 * span
            zero = op == "zero"
            theta = (0, 180) if sign > 0 else (180, 360)
            ax.add_patch(Arc((mid, 0), span, 2 * height, theta1=theta[0], theta2=theta[1],
                             color=colours[op], lw=1.0 if zero else 1.8, linestyle="--" if zero else "-"))
            ax.text(mid, sign * height, op, fontsize=7, ha="center", va="center", color="0.35" if zero else "black",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=colours[op], lw=0.6))
        ax.text(-0.45, sign * 0.55, kind, fontsize=7, ha="right", va="center", rotation=90, color="0.3")
    for k in range(N_NODES + 1):
        io = k in (0, N_NODES)
        ax.scatter([k], [0], s=170, c="tab:orange" if io else "tab:green", zorder=3, edgecolors="white")
        ax.text(k, 0, "in" if k == 0 else ("out" if k == N_NODES else str(k)), fontsize=5.5, ha="center",
                va="center", zorder=4, color="white", fontweight="bold")
    ax.set_title(title, fontsize=8)
    ax.set_xlim(-0.7, N_NODES + 0.3)
    ax.set_ylim(-0.42 * N_NODES - 0.3, 0.42 * N_NODES + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")


def _slot_name(s: int) -> str:
    return SLOT_NAMES[s] if s < len(SLOT_NAMES) else f"slot{s}"


def genotype_figure(genotype: Mapping[str, Any], path: Path) -> Path:
    """One panel per slot (encoder row, decoder row); SAM ops above the nodes, CAM ops below.

    ``genotype`` is the public JSON dict (``Genotype.to_dict()``): ``sam``/``cam`` = slots x edges names.
    """
    plt = pyplot()
    kinds = [k for k in OP_TABLES if genotype.get(k)]
    n_slots = len(genotype[kinds[0]])
    cols = min(4, n_slots)
    rows = -(-n_slots // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows), squeeze=False)
    for s in range(rows * cols):
        ax = axes[s // cols][s % cols]
        if s >= n_slots:
            ax.axis("off")
            continue
        _draw_cell(ax, genotype.get("sam", [None] * n_slots)[s] if "sam" in kinds else None,
                   genotype.get("cam", [None] * n_slots)[s] if "cam" in kinds else None,
                   f"slot {s}: {_slot_name(s)}")
    fig.suptitle(f"Searched attention cells: {genotype.get('combine', '?')} combination, "
                 f"{genotype.get('search', '?')} search (SAM above, CAM below each cell; dashed = zero)",
                 fontsize=9)
    return save_figure(fig, path, dpi=130)


def _alphas(npz_path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(epochs, {kind: (E, slots, edges, ops)}): a shared search's single alpha set counts as one slot."""
    data = np.load(npz_path)
    out = {}
    for kind in OP_TABLES:
        if kind in data.files:
            arr = data[kind]
            out[kind] = arr[:, None] if arr.ndim == 3 else arr
    return data["epochs"], out


def alpha_slots(npz_path: Path) -> int:
    """How many slot-wise alpha sets the history holds (8 synchronous, 1 shared)."""
    _, arrays = _alphas(npz_path)
    return max(a.shape[1] for a in arrays.values())


def alpha_heatmap(npz_path: Path, path: Path) -> Path:
    """The final softmaxed alpha, one heatmap per (kind, slot): edges down, ops across, values printed.

    Slots run four to a row (encoder row, then decoder row) for each kind; each kind has its own
    colour scale from its smallest to its largest weight, so small preferences stay visible.
    """
    plt = pyplot()
    from matplotlib.patches import Rectangle

    epochs, arrays = _alphas(npz_path)
    kinds = list(arrays)
    n_slots = max(a.shape[1] for a in arrays.values())
    cols = min(4, n_slots)
    per_kind = -(-n_slots // cols)
    edges = [f"{a}->{b}" for a, b in edge_list()]
    width = 0.5 * max(len(OP_TABLES[k]) for k in kinds)
    fig, axes = plt.subplots(len(kinds) * per_kind, cols, squeeze=False, layout="constrained",
                             figsize=(width * cols + 1.6, 2.5 * len(kinds) * per_kind + 0.6))
    for k, kind in enumerate(kinds):
        names = list(OP_TABLES[kind])
        final_all = arrays[kind][-1]  # (slots, edges, ops)
        lo, hi = float(final_all.min()), float(final_all.max())
        hi = hi if hi > lo else lo + 1e-6
        row_axes = []
        for s in range(per_kind * cols):
            ax = axes[k * per_kind + s // cols][s % cols]
            row_axes.append(ax)
            if s >= n_slots:
                ax.axis("off")
                continue
            final = final_all[min(s, final_all.shape[0] - 1)]  # (edges, ops)
            image = ax.imshow(final, vmin=lo, vmax=hi, cmap="viridis", aspect="auto")
            for (e, o), v in np.ndenumerate(final):
                ax.text(o, e, f"{v:.3f}".lstrip("0") if v < 1 else "1", ha="center", va="center", fontsize=5.5,
                        color="black" if (v - lo) / (hi - lo) > 0.6 else "white")
            for e, o in enumerate(final.argmax(1)):
                ax.add_patch(Rectangle((o - 0.5, e - 0.5), 1, 1, fill=False, ec="red", lw=1.3))
            ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6.5)
            ax.set_yticks(range(len(edges)), edges if s % cols == 0 else [""] * len(edges), fontsize=6.5)
            ax.set_title(f"{kind.upper()} {_slot_name(s) if n_slots > 1 else 'all slots (shared search)'}",
                         fontsize=8)
        fig.colorbar(image, ax=row_axes, fraction=0.03, pad=0.01, label=f"{kind.upper()} softmax(alpha)")
    fig.suptitle(f"Final softmax(alpha) after search epoch {int(epochs[-1]) + 1}; red box: the strongest op "
                 f"of each edge", fontsize=9)
    return save_figure(fig, path, dpi=130, layout=False)


def alpha_figure(npz_path: Path, path: Path, slot: int = 0) -> Path:
    """Softmaxed alpha of one slot over search epochs: rows = module kind, columns = edges, a line per op.

    The y axis of each kind is scaled to its data (a dotted line marks the uniform start), so early or
    short searches whose weights move by 1e-3 still show which op is rising."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs, arrays = _alphas(npz_path)
    kinds = list(arrays)
    edges = edge_list()
    colours = _op_colours()
    fig, axes = plt.subplots(len(kinds), len(edges), figsize=(2.2 * len(edges) + 1.2, 2.0 * len(kinds) + 0.5),
                             squeeze=False, sharex=True, sharey="row")
    for r, kind in enumerate(kinds):
        arr = arrays[kind][:, min(slot, arrays[kind].shape[1] - 1)]  # (E, edges, ops)
        for e, (src, dst) in enumerate(edges):
            ax = axes[r][e]
            for o, op in enumerate(OP_TABLES[kind]):
                ax.plot(epochs + 1, arr[:, e, o], lw=1.4, color=colours[op], label=op,
                        linestyle="--" if op == "zero" else "-")
            # the uniform weight alpha starts from: what "no preference" looks like
            ax.axhline(1 / len(OP_TABLES[kind]), color="0.75", lw=0.8, linestyle=":")
            ax.set_title(f"{kind.upper()} edge {src}->{dst}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[r][0].set_ylabel("softmax(alpha)", fontsize=7)
        axes[r][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), title=kind.upper(),
                           title_fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("search epoch", fontsize=7)
    shared = max(a.shape[1] for a in arrays.values()) == 1
    fig.suptitle(f"alpha during the search, {'all slots (shared search)' if shared else f'slot {slot}: {_slot_name(slot)}'}",
                 fontsize=9)
    return save_figure(fig, path, dpi=110)
