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


def summarize(records: Iterable[Mapping], std: str = "population") -> pd.DataFrame:
    """Records ``{"method", "seed", <class>: fraction}`` -> long frame (method, class, mean, std, n) in %.

    ``std``: "population" (ddof=0) or "sample" (ddof=1). NaN when a method has a single seed in both
    cases: one run has no spread to report, and a printed 0 would claim one.
    """
    if std not in DDOF:
        raise ValueError(f"std: {std!r} is not one of {', '.join(DDOF)}")
    ddof = DDOF[std]
    rows = [{"method": r["method"], "seed": int(r["seed"]), "class": c, "dsc": 100.0 * float(r[c])}
            for r in records for c in CLASSES]
    if not rows:
        return pd.DataFrame(columns=["method", "class", "mean", "std", "n"])
    df = pd.DataFrame(rows).drop_duplicates(["method", "seed", "class"], keep="last")
    out = df.groupby(["method", "class"], sort=False)["dsc"].agg(
        mean="mean", std=lambda s: s.std(ddof=ddof) if len(s) > 1 else float("nan"), n="count")
    out = out.reset_index()
    order = {m: i for i, m in enumerate(METHODS)}
    out["_m"] = out["method"].map(lambda m: order.get(m, len(order)))
    out["_c"] = out["class"].map(CLASSES.index)
    return out.sort_values(["_m", "_c"]).drop(columns=["_m", "_c"]).reset_index(drop=True)


def load_reference(path: Path = REFERENCE_CSV) -> pd.DataFrame:
    """The paper's Table 2 (method.md section 8): columns method, label, class, mean, std (%)."""
    return pd.read_csv(path)


def compare(summary: pd.DataFrame, reference: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Ours beside the paper: method, label, class, mean, std, n, paper_mean, paper_std, diff (ours - paper)."""
    ref = load_reference() if reference is None else reference
    ref = ref.rename(columns={"mean": "paper_mean", "std": "paper_std"})[["method", "class", "paper_mean", "paper_std"]]
    out = summary.merge(ref, on=["method", "class"], how="left")
    out.insert(1, "label", out["method"].map(lambda m: METHODS[m].label if m in METHODS else m))
    out["diff"] = out["mean"] - out["paper_mean"]
    return out


def with_flags(table: pd.DataFrame, records: Iterable[Mapping]) -> pd.DataFrame:
    """Add a ``flag`` column: ``"no learning k/n"`` for a method whose k of n seeds have
    ``no_learning`` true in their record (orchestrator.curves.no_learning), else ``""``."""
    flags: dict[str, list[bool]] = {}
    for r in records:
        flags.setdefault(r["method"], []).append(bool(r.get("no_learning", False)))
    text = {m: f"no learning {sum(f)}/{len(f)}" if any(f) else "" for m, f in flags.items()}
    return table.assign(flag=table["method"].map(lambda m: text.get(m, "")))


def mean_pm(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if not math.isnan(std) else f"{mean:.2f} ± n/a"


def _grid(table: pd.DataFrame) -> list[list[str]]:
    """Rows of cells: per method three rows (ours, paper, diff) x classes."""
    rows = []
    for method, g in table.groupby("method", sort=False):
        g = g.set_index("class")
        label, n = g["label"].iloc[0], int(g["n"].iloc[0])
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
    """One panel per class, a row per method (the paper's names): ours and the paper's mean DSC.

    Error bars are one std either side (the kind ``std`` names, stated in the title), drawn whole: a bar
    whose std reaches below 0 is shown so, not clipped (the axis extends past 0). A method with a single
    seed has no error bar.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(dict.fromkeys(table["method"]))
    n = table.groupby("method", sort=False)["n"].max()
    labels = [f"{METHODS[m].label if m in METHODS else m} (n={int(n[m])})" for m in methods]
    lows = [table["mean"] - table["std"].fillna(0), table["paper_mean"] - table["paper_std"].fillna(0)]
    highs = [table["mean"] + table["std"].fillna(0), table["paper_mean"] + table["paper_std"].fillna(0)]
    lo = min(0.0, float(np.nanmin(pd.concat(lows)))) - 2
    hi = max(100.0, float(np.nanmax(pd.concat(highs)))) + 2
    fig, axes = plt.subplots(1, len(CLASSES), sharey=True, layout="constrained",
                             figsize=(2.6 * len(CLASSES) + 2.2, 0.55 * len(methods) + 1.6))
    y = np.arange(len(methods))
    for ax, cls in zip(axes, CLASSES):
        g = table[table["class"] == cls].set_index("method").reindex(methods)
        ax.barh(y - 0.2, g["mean"], 0.4, xerr=g["std"], color="tab:blue",
                label=f"ours (mean ± {std} std over seeds)", error_kw=dict(capsize=2, lw=0.9))
        ax.barh(y + 0.2, g["paper_mean"], 0.4, xerr=g["paper_std"], color="tab:orange", alpha=0.65,
                label="paper (mean ± std, 3 runs)", error_kw=dict(capsize=2, lw=0.9))
        ax.axvline(0, color="0.3", lw=0.8)
        ax.set_title(cls, fontsize=9)
        ax.set_xlim(lo, hi)
        ax.set_xlabel("DSC (%)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", color="0.9", lw=0.6)
        ax.set_axisbelow(True)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()  # the paper's row order, top to bottom
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    lines = [title, subtitle] if subtitle else [title]
    fig.suptitle("\n".join(lines + [note(std, repeat)]), fontsize=9)
    return save_figure(fig, path, dpi=130, layout=False)


def write_all(table: pd.DataFrame, out_dir: Path, title: str = "Table 2", std: str = "population",
              repeat: Optional[str] = None, subtitle: str = "") -> dict[str, Path]:
    """table2.md, table2.csv (long form, with ``std_kind`` and ``repeat`` columns), table2.tex,
    table2.png under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "table2.md", "csv": out_dir / "table2.csv", "tex": out_dir / "table2.tex",
             "png": out_dir / "table2.png"}
    paths["md"].write_text(to_markdown(table, title, std, repeat))
    table.assign(std_kind=f"{std} (ddof={DDOF[std]})", repeat=repeat or "").to_csv(
        paths["csv"], index=False, float_format="%.4f")
    paths["tex"].write_text(to_latex(table, title, std, repeat))
    bar_chart(table, paths["png"], title, std, repeat, subtitle)
    return paths
