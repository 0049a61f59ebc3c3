"""Paired statistics between two methods of an ablation, and DSC broken down by fold, patient and organ.

Both read the per-image rows a retrain keeps in ``result.json`` (``test["images"]``: id, patient,
per-class DSC with null where undefined, per-class pixel sums; ``SegmentationMetrics.image_rows``). Pure
numpy/pandas: no Ray, no MLflow, no torch; a copied run folder gives the same numbers.

**Paired comparison** (``compare``, ``nas-scam compare NAME A B``). Images are paired by (fold, image id).
For each test image, a method's per-image DSC is its mean over its runs of the chosen variant (seeds and
random draws; over the runs where the value is defined), and the difference is A's minus B's, in DSC
points (%). Per class: a class absent from both prediction and truth of an image is undefined there (the
engine's per-image rule), and an image where the class is undefined for A or for B is left out of that
class's difference; ``n`` counts the images kept. Average: per run, the image's mean over its defined
classes, then as a class. The figure is the mean difference over images with a percentile bootstrap
interval: ``resamples`` (default 10,000) resamples of the images with replacement, seeded (the same
seed for every row, so a row does not depend on which others are computed). An interval needs at least
2 images; on few images the percentile bootstrap is narrower than the truth, so read it as a guide.

These are per-image DSC figures, a different number from the global DSC of Table 2 (the paper's metric,
pooled pixel counts over the test set): a method can win on global DSC and lose on the mean per-image
DSC when it does well on the large images only.

**Breakdown** (``breakdown``): the global DSC (pixel sums, as Table 2) over the images of each fold,
patient or organ. Per repeat (one seed and draw, its folds pooled) the group's global DSC, then the mean
over repeats. The organ comes from the TCGA tissue-source-site code of the patient id (``ORGAN_BY_TSS``:
the codes of the MoNuSAC and MoNuSeg files we hold); other ids are "unknown".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from nas_core.classes import CLASS_NAMES, TABLE_ORDER

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
LEVEL = 0.95
NO_FOLD = -1  # the fold of a run in a grid without folds
NO_DRAW = -1
NOTE = ("paired differences come from per-image DSC (each image's own DSC, a method's mean over its runs), not "
        "from the global DSC of Table 2")
CLASS_RULE = ("a class absent from both prediction and truth of an image is undefined there; an image where a "
              "class is undefined for A or for B is left out of that class's difference (n = images kept)")

# TCGA tissue-source-site code (the barcode's second field, TCGA-XX-...) -> organ, for the codes of the
# MoNuSAC 2020 files (../shared/data/monusac, monusac_test_masks: lung, kidney, breast, prostate) and
# the MoNuSeg test images (which add colon, bladder, brain); the TCGA project in the comment.
ORGAN_BY_TSS: dict[str, str] = {
    **dict.fromkeys(("2Z", "5P", "DW", "F9", "IZ"), "kidney"),  # KIRP
    **dict.fromkeys(("50", "55", "69", "73", "78", "MP"), "lung"),  # LUAD
    **dict.fromkeys(("A2", "AC"), "breast"),  # BRCA
    **dict.fromkeys(("G9", "EJ"), "prostate"),  # PRAD
    "A6": "colon",  # COAD
    "CU": "bladder",  # BLCA
    "HT": "brain",  # LGG
}
_TCGA = re.compile(r"TCGA-([A-Z0-9]{2})-", re.IGNORECASE)
UNKNOWN = "unknown"


class StatsError(ValueError):
    """The runs cannot answer the question asked (a method, variant or per-image row is missing)."""


def organ_of(name: Optional[str]) -> str:
    """The organ of a TCGA patient or image id (``TCGA-2Z-A9JG-01Z-00-DX1_1`` -> kidney), else "unknown"."""
    m = _TCGA.search(name or "")
    return ORGAN_BY_TSS.get(m.group(1).upper(), UNKNOWN) if m else UNKNOWN


# ---------------------------------------------------------------- per-image rows ----

def image_frame(runs: Iterable[Any]) -> tuple[pd.DataFrame, list[str]]:
    """One row per (run, test image) from retrains (``rescore.Retrain``: ``.run`` a ``specs.RunId``,
    ``.result`` its result.json, ``.folder``), and the run folders whose result has no per-image rows.

    Columns: method, variant, seed, draw, fold (``NO_DRAW`` / ``NO_FOLD`` where the grid has none), run
    (folder name), id, patient, organ, ``dsc_<class>`` (NaN = undefined), ``inter_`` / ``pred_`` /
    ``gt_<class>`` pixel sums."""
    rows, missing = [], []
    for r in runs:
        images = (r.result.get("test") or {}).get("images")
        if not images:
            missing.append(r.folder.name)
            continue
        ident = {"method": r.run.method, "variant": r.run.variant, "seed": r.run.seed,
                 "draw": NO_DRAW if r.run.draw is None else r.run.draw,
                 "fold": NO_FOLD if r.run.fold is None else r.run.fold, "run": r.folder.name}
        for img in images:
            row = {**ident, "id": str(img["id"]), "patient": img.get("patient")}
            row["organ"] = organ_of(row["patient"] or row["id"])
            for c in CLASS_NAMES:
                v = img.get(f"dsc_{c}")
                row[f"dsc_{c}"] = math.nan if v is None else float(v)
                for kind in ("inter", "pred", "gt"):
                    row[f"{kind}_{c}"] = int(img.get(f"{kind}_{c}", 0))
            rows.append(row)
    columns = ["method", "variant", "seed", "draw", "fold", "run", "id", "patient", "organ",
               *(f"{k}_{c}" for k in ("dsc", "inter", "pred", "gt") for c in CLASS_NAMES)]
    return pd.DataFrame(rows, columns=columns), missing


def method_images(frame: pd.DataFrame, method: str, variant: str) -> pd.DataFrame:
    """A method's per-image DSC (fractions), indexed by (fold, id): columns Average and the classes, each
    the mean over the method's runs of ``variant`` where defined (NaN where no run defines it)."""
    sub = frame[(frame["method"] == method) & (frame["variant"] == variant)]
    dsc = sub[[f"dsc_{c}" for c in CLASS_NAMES]].to_numpy(float)
    average = _row_nanmean(dsc)  # the image's mean over its defined classes, per run
    per_run = pd.DataFrame(dsc, columns=list(CLASS_NAMES), index=pd.MultiIndex.from_frame(sub[["fold", "id"]]))
    per_run.insert(0, "Average", average)
    return per_run.groupby(level=["fold", "id"]).mean()  # pandas' mean skips NaN: over the defining runs


def _row_nanmean(x: np.ndarray) -> np.ndarray:
    """(n, k) -> (n,) mean over each row's non-NaN values; NaN for a row without one (no warning)."""
    defined = ~np.isnan(x)
    count = defined.sum(axis=1)
    return np.where(count > 0, np.where(defined, x, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


# ---------------------------------------------------------------- bootstrap ----

def bootstrap_interval(x: Sequence[float], resamples: int = DEFAULT_RESAMPLES, level: float = LEVEL,
                       seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (n,): ``resamples`` means of n draws with
    replacement. (NaN, NaN) for fewer than 2 values. Vectorised in chunks of about 4M draws."""
    x = np.asarray(x, dtype=float)
    n = x.size
    if n < 2:
        return math.nan, math.nan
    if resamples < 1:
        raise StatsError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, (1 << 22) // n)
    for start in range(0, resamples, step):
        k = min(step, resamples - start)
        means[start:start + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# ---------------------------------------------------------------- paired comparison ----

@dataclass
class Comparison:
    """A minus B over paired test images. ``table``: one row per TABLE_ORDER class with ``diff`` (mean
    difference, DSC points %), ``lo`` / ``hi`` (bootstrap interval), ``n`` (images kept) and
    ``excludes_zero``."""

    a: str
    b: str
    variant: str
    table: pd.DataFrame
    runs: dict[str, list[str]]
    n_paired: int
    unpaired: dict[str, int]
    resamples: int
    seed: int
    level: float = LEVEL
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def plain(v):
            if isinstance(v, (bool, np.bool_)):
                return bool(v)
            if isinstance(v, (int, np.integer)):
                return int(v)
            return None if isinstance(v, float) and math.isnan(v) else float(v)

        rows = [{"class": r["class"], **{k: plain(r[k]) for k in ("diff", "lo", "hi", "n", "excludes_zero")}}
                for _, r in self.table.iterrows()]
        return {"a": self.a, "b": self.b, "variant": self.variant, "metric": "per-image DSC, A - B, DSC points (%)",
                "interval": f"percentile bootstrap {int(self.level * 100)}% over images, {self.resamples} "
                            f"resamples, seed {self.seed}",
                "level": self.level, "resamples": self.resamples, "seed": self.seed, "n_paired": self.n_paired,
                "unpaired": self.unpaired, "runs": self.runs, "rows": rows, "note": NOTE, "class_rule": CLASS_RULE,
                "notes": self.notes}

    def to_text(self) -> str:
        variant = f", variant {self.variant}" if self.variant else ""
        lines = [f"{self.a} - {self.b}{variant}: mean difference in per-image DSC (points, %) over "
                 f"{self.n_paired} paired test images, {int(self.level * 100)}% percentile bootstrap "
                 f"({self.resamples} resamples, seed {self.seed})",
                 f"runs: {self.a} {len(self.runs[self.a])}, {self.b} {len(self.runs[self.b])}"]
        header = ["Class", "mean diff", f"{int(self.level * 100)}% CI", "n", "excludes 0"]
        body = [[r["class"], fmt_diff(r["diff"]), fmt_interval(r["lo"], r["hi"]), str(int(r["n"])),
                 "yes *" if r["excludes_zero"] else "no"] for _, r in self.table.iterrows()]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        for i, row in enumerate([header, *body]):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
            if i == 0:
                lines.append("-" * len(lines[-1]))
        lines += [f"note: {NOTE}.", f"absent classes: {CLASS_RULE}.", *self.notes]
        return "\n".join(lines)


def fmt_diff(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:+.2f}"


def fmt_interval(lo: float, hi: float) -> str:
    return "-" if math.isnan(lo) else f"[{lo:+.2f}, {hi:+.2f}]"


def variants_of(frame: pd.DataFrame, method: str) -> list[str]:
    return sorted(frame.loc[frame["method"] == method, "variant"].unique())


def resolve_variant(frame: pd.DataFrame, a: str, b: str, variant: Optional[str]) -> str:
    """The one variant both methods have: ``variant`` when given, else their only common one."""
    both = sorted(set(variants_of(frame, a)) & set(variants_of(frame, b)))
    if variant is not None:
        for m in (a, b):
            if variant not in variants_of(frame, m):
                found = ", ".join(repr(v) for v in variants_of(frame, m))
                raise StatsError(f"method {m!r} has no run of variant {variant!r}; its variants: {found}")
        return variant
    if len(both) == 1:
        return both[0]
    if not both:
        raise StatsError(f"methods {a!r} and {b!r} share no variant ({a}: {variants_of(frame, a)}, "
                         f"{b}: {variants_of(frame, b)}); they cannot be paired")
    raise StatsError(f"methods {a!r} and {b!r} have several variants; choose one with --variant: "
                     f"{', '.join(repr(v) for v in both)}")


def compare(frame: pd.DataFrame, a: str, b: str, variant: Optional[str] = None,
            resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = LEVEL) -> Comparison:
    """A minus B in per-image DSC over the test images both were scored on (see the module docstring)."""
    if resamples < 1:
        raise StatsError(f"resamples must be >= 1, got {resamples}")
    methods = sorted(frame["method"].unique())
    for m in (a, b):
        if m not in methods:
            raise StatsError(f"method {m!r} has no finished retrain with per-image test rows; methods found: "
                             f"{', '.join(methods) or 'none'}")
    variant = resolve_variant(frame, a, b, variant)
    mine, theirs = method_images(frame, a, variant), method_images(frame, b, variant)
    paired = mine.index.intersection(theirs.index)
    if not len(paired):
        raise StatsError(f"{a!r} and {b!r} share no test image (paired by fold and image id): were they "
                         "scored on the same split?")
    rows = []
    for cls in TABLE_ORDER:
        d = 100.0 * (mine.loc[paired, cls].to_numpy() - theirs.loc[paired, cls].to_numpy())
        d = d[~np.isnan(d)]
        lo, hi = bootstrap_interval(d, resamples, level, seed)
        rows.append({"class": cls, "diff": float(d.mean()) if d.size else math.nan, "lo": lo, "hi": hi,
                     "n": int(d.size), "excludes_zero": bool(lo > 0 or hi < 0)})
    sub = frame[frame["variant"] == variant]
    runs = {m: sorted(sub.loc[sub["method"] == m, "run"].unique()) for m in (a, b)}
    unpaired = {a: int(len(mine.index.difference(paired))), b: int(len(theirs.index.difference(paired)))}
    notes = []
    if any(unpaired.values()):
        notes.append(f"images scored by one method only (left out): {a} {unpaired[a]}, {b} {unpaired[b]}")
    return Comparison(a, b, variant, pd.DataFrame(rows), runs, int(len(paired)), unpaired, resamples, seed, level,
                      notes)


def compare_runs(run_root: str | Path, a: str, b: str, variant: Optional[str] = None,
                 resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Comparison:
    """``compare`` on an ablation's run folder; errors name the folder, the missing method (listing the
    methods found) or the retrains without per-image rows."""
    from orchestrator.rescore import finished_retrains

    run_root = Path(run_root)
    found, _ = finished_retrains(run_root)
    ids = pd.DataFrame([{"method": r.method, "variant": r.run.variant} for r in found])
    methods = sorted(ids["method"].unique())
    for m in (a, b):
        if m not in methods:
            raise StatsError(f"{run_root}: no finished retrain of method {m!r} (train__{m}__seedN.../ with best.pt "
                             f"and result.json); methods found: {', '.join(methods)}")
    variant = resolve_variant(ids, a, b, variant)
    runs = [r for r in found if r.method in (a, b) and r.run.variant == variant]
    frame, missing = image_frame(runs)
    if missing:
        raise StatsError(f"{run_root}: no per-image test rows (result.json test.images) in {', '.join(missing)}; "
                         "retrains made before the engine kept them cannot be paired: retrain them")
    return compare(frame, a, b, variant, resamples, seed)


def report_pairs(methods: Iterable[str]) -> list[tuple[str, str]]:
    """The comparisons the report makes: each NAS variant against its random control
    (``nas-scam-p-sync`` vs ``random-p-sync``) and against U-Net, where both are present; a random
    control without its searched variant against U-Net."""
    present = set(methods)
    pairs = []
    for m in sorted(present):
        if m.startswith("nas-scam-"):
            control = "random-" + m.removeprefix("nas-scam-")
            pairs += [(m, b) for b in (control, "unet") if b in present]
        elif m.startswith("random-") and "nas-scam-" + m.removeprefix("random-") not in present and "unet" in present:
            pairs.append((m, "unet"))  # a control whose searched variant is absent: against U-Net
    return pairs


def comparisons_markdown(comparisons: Sequence[Comparison]) -> str:
    """One row per comparison: the mean difference [interval] and n per class; * marks an interval
    that excludes 0."""
    if not comparisons:
        return "No NAS variant has a random control or a U-Net with per-image test rows to compare with.\n"
    c0 = comparisons[0]
    header = ["A - B", "variant", *TABLE_ORDER]
    lines = [f"Mean difference in per-image DSC (points, %), A - B, paired by test image (runs pooled over seeds "
             f"and draws), {int(c0.level * 100)}% percentile bootstrap interval ({c0.resamples} resamples), "
             "n images; * = the interval excludes 0.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in comparisons:
        t = c.table.set_index("class")
        cells = [f"{fmt_diff(t.at[k, 'diff'])} {fmt_interval(t.at[k, 'lo'], t.at[k, 'hi'])} n={int(t.at[k, 'n'])}"
                 + (" *" if t.at[k, "excludes_zero"] else "") if t.at[k, "n"] else "- (n=0)" for k in TABLE_ORDER]
        lines.append("| " + " | ".join([f"{c.a} - {c.b}", c.variant or "-", *cells]) + " |")
    lines += ["", f"Note: {NOTE}; {CLASS_RULE}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- breakdown ----

BREAKDOWNS = ("fold", "patient", "organ")


def breakdown(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Global DSC (%) of every method and variant over the images of each ``by`` group (fold, patient,
    organ). Long frame: method, variant, group, class (TABLE_ORDER), mean (over repeats), n_repeats,
    n_images. A repeat is one (seed, draw) with its folds pooled; within it the group's DSC is
    ``2 sum inter / sum (pred + gt)`` (NaN when the class has no pixel in the group), Average the mean of
    the defined classes."""
    if by not in BREAKDOWNS:
        raise StatsError(f"breakdown by {by!r}: expected one of {', '.join(BREAKDOWNS)}")
    columns = ["method", "variant", "group", "class", "mean", "n_repeats", "n_images"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    df = frame.assign(group=frame[by].fillna(UNKNOWN).astype(str))
    keys = ["method", "variant", "seed", "draw", "group"]
    sums = df.groupby(keys, sort=True)[[f"{k}_{c}" for k in ("inter", "pred", "gt") for c in CLASS_NAMES]].sum()
    inter = sums[[f"inter_{c}" for c in CLASS_NAMES]].to_numpy(float)
    denom = sum(sums[[f"{k}_{c}" for c in CLASS_NAMES]].to_numpy(float) for k in ("pred", "gt"))
    with np.errstate(invalid="ignore", divide="ignore"):
        dsc = np.where(denom > 0, 200.0 * inter / denom, np.nan)
    average = _row_nanmean(dsc)
    per_repeat = pd.DataFrame(np.column_stack([average, dsc]), columns=list(("Average", *CLASS_NAMES)),
                              index=sums.index)
    long = per_repeat.reset_index().melt(id_vars=keys, var_name="class", value_name="dsc")
    out = long.groupby(["method", "variant", "group", "class"], sort=False)["dsc"].agg(
        mean="mean", n_repeats="count").reset_index()
    n_images = df.drop_duplicates(["method", "variant", "group", "fold", "id"]).groupby(
        ["method", "variant", "group"]).size().rename("n_images").reset_index()
    out = out.merge(n_images, on=["method", "variant", "group"], how="left")
    out["_c"] = out["class"].map(TABLE_ORDER.index)
    return out.sort_values(["method", "variant", "group", "_c"]).drop(columns="_c").reset_index(drop=True)[columns]


def breakdown_markdown(frame: pd.DataFrame, by: str) -> str:
    """Average global DSC (%) per ``by`` group (rows) and method (columns, with the variant where there
    are several), mean over repeats."""
    table = breakdown(frame, by)
    avg = table[table["class"] == "Average"].copy()
    several = avg["variant"].nunique() > 1
    avg["column"] = avg["method"] + (" [" + avg["variant"] + "]" if several else "")
    wide = avg.pivot_table(index="group", columns="column", values="mean", aggfunc="first", sort=False)
    images = avg.groupby("group", sort=False)["n_images"].max()
    if by == "fold":
        wide = wide.sort_index(key=lambda s: s.astype(int))
    columns = list(dict.fromkeys(avg["column"]))
    header = [by, "images", *columns]
    lines = [f"Average DSC (%) per {by}: global over the {by}'s test images (pixel sums, as Table 2), per repeat "
             "(seed, draw; folds pooled), mean over repeats.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, row in wide.iterrows():
        label = f"fold {group}" if by == "fold" else str(group)
        cells = ["-" if c not in row or math.isnan(row[c]) else f"{row[c]:.2f}" for c in columns]
        lines.append("| " + " | ".join([label, str(int(images.get(group, 0))), *cells]) + " |")
    return "\n".join(lines) + "\n"


def breakdowns_available(frame: pd.DataFrame) -> list[str]:
    """The breakdowns the rows support: folds when the runs carry them, patients when the rows name
    them, organs when at least one patient's organ is known."""
    out = []
    if (frame["fold"] != NO_FOLD).any():
        out.append("fold")
    if frame["patient"].notna().any():
        out.append("patient")
        if (frame["organ"] != UNKNOWN).any():
            out.append("organ")
    return out


def paired_summary(run_root: str | Path, methods: Iterable[str], resamples: int = DEFAULT_RESAMPLES) -> str:
    """The lines an ablation prints under Table 2: each NAS variant against its random control and against
    U-Net (``report_pairs``), per variant, Average only: mean difference [95% interval] over n images and
    a * where it excludes 0. Empty when no pair is present; a pair that cannot be made says why."""
    from orchestrator.rescore import RescoreError, finished_retrains

    pairs = report_pairs(methods)
    if not pairs:
        return ""
    try:
        found, _ = finished_retrains(Path(run_root))
    except RescoreError as exc:
        return f"paired comparisons: none ({exc})"
    variants = sorted({r.run.variant for r in found})
    # every result.json read once for all pairs and variants (compare_runs would read them per pair)
    frame, missing = image_frame(found)
    lines = [f"Paired comparisons (per-image DSC, Average, A - B in points, {int(LEVEL * 100)}% bootstrap "
             f"interval over test images; `nas-scam compare {Path(run_root).name} A B` for every class):"]
    if missing:
        lines.append(f"  left out (no per-image test rows): {', '.join(missing)}")
    for a, b in pairs:
        for v in variants:
            try:
                c = compare(frame, a, b, variant=v, resamples=resamples)
            except StatsError as exc:
                lines.append(f"  {a} - {b}{f' [{v}]' if v else ''}: not compared ({str(exc)[:200]})")
                continue
            row = c.table.set_index("class").loc["Average"]
            mark = " *" if row["excludes_zero"] else ""
            lines.append(f"  {a} - {b}{f' [{v}]' if v else ''}: {fmt_diff(row['diff'])} "
                         f"{fmt_interval(row['lo'], row['hi'])} over {int(row['n'])} images{mark}")
    return "\n".join(lines)


# ---------------------------------------------------------------- one axis' effect ----

def variant_values(label: str) -> dict[str, str]:
    """``data.stain=none+train.lr=0.001`` -> ``{"data.stain": "none", "train.lr": "0.001"}``."""
    return dict(part.split("=", 1) for part in label.split("+") if "=" in part) if label else {}


def axis_effect(frame: pd.DataFrame, method: str, key: str, a: str, b: str,
                resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = LEVEL) -> Comparison:
    """What moving axis ``key`` from value ``b`` to ``a`` is worth for ``method``: the per-image DSC of each
    variant with ``key=a`` minus that of the variant equal to it but for ``key=b``, averaged per test
    image over those variant pairs (the other axes' levels), then the mean over images with a percentile
    bootstrap interval over images (an image is resampled with all its pairs). Values as in the run names
    (``axis_label``: ``1e-3`` reads ``0.001``)."""
    variants = sorted(frame.loc[frame["method"] == method, "variant"].unique())
    pairs = []
    for v in variants:
        values = variant_values(v)
        if values.get(key) != a:
            continue
        twin = {**values, key: b}
        match = [w for w in variants if variant_values(w) == twin]
        if match:
            pairs.append((v, match[0]))
    if not pairs:
        found = sorted({variant_values(v).get(key, "?") for v in variants})
        raise StatsError(f"{method!r}: no pair of variants differing only in {key} ({a} vs {b}); values of {key} "
                         f"found: {', '.join(found) or 'none'}")
    diffs = []
    for va, vb in pairs:
        mine, theirs = method_images(frame, method, va), method_images(frame, method, vb)
        both = mine.index.intersection(theirs.index)
        diffs.append(100.0 * (mine.loc[both] - theirs.loc[both]))
    per_image = pd.concat(diffs).groupby(level=["fold", "id"]).mean()  # NaN-skipping: defined pairs only
    rows = []
    for cls in TABLE_ORDER:
        d = per_image[cls].to_numpy()
        d = d[~np.isnan(d)]
        lo, hi = bootstrap_interval(d, resamples, level, seed)
        rows.append({"class": cls, "diff": float(d.mean()) if d.size else math.nan, "lo": lo, "hi": hi,
                     "n": int(d.size), "excludes_zero": bool(lo > 0 or hi < 0)})
    runs = {f"{key}={a}": [va for va, _ in pairs], f"{key}={b}": [vb for _, vb in pairs]}
    notes = [f"{len(pairs)} variant pair(s) of {method}, differing only in {key}; per image the mean over pairs"]
    return Comparison(f"{key}={a}", f"{key}={b}", f"{method}, pooled over the other axes", pd.DataFrame(rows), runs,
                      int(len(per_image)), {f"{key}={a}": 0, f"{key}={b}": 0}, resamples, seed, level, notes)


def axis_effect_runs(run_root: str | Path, method: str, key: str, a: str, b: str,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Comparison:
    """``axis_effect`` on an ablation's run folder (retrains without per-image rows are named)."""
    from orchestrator.rescore import finished_retrains

    found, _ = finished_retrains(Path(run_root))
    runs = [r for r in found if r.method == method]
    if not runs:
        raise StatsError(f"{run_root}: no finished retrain of method {method!r}")
    frame, missing = image_frame(runs)
    if missing:
        raise StatsError(f"{run_root}: no per-image test rows in {', '.join(missing)}")
    return axis_effect(frame, method, key, a, b, resamples, seed)


# ---------------------------------------------------------------- predicted vs true area ----

def area_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Predicted / true pixel area per class, summed over the test images (all folds), per method and
    variant, mean over repeats (seed, draw): > 1 over-predicts the class, 2 is the issue-26 bar. Long
    frame: method, variant, class, ratio, predicted, true (pixels per repeat, mean)."""
    columns = ["method", "variant", "class", "ratio", "predicted", "true"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    keys = ["method", "variant", "seed", "draw"]
    sums = frame.groupby(keys, sort=False)[[f"{k}_{c}" for k in ("pred", "gt") for c in CLASS_NAMES]].sum()
    rows = []
    for (method, variant), g in sums.groupby(level=["method", "variant"], sort=False):
        for c in CLASS_NAMES:
            pred, true = float(g[f"pred_{c}"].mean()), float(g[f"gt_{c}"].mean())
            rows.append({"method": method, "variant": variant, "class": c, "ratio": pred / true if true else math.nan,
                         "predicted": pred, "true": true})
    return pd.DataFrame(rows, columns=columns)


def area_markdown(frame: pd.DataFrame) -> str:
    """Predicted / true area per class (rows: method and variant), the largest marked when above 2."""
    table = area_ratios(frame)
    classes = [c for c in TABLE_ORDER if c in CLASS_NAMES]
    header = ["method", "variant", *classes]
    lines = ["Predicted / true area per class, summed over all test images (mean over repeats); > 2 marked *: "
             "the class is over-predicted more than twice.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, variant), g in table.groupby(["method", "variant"], sort=False):
        r = g.set_index("class")["ratio"]
        cells = ["-" if math.isnan(r[c]) else f"{r[c]:.2f}" + (" *" if r[c] > 2 else "") for c in classes]
        lines.append("| " + " | ".join([method, variant or "-", *cells]) + " |")
    return "\n".join(lines) + "\n"
