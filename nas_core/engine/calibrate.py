"""Per-class decision thresholds fitted on the validation split: a post-hoc calibration (issue 26).

The engine cuts every class channel at 0.5 (``evaluate.THRESHOLD``, as the release). On small data a
network's sigmoid outputs can sit on the wrong side of 0.5 for a class: a rare class predicted over
whole images, a common one under-segmented. ``fit_thresholds`` picks, for each class, the threshold of
``GRID`` that maximises that class's global DSC on the ``val`` split (pooled pixel counts, the paper's
metric); ``score_split`` then scores a split at 0.5 and at the fitted thresholds from one forward pass
per image, so the two are paired image by image.

Rules: a class without a true pixel on the validation split keeps 0.5 (its DSC there is 0 for any
prediction: a threshold fitted to an absence would only learn to predict nothing), and so does a class
whose best DSC ties 0.5's; between equal DSCs the threshold nearest 0.5 wins. The split scored never
informs a threshold: fit on ``val``, score ``test``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from torch import nn

from nas_core.classes import CLASS_BY_ID
from nas_core.engine.evaluate import THRESHOLD, predict_probs
from nas_core.metrics import NUM_CLASSES, SegmentationMetrics, labels_to_stack

GRID: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 ... 0.95


@dataclass
class Calibration:
    """Per class (class-id order): the threshold used, whether it was fitted, and the validation DSC
    (fraction; NaN where undefined) at every threshold of ``grid``."""

    thresholds: list[float]
    fitted: list[bool]
    grid: list[float]
    val_dsc: list[list[float]]
    val_images: int
    val_pixels: list[int]  # true pixels per class on the validation split (0: kept at 0.5)

    def val_at(self, threshold: float) -> list[float]:
        k = int(np.argmin(np.abs(np.asarray(self.grid) - threshold)))
        return [row[k] for row in self.val_dsc]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["classes"] = [CLASS_BY_ID[c] for c in range(1, NUM_CLASSES + 1)]
        out["val_dsc"] = [[None if np.isnan(v) else float(v) for v in row] for row in self.val_dsc]
        return out


def _checked_grid(grid: Sequence[float]) -> np.ndarray:
    g = np.asarray(sorted(set(float(t) for t in grid)), dtype=float)
    if g.size == 0 or not np.all((g > 0) & (g < 1)):
        raise ValueError(f"calibration thresholds must lie strictly between 0 and 1, got {list(grid)}")
    if not np.any(np.isclose(g, THRESHOLD)):
        raise ValueError(f"the calibration grid must hold the engine's threshold {THRESHOLD} (the fallback)")
    return g


def split_probabilities(model: nn.Module, data, split: str, *, tile: int, stride: int, device="cpu",
                        amp: bool = False, grid: Optional[str] = None) -> Iterator[tuple]:
    """(image id, probabilities (4, H, W) float32, label, ignore, instances) for each image of ``split``."""
    ids = data.image_ids(split)
    if not ids:
        raise ValueError(f"the {split!r} split holds no images")
    grid = grid or getattr(data, "grid", "release")
    for i in ids:
        probs = predict_probs(model, data.load_image(i), tile=tile, stride=stride, device=device, amp=amp,
                              binary=False, grid=grid)
        yield i, probs, data.load_label(i), data.load_ignore(i), data.load_instances(i)


def count_above(values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``values`` are strictly above each threshold (the engine's ``probs > t``, compared in the
    values' own precision: float32 0.6 is not above the threshold 0.6 in the engine, though above 0.6 in
    float64)."""
    ordered = np.sort(values.ravel())
    cuts = np.asarray(thresholds).astype(ordered.dtype)
    return ordered.size - np.searchsorted(ordered, cuts, side="right")


def fit_thresholds(model: nn.Module, data, *, tile: int, stride: int, device="cpu", amp: bool = False,
                   split: str = "val", grid: Sequence[float] = GRID) -> Calibration:
    """Per-class thresholds maximising the global DSC of ``split`` (see the module docstring)."""
    g = _checked_grid(grid)
    inter = np.zeros((NUM_CLASSES, g.size), dtype=np.int64)
    pred = np.zeros((NUM_CLASSES, g.size), dtype=np.int64)
    truth_sum = np.zeros(NUM_CLASSES, dtype=np.int64)
    n = 0
    was_training = model.training
    try:
        for _, probs, label, ignore, _ in split_probabilities(model, data, split, tile=tile, stride=stride,
                                                               device=device, amp=amp):
            keep = np.ones(label.shape, bool) if ignore is None else ~np.asarray(ignore, bool)
            truth = labels_to_stack(label, NUM_CLASSES)
            for c in range(NUM_CLASSES):
                p, t = probs[c][keep], truth[c][keep]
                pred[c] += count_above(p, g)
                inter[c] += count_above(p[t], g)
                truth_sum[c] += int(t.sum())
            n += 1
    finally:
        model.train(was_training)
    denom = pred + truth_sum[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        dsc = np.where(denom > 0, 2.0 * inter / denom, np.nan)
    half = int(np.argmin(np.abs(g - THRESHOLD)))
    thresholds, fitted = [], []
    for c in range(NUM_CLASSES):
        row = dsc[c]
        if truth_sum[c] == 0 or np.all(np.isnan(row)):
            thresholds.append(THRESHOLD)
            fitted.append(False)
            continue
        best = np.nanmax(row)
        ties = np.flatnonzero(np.isclose(np.nan_to_num(row, nan=-1.0), best, rtol=0, atol=1e-12))
        k = int(ties[np.argmin(np.abs(g[ties] - THRESHOLD))])
        thresholds.append(float(g[k]))
        fitted.append(k != half)
    return Calibration(thresholds=thresholds, fitted=fitted, grid=[float(t) for t in g],
                       val_dsc=dsc.tolist(), val_images=n, val_pixels=[int(v) for v in truth_sum])


def score_split(model: nn.Module, data, split: str, thresholds: Sequence[float], *, tile: int, stride: int,
                device="cpu", amp: bool = False) -> dict[str, dict[str, Any]]:
    """``split`` scored at the engine's 0.5 (``"fixed"``) and at ``thresholds`` (``"calibrated"``), each as
    ``SegmentationMetrics.compute()`` plus its per-image rows (``"images"``), from one forward pass."""
    cut = np.asarray(thresholds, dtype=np.float32).reshape(-1, 1, 1)
    if cut.shape[0] != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} thresholds (one per class), got {len(thresholds)}")
    acc = {"fixed": SegmentationMetrics(), "calibrated": SegmentationMetrics()}
    patient_of = {m["id"]: m.get("patient") for m in getattr(data, "manifest", {}).get("images", [])}
    ids = []
    was_training = model.training
    try:
        for i, probs, label, ignore, instances in split_probabilities(model, data, split, tile=tile, stride=stride,
                                                                      device=device, amp=amp):
            acc["fixed"].update(probs > THRESHOLD, label, ignore=ignore, instances=instances)
            acc["calibrated"].update(probs > cut, label, ignore=ignore, instances=instances)
            ids.append(i)
    finally:
        model.train(was_training)
    patients = [patient_of.get(i) for i in ids]
    out = {}
    for key, a in acc.items():
        out[key] = a.compute()
        out[key]["images"] = a.image_rows(ids, patients)
    return out
