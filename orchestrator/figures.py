"""Figures of a search: each slot's searched cell, the final alpha, their evolution during search.

They read the engine's files (genotype JSON, alpha_history.npz) and write PNGs with matplotlib's Agg
backend; edge and op orders come from ``nas_core.search_space.ops``, nothing is typed in here.

The alpha figures are slides: 16:9 (16 x 9 in, 1920 x 1080 px), no text under 12 pt, at most
``MAX_PANELS`` panels. ``search_figures`` writes all of them into a run folder's ``figures/``:

    alpha_summary            one panel per module kind: the strongest op of every (slot, edge)
    alpha_final_KINDS_SLOTS  softmax(alpha) per edge and op, one panel per (kind, slot)
    alpha_evolution_...      the ops' weights over search epochs, one panel per (kind, slot)

where KINDS is ``sam``, ``cam`` or both (``sam-cam``) and SLOTS the first and last slot of the figure
(``down1-down4``) or ``all`` for a shared search's single alpha set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from nas_core.search_space.ops import N_NODES, OP_TABLES, edge_list

SLOT_NAMES = ("down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4")
SLIDE_SIZE = (16.0, 9.0)  # inches: 16:9, so a slide shows the figure whole
SLIDE_DPI = 120           # 1920 x 1080 px
MAX_PANELS = 4            # past four panels a slide's labels drop under what a room can read
# every text size of a slide figure; the smallest is 12 pt at 16 in wide
SLIDE_FONTS = {"font.size": 14, "axes.titlesize": 16, "axes.labelsize": 14, "xtick.labelsize": 13,
               "ytick.labelsize": 13, "legend.fontsize": 13, "legend.title_fontsize": 14, "figure.titlesize": 17}
CELL_FONT = 12            # the numbers and names printed inside heatmap cells


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
    """(epochs (E,) 0-based, {kind: (E, slots, edges, ops)}): a shared search's single alpha set counts
    as one slot."""
    with np.load(npz_path) as data:
        out = {kind: data[kind][:, None] if data[kind].ndim == 3 else data[kind]
               for kind in OP_TABLES if kind in data.files}
        if not out or "epochs" not in data.files:
            raise ValueError(f"{npz_path}: expected 'epochs' and one of {', '.join(OP_TABLES)} "
                             f"(the search's alpha_history.npz), found {', '.join(data.files) or 'nothing'}")
        return data["epochs"], out


def alpha_slots(npz_path: Path) -> int:
    """How many slot-wise alpha sets the history holds (8 synchronous, 1 shared)."""
    _, arrays = _alphas(npz_path)
    return max(a.shape[1] for a in arrays.values())


# ------------------------------------------------------------------ slide figures of alpha
Panel = tuple[str, int]  # (module kind, slot)


def epoch_ticks(ax, last: int, max_ticks: int = 10) -> None:
    """1-based integer epoch ticks on ``ax``'s x axis, 1 to ``last``: every epoch while they fit in
    ``max_ticks``, else 1 and the multiples of a round step (no half epochs, no epoch 0)."""
    last = max(1, int(last))
    step = next((s for s in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500) if last / s <= max_ticks),
                -(-last // max_ticks))
    ax.set_xticks([1] + [t for t in range(step, last + 1, step) if t > 1])
    ax.set_xlim(0.5, last + 0.5)
    ax.minorticks_off()


def _slide(n_panels: int):
    """(figure, axes list) of a 16:9 figure with ``n_panels`` <= MAX_PANELS: side by side up to two,
    then two rows of two."""
    plt = pyplot()
    if not 1 <= n_panels <= MAX_PANELS:
        raise ValueError(f"a slide figure holds 1 to {MAX_PANELS} panels, not {n_panels}")
    rows, cols = (1, n_panels) if n_panels <= 2 else (2, 2)
    fig, axes = plt.subplots(rows, cols, figsize=SLIDE_SIZE, squeeze=False, layout="constrained")
    axes = [ax for row in axes for ax in row]
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def _panel_title(kind: str, slot: int, n_slots: int) -> str:
    return f"{kind.upper()} {_slot_name(slot) if n_slots > 1 else 'all slots (shared search)'}"


def _panel_groups(arrays: Mapping[str, np.ndarray]) -> list[list[Panel]]:
    """The (kind, slot) panels in figures of at most MAX_PANELS: each kind's slots in runs of four
    (encoder, decoder); runs shorter than that share a figure with the next kind's (a shared search:
    SAM and CAM side by side)."""
    groups: list[list[Panel]] = []
    for kind, arr in arrays.items():
        slots = range(arr.shape[1])
        for i in range(0, len(slots), MAX_PANELS):
            run = [(kind, s) for s in slots[i:i + MAX_PANELS]]
            if groups and groups[-1][-1][0] != kind and len(groups[-1]) + len(run) <= MAX_PANELS:
                groups[-1] += run
            else:
                groups.append(run)
    return groups


def _group_name(prefix: str, group: Sequence[Panel], n_slots: int) -> str:
    kinds = "-".join(dict.fromkeys(k for k, _ in group))
    slots = "all" if n_slots == 1 else f"{_slot_name(group[0][1])}-{_slot_name(group[-1][1])}"
    return f"{prefix}_{kinds}_{slots}"


def _save_slide(fig, path: Path) -> Path:
    return save_figure(fig, path, dpi=SLIDE_DPI, layout=False)


def alpha_summary_figure(epochs: np.ndarray, arrays: Mapping[str, np.ndarray], path: Path) -> Path:
    """One panel per module kind: slots down, edges across; each cell names the edge's strongest op at
    the last epoch, prints its weight and takes the op's colour (the genotype figure's colours)."""
    plt = pyplot()
    colours = _op_colours()
    edges = [f"{a}->{b}" for a, b in edge_list()]
    with plt.rc_context(SLIDE_FONTS):
        fig, axes = _slide(len(arrays))
        for ax, (kind, arr) in zip(axes, arrays.items()):
            names = list(OP_TABLES[kind])
            final = arr[-1]  # (slots, edges, ops)
            best = final.argmax(-1)  # (slots, edges)
            # the op's colour washed towards white, so black text stays readable on every op
            rgb = np.array([[0.45 * np.asarray(_rgb(colours[names[o]])) + 0.55 for o in row] for row in best])
            ax.imshow(rgb, aspect="auto")
            for (s, e), o in np.ndenumerate(best):
                ax.text(e, s, f"{names[o]}\n{final[s, e, o]:.3f}", ha="center", va="center", fontsize=CELL_FONT)
            ax.set_xticks(range(len(edges)), edges)
            ax.set_yticks(range(final.shape[0]), [_slot_name(s) if final.shape[0] > 1 else "all (shared)"
                                                  for s in range(final.shape[0])])
            ax.set_xlabel("edge (from node -> to node)")
            ax.set_title(f"{kind.upper()}: strongest op per edge")
            ax.tick_params(length=0)
        fig.suptitle(f"Final softmax(alpha), search epoch {int(epochs[-1]) + 1}: each edge's strongest op "
                     f"and its weight")
        return _save_slide(fig, path)


def _rgb(colour) -> tuple[float, float, float]:
    import matplotlib.colors

    return matplotlib.colors.to_rgb(colour)


def alpha_final_figure(epochs: np.ndarray, arrays: Mapping[str, np.ndarray], group: Sequence[Panel],
                       path: Path) -> Path:
    """The last epoch's softmax(alpha) of each (kind, slot) in ``group``: edges down, ops across, values
    printed, a red box on each edge's strongest op. Each kind has one colour scale, from its smallest to
    its largest final weight, so small preferences stay visible."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    edges = [f"{a}->{b}" for a, b in edge_list()]
    n_slots = max(a.shape[1] for a in arrays.values())
    with plt.rc_context(SLIDE_FONTS):
        fig, axes = _slide(len(group))
        by_kind: dict[str, list] = {}
        for ax, (kind, slot) in zip(axes, group):
            names = list(OP_TABLES[kind])
            lo, hi = float(arrays[kind][-1].min()), float(arrays[kind][-1].max())
            hi = hi if hi > lo else lo + 1e-6
            final = arrays[kind][-1, slot]  # (edges, ops)
            image = ax.imshow(final, vmin=lo, vmax=hi, cmap="viridis", aspect="auto")
            for (e, o), v in np.ndenumerate(final):
                ax.text(o, e, f"{v:.3f}".lstrip("0") if v < 1 else "1", ha="center", va="center",
                        fontsize=CELL_FONT, color="black" if (v - lo) / (hi - lo) > 0.6 else "white")
            for e, o in enumerate(final.argmax(1)):
                ax.add_patch(Rectangle((o - 0.5, e - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
            ax.set_xticks(range(len(names)), names, rotation=30 if len(group) > 2 else 0)
            ax.set_yticks(range(len(edges)), edges)
            ax.set_title(_panel_title(kind, slot, n_slots))
            ax.tick_params(length=0)
            by_kind.setdefault(kind, [[], image])[0].append(ax)
        for kind, (kind_axes, image) in by_kind.items():
            fig.colorbar(image, ax=kind_axes, shrink=0.9, label=f"{kind.upper()} softmax(alpha)")
        fig.suptitle(f"Final softmax(alpha), search epoch {int(epochs[-1]) + 1} (edges down, ops across; "
                     f"red box: each edge's strongest op)")
        return _save_slide(fig, path)


def alpha_evolution_figure(epochs: np.ndarray, arrays: Mapping[str, np.ndarray], group: Sequence[Panel],
                           path: Path) -> Path:
    """softmax(alpha) over search epochs, one panel per (kind, slot) in ``group``: a line per op, its
    weight averaged over the cell's edges (each edge's own final weights are the final figure's).

    Each panel's y axis is scaled to its data, and a dotted line marks the uniform start, so short
    searches whose weights move by 1e-3 still show which op is rising. One legend, outside the panels."""
    plt = pyplot()
    colours = _op_colours()
    n_slots = max(a.shape[1] for a in arrays.values())
    x = np.asarray(epochs) + 1  # the engine counts from 0; the figure from 1, as the logs do
    marker = "o" if len(x) <= 12 else None
    with plt.rc_context(SLIDE_FONTS):
        fig, axes = _slide(len(group))
        handles: dict[str, Any] = {}
        for i, (ax, (kind, slot)) in enumerate(zip(axes, group)):
            mean = arrays[kind][:, slot].mean(axis=1)  # (E, ops)
            for o, op in enumerate(OP_TABLES[kind]):
                (line,) = ax.plot(x, mean[:, o], lw=2.2, color=colours[op], marker=marker, ms=5,
                                  linestyle="--" if op == "zero" else "-")
                handles.setdefault(op, line)
            ax.axhline(1 / len(OP_TABLES[kind]), color="0.6", lw=1.2, linestyle=":")
            ax.set_title(_panel_title(kind, slot, n_slots))
            epoch_ticks(ax, int(x[-1]))
            ax.grid(color="0.92", lw=0.8)
            if len(group) <= 2 or i >= len(group) - 2:
                ax.set_xlabel("search epoch")
            if i % (2 if len(group) > 2 else len(group)) == 0:
                ax.set_ylabel("softmax(alpha), edge mean")
        fig.legend(list(handles.values()), list(handles), title="op", loc="outside right upper", frameon=False)
        fig.suptitle("softmax(alpha) during the search, mean over each cell's "
                     f"{len(edge_list())} edges (dotted: uniform start)")
        return _save_slide(fig, path)


def search_figures(npz_path: Path, out_dir: Path, fmt: str = "png") -> list[Path]:
    """Every slide figure of a search's alpha history (alpha_history.npz) into ``out_dir`` (a run
    folder's ``figures/``): the summary, the final weights and the evolution (names in the module
    docstring). Returns the paths in reading order: summary, then final and evolution by kind and slot."""
    epochs, arrays = _alphas(Path(npz_path))
    n_slots = max(a.shape[1] for a in arrays.values())
    out_dir = Path(out_dir)
    paths = [alpha_summary_figure(epochs, arrays, out_dir / f"alpha_summary.{fmt}")]
    groups = _panel_groups(arrays)
    paths += [alpha_final_figure(epochs, arrays, g, out_dir / f"{_group_name('alpha_final', g, n_slots)}.{fmt}")
              for g in groups]
    paths += [alpha_evolution_figure(epochs, arrays, g,
                                     out_dir / f"{_group_name('alpha_evolution', g, n_slots)}.{fmt}")
              for g in groups]
    return paths


_ORDER = ("alpha_summary", "alpha_final", "alpha_evolution")


def _reading_order(path: Path) -> tuple:
    """search_figures' order for files found in a folder: summary, final, evolution; by kind, then slot."""
    stem = Path(path).stem
    prefix = next((i for i, p in enumerate(_ORDER) if stem == p or stem.startswith(p + "_")), len(_ORDER))
    rest = stem.removeprefix(_ORDER[prefix]).strip("_").split("_") if prefix < len(_ORDER) else []
    kinds = list(OP_TABLES)
    kind = min((kinds.index(k) for k in (rest[0].split("-") if rest else []) if k in kinds), default=-1)
    first = rest[1].split("-")[0] if len(rest) > 1 else ""
    return prefix, kind, SLOT_NAMES.index(first) if first in SLOT_NAMES else -1, Path(path).name


def search_figures_in(folder: Path) -> list[Path]:
    """The alpha slide figures (PNG or SVG) a search left in ``folder``, in ``search_figures``' order."""
    found = [p for ext in ("png", "svg") for p in Path(folder).glob(f"alpha_*.{ext}")]
    return sorted(found, key=_reading_order)


# ------------------------------------------------------------------ the MLflow run's figures
def alpha_heatmap(npz_path: Path, path: Path) -> Path:
    """The final alpha of every slot on one slide: ``alpha_summary_figure``."""
    epochs, arrays = _alphas(Path(npz_path))
    return alpha_summary_figure(epochs, arrays, path)


def alpha_figure(npz_path: Path, path: Path, slot: int = 0) -> Path:
    """softmax(alpha) of one slot over search epochs, a panel per module kind (``alpha_evolution_figure``);
    a shared search has one slot, whatever ``slot`` says."""
    epochs, arrays = _alphas(Path(npz_path))
    group = [(kind, min(slot, arr.shape[1] - 1)) for kind, arr in arrays.items()]
    return alpha_evolution_figure(epochs, arrays, group, path)
