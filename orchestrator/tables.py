"""Table 2: per-seed test DSC -> mean +- std per method and class, beside the paper.

The spread is the population std (``std="population"``, ddof=0, the release's ``np.std``) by default
or the sample std (``"sample"``, ddof=1); every rendering (text, md, csv, tex, png) states which, and
how the seeds were repeated (``repeat``: ``retrain`` = one search per NAS method, a retrain per seed;
``full`` = search + retrain per seed). Input records are one dict per (method, seed) with DSC fractions
in [0, 1] (the engine's ``test["dsc"]``); every rendering is in percent. Pure pandas/matplotlib: no
Ray, no MLflow.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Iterable, Mapping, Optional

import pandas as pd

from nas_core.classes import TABLE_ORDER as CLASSES  # the paper's column order
from orchestrator.figures import save_figure
from orchestrator.specs import METHODS

REFERENCE_CSV = Path(__file__).resolve().parents[1] / "experiments" / "reference_table2.csv"
DDOF = {"population": 0, "sample": 1}
REPEATS = {"retrain": "one search per NAS method, a retrain per seed",
           "full": "a search and a retrain per seed"}


def note(std: str = "population", repeat: Optional[str] = None) -> str:
    """What the numbers are: ``mean +- population std (ddof=0) over n seeds ...; repeat=retrain (...)``."""
    if std not in DDOF:
        raise ValueError(f"std: {std!r} is not one of {', '.join(DDOF)}")
    text = f"mean +- {std} std (ddof={DDOF[std]}) over n seeds, DSC in %, global over the test set"
    if repeat is not None:
        if repeat not in REPEATS:
            raise ValueError(f"repeat: {repeat!r} is not one of {', '.join(REPEATS)}")
        text += f"; repeat={repeat} ({REPEATS[repeat]})"
    return text


_KEYS = ("variant", "method", "seed", "draw", "fold")


def _long(records: Iterable[Mapping]) -> pd.DataFrame:
    """One row per (variant, method, seed, draw, fold, class) with the DSC in %; a record without the
    grid's extra dimensions has variant "" and draw / fold -1."""
    rows = [{"variant": r.get("variant") or "", "method": r["method"], "seed": int(r["seed"]),
             "draw": -1 if r.get("draw") is None else int(r["draw"]),
             "fold": -1 if r.get("fold") is None else int(r["fold"]), "class": c, "dsc": 100.0 * float(r[c])}
            for r in records for c in CLASSES]
    if not rows:
        return pd.DataFrame(columns=[*_KEYS, "class", "dsc"])
    return pd.DataFrame(rows).drop_duplicates([*_KEYS, "class"], keep="last")


def _ordered(out: pd.DataFrame) -> pd.DataFrame:
    order = {m: i for i, m in enumerate(METHODS)}
    variants = {v: i for i, v in enumerate(dict.fromkeys(out["variant"]))}
    out = out.assign(_v=out["variant"].map(variants), _m=out["method"].map(lambda m: order.get(m, len(order))),
                     _c=out["class"].map(CLASSES.index))
    return out.sort_values(["_v", "_m", "_c"]).drop(columns=["_v", "_m", "_c"]).reset_index(drop=True)


def summarize(records: Iterable[Mapping], std: str = "population") -> pd.DataFrame:
    """Records ``{"method", "seed", <class>: fraction}`` (and, in larger grids, ``variant``, ``draw``,
    ``fold``) -> long frame (variant, method, class, mean, std, n, folds) in %.

    A replicate is one (seed, draw): its value is the mean over the folds it ran on (each fold's global
    DSC), and ``n`` counts replicates, ``folds`` the folds averaged. ``std``: "population" (ddof=0) or
    "sample" (ddof=1) over replicates. NaN when a method has a single replicate in both cases: one run
    has no spread to report, and a printed 0 would claim one.
    """
    if std not in DDOF:
        raise ValueError(f"std: {std!r} is not one of {', '.join(DDOF)}")
    ddof = DDOF[std]
    df = _long(records)
    if df.empty:
        return pd.DataFrame(columns=["method", "class", "mean", "std", "n", "folds", "folds_max", "variant"])
    reps = df.groupby(["variant", "method", "seed", "draw", "class"], sort=False).agg(
        dsc=("dsc", "mean"), folds=("fold", "nunique")).reset_index()
    out = reps.groupby(["variant", "method", "class"], sort=False).agg(
        mean=("dsc", "mean"), std=("dsc", lambda s: s.std(ddof=ddof) if len(s) > 1 else float("nan")),
        n=("dsc", "count"), folds=("folds", "min"), folds_max=("folds", "max")).reset_index()
    # the columns of old tables first (method, class, ...): readers of table2.csv keep their columns;
    # folds < folds_max: some replicate lacks a fold the others have (its mean is over other test images)
    return _ordered(out)[["method", "class", "mean", "std", "n", "folds", "folds_max", "variant"]]


def per_fold(records: Iterable[Mapping]) -> pd.DataFrame:
    """(variant, method, fold, class, mean, n): each fold's global test DSC in %, averaged over the
    replicates (seeds, draws) that ran on it; empty when the records carry no fold."""
    df = _long(records)
    df = df[df["fold"] >= 0]
    if df.empty:
        return pd.DataFrame(columns=["variant", "method", "fold", "class", "mean", "n"])
    out = df.groupby(["variant", "method", "fold", "class"], sort=False)["dsc"].agg(
        mean="mean", n="count").reset_index()
    return _ordered(out).sort_values(["variant", "method", "fold"], kind="stable").reset_index(drop=True)


def load_reference(path: Path = REFERENCE_CSV) -> pd.DataFrame:
    """The paper's Table 2 (method.md section 8): columns method, label, class, mean, std (%)."""
    return pd.read_csv(path)


def compare(summary: pd.DataFrame, reference: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Ours beside the paper: method, label, class, mean, std, n, paper_mean, paper_std, diff (ours - paper)."""
    ref = load_reference() if reference is None else reference
    ref = ref.rename(columns={"mean": "paper_mean", "std": "paper_std"})[["method", "class", "paper_mean", "paper_std"]]
    if "variant" not in summary:
        summary = summary.assign(variant="")
    out = summary.merge(ref, on=["method", "class"], how="left")
    out.insert(1, "label", out["method"].map(lambda m: METHODS[m].label if m in METHODS else m))
    out["diff"] = out["mean"] - out["paper_mean"]
    return out


def with_flags(table: pd.DataFrame, records: Iterable[Mapping]) -> pd.DataFrame:
    """Add a ``flag`` column: ``"no learning k/n"`` for a method whose k of n seeds have
    ``no_learning`` true in their record (orchestrator.curves.no_learning), else ``""``. With folds a
    record is one fold's retrain, not a replicate (the table's n): the flag counts "fold runs"."""
    flags: dict[tuple[str, str], list[bool]] = {}
    folded: set[tuple[str, str]] = set()
    for r in records:
        key = (r.get("variant") or "", r["method"])
        flags.setdefault(key, []).append(bool(r.get("no_learning", False)))
        if r.get("fold") is not None:
            folded.add(key)
    text = {k: f"no learning {sum(f)}/{len(f)}" + (" fold runs" if k in folded else "") if any(f) else ""
            for k, f in flags.items()}
    variants = table["variant"] if "variant" in table else pd.Series([""] * len(table), index=table.index)
    return table.assign(flag=[text.get((v, m), "") for v, m in zip(variants, table["method"])])


def with_missing(table: pd.DataFrame, expected: Mapping[tuple[str, str], int]) -> pd.DataFrame:
    """Mark the cells the spec asked for that have no result (their trial failed, or has not run yet).

    ``expected``: (variant, method) -> the retrains asked for (the plan's seeds x draws); ``table``:
    ``with_flags``'s frame. A (variant, method) without any result gets rows of its own: no numbers,
    n 0, the paper's beside them. Every (variant, method) short of results says "missing k/n runs" in
    its ``flag``, which the renderings print beside its name."""
    if "variant" not in table:
        table = table.assign(variant="")
    have = table.groupby(["variant", "method"], sort=False)["n"].max().to_dict() if len(table) else {}
    absent = [key for key in expected if key not in have]
    if absent:
        nan = float("nan")
        rows = pd.DataFrame([{"variant": v, "method": m, "class": c, "mean": nan, "std": nan, "n": 0, "folds": 0}
                             for v, m in absent for c in CLASSES])
        extra = compare(rows).assign(flag="")
        table = _ordered(pd.concat([table, extra], ignore_index=True) if len(table) else extra)

    def flag(variant: str, method: str, n: int, old: str) -> str:
        want = expected.get((variant, method))
        if want is None or n >= want:
            return old
        mark = f"missing {want - int(n)}/{want} runs"
        return f"{old}; {mark}" if old else mark

    return table.assign(flag=[flag(v, m, n, f) for v, m, n, f in
                              zip(table["variant"], table["method"], table["n"], table["flag"])])


def mean_pm(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f} ± n/a"


def _grid(table: pd.DataFrame) -> list[list[str]]:
    """Rows of cells: per method three rows (ours, paper, diff) x classes."""
    rows = []
    if "variant" not in table:
        table = table.assign(variant="")
    for (variant, method), g in table.groupby(["variant", "method"], sort=False):
        g = g.set_index("class")
        label, n = g["label"].iloc[0], int(g["n"].iloc[0])
        if variant:
            label = f"[{variant}] {label}"
        if "folds_max" in g and g["folds_max"].iloc[0] > g["folds"].iloc[0]:
            label = f"{label} ({int(g['folds'].iloc[0])}-{int(g['folds_max'].iloc[0])} folds: incomplete)"
        elif "folds" in g and g["folds"].iloc[0] > 1:
            label = f"{label} ({int(g['folds'].iloc[0])} folds)"
        if "flag" in g and g["flag"].iloc[0]:  # a method that did not learn says so beside its name
            label = f"{label} [{g['flag'].iloc[0]}]"
        ours = [mean_pm(g.at[c, "mean"], g.at[c, "std"]) if c in g.index else "-" for c in CLASSES]
        paper = [mean_pm(g.at[c, "paper_mean"], g.at[c, "paper_std"]) if c in g.index else "-" for c in CLASSES]
        diff = [f"{g.at[c, 'diff']:+.2f}" if c in g.index and not math.isnan(g.at[c, "diff"]) else "-" for c in CLASSES]
        rows += [[label, str(n), "ours", *ours], ["", "", "paper", *paper], ["", "", "diff", *diff]]
    return rows


HEADER = ["Method", "n", "", *CLASSES]


def to_text(table: pd.DataFrame, title: str = "Table 2", std: str = "population",
            repeat: Optional[str] = None) -> str:
    """A fixed-width console table."""
    rows = [HEADER, *_grid(table)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = [f"{title} ({note(std, repeat)})"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 3 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def to_markdown(table: pd.DataFrame, title: str = "Table 2", std: str = "population",
                repeat: Optional[str] = None) -> str:
    lines = [f"**{title}** ({note(std, repeat)}; paper: 3 runs, authors' split)", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _grid(table)]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, caption: str = "Table 2", std: str = "population",
             repeat: Optional[str] = None) -> str:
    def esc(s: str) -> str:
        return s.replace("±", r"$\pm$").replace("_", r"\_").replace("%", r"\%")

    lines = [r"\begin{table}", r"\centering", r"\begin{tabular}{lrl" + "r" * len(CLASSES) + "}", r"\hline",
             " & ".join(HEADER) + r" \\", r"\hline"]
    for r in _grid(table):
        lines.append(" & ".join(esc(c) for c in r) + r" \\")
    lines += [r"\hline", r"\end{tabular}", rf"\caption{{{esc(caption)}: {esc(note(std, repeat))}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def describe(spec) -> str:
    """The figure's subtitle from an ablation spec: data, protocol, seeds and repeat scope."""
    data = Path(spec.data.source).name if spec.data.source else "synthetic data"
    if spec.preset:
        data += f", {spec.preset} preset"
    seeds = spec.seed_list
    scope = ("search + retrain per seed" if spec.repeat == "full"
             else f"one search (seed {seeds[0]}), a retrain per seed")
    return (f"data: {data} | protocol: {spec.protocol} | seeds: {', '.join(map(str, seeds))} (n={len(seeds)}) | "
            f"repeat: {spec.repeat} ({scope})")


def bar_chart(table: pd.DataFrame, path: Path, title: str = "Table 2", std: str = "population",
              repeat: Optional[str] = None, subtitle: str = "") -> Path:
    """The methods side by side per class, slide-ready (16:9, 13.3 x 7.5 in, text >= 11 pt): one group of
    bars per class (Average first), one bar per (variant,) method in the paper's order, the paper's mean
    as a black tick on each bar.

    Error bars are one std either side (the kind ``std`` names, on the y label), drawn whole: a bar whose
    std reaches below 0 is shown so, not clipped (the axis extends past 0). A method with a single seed
    has no error bar; a random-architecture control is hatched. Title: ``title``, then ``subtitle`` (data,
    protocol, seeds, repeat) or, without one, what the numbers are.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    # one bar per (variant, method) row; a random control's bars are hatched apart from the searched ones
    variants = table["variant"] if "variant" in table else pd.Series([""] * len(table), index=table.index)
    table = table.assign(row=[f"{v} | {m}" if v else m for v, m in zip(variants, table["method"])])
    rows = list(dict.fromkeys(table["row"]))
    first = table.drop_duplicates("row").set_index("row")
    n = table.groupby("row", sort=False)["n"].max()

    def label(r: str) -> str:
        m, v = first.at[r, "method"], first.at[r, "variant"] if "variant" in first else ""
        text = METHODS[m].label if m in METHODS else m
        return f"{v}: {text} (n={int(n[r])})" if v else f"{text} (n={int(n[r])})"

    control = [bool(METHODS[first.at[r, "method"]].control_of) if first.at[r, "method"] in METHODS else False
               for r in rows]
    lo = min(0.0, float(np.nanmin(table["mean"] - table["std"].fillna(0)))) - 2
    hi = float(np.nanmax(pd.concat([table["mean"] + table["std"].fillna(0), table["paper_mean"]]))) + 5
    fig, ax = plt.subplots(figsize=(13.33, 7.5), layout="constrained")
    colours = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    width = 0.84 / len(rows)
    x = np.arange(len(CLASSES))
    for i, r in enumerate(rows):
        g = table[table["row"] == r].set_index("class").reindex(CLASSES)
        pos = x - 0.42 + width * (i + 0.5)
        colour = colours(i % colours.N)
        bars = ax.bar(pos, g["mean"], width * 0.92, yerr=g["std"], color=colour, edgecolor=colour,
                      error_kw=dict(capsize=3, lw=1.1, ecolor="0.25"))
        if control[i]:
            for bar in bars:
                bar.set(hatch="///", facecolor="white")
        ax.hlines(g["paper_mean"], pos - width * 0.46, pos + width * 0.46, color="black", lw=2.4)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(x, CLASSES, fontsize=14)
    ax.set_ylim(lo, hi)
    ax.set_ylabel(f"test DSC (%), mean ± {std} std over seeds", fontsize=13)
    ax.tick_params(axis="y", labelsize=12)
    ax.grid(axis="y", color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    handles = [Patch(facecolor="white" if c else colours(i % colours.N), edgecolor=colours(i % colours.N),
                     hatch="///" if c else None, label=label(r)) for i, (r, c) in enumerate(zip(rows, control))]
    handles.append(Line2D([], [], linestyle="none", marker="_", markersize=16, mew=2.4, color="black",
                          label="paper (mean, 3 runs)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=11 if len(rows) <= 12 else 9, frameon=False)
    # over the axes (the legend holds the right margin), the second line wrapped to the axes' width
    ax.set_title("\n".join([title, *textwrap.wrap(subtitle or note(std, repeat), 95)]), fontsize=13)
    return save_figure(fig, path, dpi=144, layout=False)


def write_all(table: pd.DataFrame, out_dir: Path, title: str = "Table 2", std: str = "population",
              repeat: Optional[str] = None, subtitle: str = "",
              records: Optional[Iterable[Mapping]] = None) -> dict[str, Path]:
    """table2.md, table2.csv (long form, with ``std_kind`` and ``repeat`` columns), table2.tex,
    table2.png under ``out_dir``; per_fold.csv (:func:`per_fold`) when ``records`` carry folds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "table2.md", "csv": out_dir / "table2.csv", "tex": out_dir / "table2.tex",
             "png": out_dir / "table2.png"}
    paths["md"].write_text(to_markdown(table, title, std, repeat))
    table.assign(std_kind=f"{std} (ddof={DDOF[std]})", repeat=repeat or "").to_csv(
        paths["csv"], index=False, float_format="%.4f")
    paths["tex"].write_text(to_latex(table, title, std, repeat))
    bar_chart(table, paths["png"], title, std, repeat, subtitle)
    folds = per_fold(records or [])
    if not folds.empty:
        paths["per_fold"] = out_dir / "per_fold.csv"
        folds.to_csv(paths["per_fold"], index=False, float_format="%.4f")
    return paths
