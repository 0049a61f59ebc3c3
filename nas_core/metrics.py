"""Evaluation metrics on full, thresholded images (method.md section 7). numpy + scipy only.

Inputs per image: a binary prediction stack ``pred`` (4, H, W) (channel c-1 = class c; multi-label, a
pixel may be in two classes), the ground-truth label map ``gt`` (H, W) with 0 background and the
official ids 1 Epithelial, 2 Lymphocyte, 3 Neutrophil, 4 Macrophage (one label per pixel), an optional
``ignore`` mask (H, W) bool (True = excluded, e.g. MoNuSAC "Ambiguous" regions) and an optional
ground-truth instance map (H, W) int (0 = none).

Definitions (where the paper is silent, the choice is ours and written here):

- **DSC (the paper's number)** is global over the evaluation set:
  ``DSC_c = 2 sum_i |P_c & G_c| / sum_i (|P_c| + |G_c|)``; Average = unweighted mean of the 4 classes.
  A class with no pixel in P or G over the whole set is NaN and the Average skips it.
- **Per-image DSC** (a different number, reported separately): per image and class
  ``2 |P & G| / (|P| + |G|)``; a class absent from both P and G of an image is undefined there and
  excluded (NaN); present in P only (or G only) it is 0. Column c = mean over the images where class
  c is defined; Average = mean over images of each image's mean over its defined classes (images with
  no class defined are skipped), so it is not the mean of the class columns.
- **Pixel accuracy**: a kept pixel is correct when its predicted class set equals its true one (no
  class for background, exactly {c} for class c); a pixel predicted in two classes is wrong.
- **Panoptic quality** per class (MoNuSAC ranks by PQ): predicted instances are the 8-connected
  components of the class's prediction map; true instances come from the instance map restricted to
  pixels of that class, else from 8-connected components of the class's GT map. A pair matches when
  IoU > 0.5 (such matches are necessarily unique). Per class over the whole set (COCO-panoptic style,
  not the challenge's per-image average): ``PQ = sum IoU(matched) / (TP + FP/2 + FN/2)``,
  ``SQ = sum IoU / TP`` (0 when TP = 0), ``RQ = TP / (TP + FP/2 + FN/2)``. A class with no instance in
  P or G over the set is NaN; the Average skips NaN.
- **Ignore regions** in PQ: instances are labelled on the full maps first; an instance (predicted
  *or* true) with more than 50% of its pixels inside the ignore mask is dropped, and the remaining
  instances lose their ignored pixels before matching. Applying the rule to both sides keeps a
  perfect prediction at PQ = 1 when a nucleus straddles an ignore boundary. DSC and pixel accuracy
  simply drop ignored pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from scipy import ndimage

from nas_core.classes import CLASS_BY_ID, NUM_CLASSES, TABLE_ORDER

_EIGHT = np.ones((3, 3), dtype=bool)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator; torch itself is not needed
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def labels_to_stack(labels: Any, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Label map (H, W) with 0..num_classes -> one binary channel per class (num_classes, H, W) bool."""
    lab = _numpy(labels)
    return np.stack([lab == c for c in range(1, num_classes + 1)])


def _check(pred: Any, gt: Any, ignore: Any, instances: Any, num_classes: int):
    pred, gt = _numpy(pred), _numpy(gt)
    if gt.ndim != 2:
        raise ValueError(f"metrics: ground truth must be an (H, W) label map, got shape {gt.shape}")
    if pred.shape != (num_classes, *gt.shape):
        raise ValueError(f"metrics: prediction must be a ({num_classes}, H, W) binary stack matching the "
                         f"ground truth {gt.shape}, got shape {pred.shape}")
    if pred.dtype != bool:
        if not np.issubdtype(pred.dtype, np.integer) or pred.size and (pred.min() < 0 or pred.max() > 1):
            raise ValueError(f"metrics: prediction must be binary (bool or 0/1 integers; threshold the "
                             f"probabilities at 0.5 first), got dtype {pred.dtype}")
        pred = pred.astype(bool)
    if not np.issubdtype(gt.dtype, np.integer) or gt.size and (gt.min() < 0 or gt.max() > num_classes):
        raise ValueError(f"metrics: ground truth must hold integer labels 0..{num_classes}, got dtype "
                         f"{gt.dtype} with values {np.unique(gt)[:8].tolist()}")
    if ignore is None:
        ignore = np.zeros(gt.shape, dtype=bool)
    else:
        ignore = _numpy(ignore).astype(bool)
        if ignore.shape != gt.shape:
            raise ValueError(f"metrics: ignore mask shape {ignore.shape} != ground truth shape {gt.shape}")
    if instances is not None:
        instances = _numpy(instances)
        if (instances.shape != gt.shape or not np.issubdtype(instances.dtype, np.integer)
                or instances.size and instances.min() < 0):
            raise ValueError(f"metrics: instance map must be a non-negative integer (H, W) array shaped like "
                             f"the ground truth {gt.shape}, got {instances.dtype} {instances.shape}")
    return pred, gt, ignore, instances


# ---------------------------------------------------------------- panoptic quality ----

@dataclass
class PQCounts:
    """Matching counts for one class, summed over images."""
    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __iadd__(self, other: "PQCounts") -> "PQCounts":
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        return self

    def quality(self) -> tuple[float, float, float]:
        """(PQ, SQ, RQ); all NaN when there was no instance on either side."""
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        if denom == 0:
            return float("nan"), float("nan"), float("nan")
        sq = self.iou_sum / self.tp if self.tp else 0.0
        return self.iou_sum / denom, sq, self.tp / denom


def _drop_ignored(lab: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """Instances (H, W) int with the >50%-ignored ones removed and ignored pixels zeroed."""
    if not ignore.any():
        return lab
    ids, inverse = np.unique(lab, return_inverse=True)
    inverse = inverse.reshape(lab.shape)
    area = np.bincount(inverse.ravel(), minlength=len(ids))
    inside = np.bincount(inverse[ignore], minlength=len(ids))
    dropped = (inside * 2 > area) & (ids != 0)
    out = np.where(dropped[inverse], 0, lab)
    out[ignore] = 0
    return out


def match_instances(pred_inst: np.ndarray, gt_inst: np.ndarray) -> PQCounts:
    """Match two instance maps (H, W) int (0 = none, any other id = one instance) at IoU > 0.5."""
    pred_ids, pred_area = np.unique(pred_inst[pred_inst > 0], return_counts=True)
    gt_ids, gt_area = np.unique(gt_inst[gt_inst > 0], return_counts=True)
    both = (pred_inst > 0) & (gt_inst > 0)
    tp, iou_sum = 0, 0.0
    if both.any():
        # one int64 key per (pred id, gt id) pair: unique() then counts the overlap of every pair
        base = np.int64(gt_ids[-1]) + 1
        keys, inter = np.unique(pred_inst[both].astype(np.int64) * base + gt_inst[both], return_counts=True)
        ap = pred_area[np.searchsorted(pred_ids, keys // base)]
        ag = gt_area[np.searchsorted(gt_ids, keys % base)]
        iou = inter / (ap + ag - inter)
        # IoU > 0.5 leaves no pixels for a second partner on either side: matches are one-to-one
        matched = iou > 0.5
        tp, iou_sum = int(matched.sum()), float(iou[matched].sum())
    return PQCounts(tp=tp, fp=len(pred_ids) - tp, fn=len(gt_ids) - tp, iou_sum=iou_sum)


def panoptic_counts(pred_mask: Any, gt_instances: Any, ignore: Any = None) -> PQCounts:
    """PQ counts for one class of one image.

    ``pred_mask`` (H, W) bool is split into 8-connected components; ``gt_instances`` (H, W) int is the
    class's true instance map (0 = none); ``ignore`` (H, W) bool as in the module docstring.
    """
    pred_lab, _ = ndimage.label(_numpy(pred_mask).astype(bool), structure=_EIGHT)
    gt_lab = _numpy(gt_instances)
    if ignore is not None:
        ignore = _numpy(ignore).astype(bool)
        pred_lab, gt_lab = _drop_ignored(pred_lab, ignore), _drop_ignored(gt_lab, ignore)
    return match_instances(pred_lab, gt_lab)


# ---------------------------------------------------------------- accumulator ----

class SegmentationMetrics:
    """Accumulates DSC, per-image DSC, pixel accuracy and PQ over an evaluation set.

    ``update`` once per full image, ``compute()`` at the end; ``merge`` combines accumulators filled
    on disjoint image sets (same result as one accumulator over all images).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, with_pq: bool = True) -> None:
        self.num_classes = num_classes
        self.with_pq = with_pq
        self.inter = np.zeros(num_classes, dtype=np.int64)
        self.pred_sum = np.zeros(num_classes, dtype=np.int64)
        self.gt_sum = np.zeros(num_classes, dtype=np.int64)
        self.correct = 0
        self.counted = 0
        self.per_image: list[np.ndarray] = []  # one (num_classes,) per image, NaN = undefined
        # one (3, num_classes) per image: intersection, predicted and true pixels (ignored ones dropped)
        self.per_image_counts: list[np.ndarray] = []
        self.pq = [PQCounts() for _ in range(num_classes)]

    @property
    def n_images(self) -> int:
        return len(self.per_image)

    def update(self, pred: Any, gt: Any, ignore: Any = None, instances: Any = None) -> np.ndarray:
        """Add one image: ``pred`` (C, H, W) bool, ``gt`` (H, W) int 0..C, ``ignore`` (H, W) bool,
        ``instances`` (H, W) int true instance ids (0 = none; None -> connected components of ``gt``).
        Returns this image's per-class DSC (C,) (NaN = undefined)."""
        pred, gt, ignore, instances = _check(pred, gt, ignore, instances, self.num_classes)
        keep = ~ignore
        truth = labels_to_stack(gt, self.num_classes)  # (C, H, W)
        p, t = pred & keep, truth & keep
        inter = (p & t).sum((1, 2))
        ps, ts = p.sum((1, 2)), t.sum((1, 2))
        self.inter += inter
        self.pred_sum += ps
        self.gt_sum += ts
        with np.errstate(invalid="ignore", divide="ignore"):
            image_dsc = np.where(ps + ts > 0, 2.0 * inter / (ps + ts), np.nan)
        self.per_image.append(image_dsc)
        self.per_image_counts.append(np.stack([inter, ps, ts]).astype(np.int64))

        self.correct += int(((pred == truth).all(0) & keep).sum())
        self.counted += int(keep.sum())

        if self.with_pq:
            for c in range(1, self.num_classes + 1):
                if instances is not None:
                    gt_inst = np.where(gt == c, instances, 0)
                else:
                    gt_inst, _ = ndimage.label(gt == c, structure=_EIGHT)
                self.pq[c - 1] += panoptic_counts(pred[c - 1], gt_inst, ignore if ignore.any() else None)
        return image_dsc

    def merge(self, other: "SegmentationMetrics") -> "SegmentationMetrics":
        if other.num_classes != self.num_classes or other.with_pq != self.with_pq:
            raise ValueError("metrics: cannot merge accumulators with different classes or PQ settings")
        self.inter += other.inter
        self.pred_sum += other.pred_sum
        self.gt_sum += other.gt_sum
        self.correct += other.correct
        self.counted += other.counted
        self.per_image.extend(other.per_image)
        self.per_image_counts.extend(other.per_image_counts)
        for mine, theirs in zip(self.pq, other.pq):
            mine += theirs
        return self

    def _table(self, per_class: np.ndarray, average: Optional[float] = None) -> dict[str, float]:
        """Per-class values (C,) in class-id order -> dict in TABLE_ORDER (Average = nanmean)."""
        names = {CLASS_BY_ID.get(c, f"class{c}"): float(per_class[c - 1])
                 for c in range(1, self.num_classes + 1)}
        if average is None:
            average = _nanmean(per_class)
        ordered = {"Average": float(average)}
        ordered.update({n: names[n] for n in TABLE_ORDER[1:] if n in names})
        ordered.update({n: v for n, v in names.items() if n not in ordered})
        return ordered

    def compute(self) -> dict[str, Any]:
        """{"dsc", "dsc_per_image", "pq", "sq", "rq": {name: value} in TABLE_ORDER,
        "pixel_accuracy": float, "n_images": int}. Undefined values are NaN."""
        denom = self.pred_sum + self.gt_sum
        with np.errstate(invalid="ignore", divide="ignore"):
            dsc = np.where(denom > 0, 2.0 * self.inter / denom, np.nan)
        per_image = np.array(self.per_image).reshape(-1, self.num_classes)
        column = np.array([_nanmean(per_image[:, k]) for k in range(self.num_classes)])
        image_means = np.array([_nanmean(row) for row in per_image])
        out: dict[str, Any] = {
            "dsc": self._table(dsc),
            "dsc_per_image": self._table(column, _nanmean(image_means)),
        }
        if self.with_pq:
            q = np.array([counts.quality() for counts in self.pq]).reshape(self.num_classes, 3)
            out.update(pq=self._table(q[:, 0]), sq=self._table(q[:, 1]), rq=self._table(q[:, 2]))
        out["pixel_accuracy"] = self.correct / self.counted if self.counted else float("nan")
        out["n_images"] = self.n_images
        return out

    def image_rows(self, ids: Sequence[str], patients: Optional[Sequence[Optional[str]]] = None) -> list[dict]:
        """One JSON-ready row per image, in ``update`` order: ``{"id", "patient", "dsc_Average",
        "dsc_<class>", "inter_<class>", "pred_<class>", "gt_<class>"}`` (classes in class-id order).

        ``dsc_<class>`` is the image's DSC (None where undefined: the class absent from both prediction
        and truth), ``dsc_Average`` the mean over its defined classes (None when none is); the pixel sums
        let a reader recompute the global DSC of any subset of images (a fold, a patient, an organ)."""
        if len(ids) != self.n_images or (patients is not None and len(patients) != self.n_images):
            raise ValueError(f"metrics: {len(ids)} image ids (and {'no' if patients is None else len(patients)} "
                             f"patients) for {self.n_images} scored images")
        names = [CLASS_BY_ID.get(c, f"class{c}") for c in range(1, self.num_classes + 1)]
        rows = []
        for k, (dsc, counts) in enumerate(zip(self.per_image, self.per_image_counts)):
            row: dict[str, Any] = {"id": str(ids[k]), "patient": None if patients is None else patients[k],
                                   "dsc_Average": _or_none(_nanmean(dsc))}
            row.update({f"dsc_{n}": _or_none(dsc[i]) for i, n in enumerate(names)})
            for j, kind in enumerate(("inter", "pred", "gt")):
                row.update({f"{kind}_{n}": int(counts[j, i]) for i, n in enumerate(names)})
            rows.append(row)
        return rows


def _or_none(x: float) -> Optional[float]:
    # JSON has no NaN: an undefined value is null
    x = float(x)
    return None if np.isnan(x) else x


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def flatten_metrics(result: dict[str, Any], prefix: str = "", skip_nan: bool = False) -> dict[str, float]:
    """Nested result -> flat scalar keys for MLflow: {"dsc/Epithelial": 0.8, "pixel_accuracy": ...}.

    ``prefix`` is prepended as ``prefix/``; ``skip_nan`` leaves out undefined values.
    """
    flat: dict[str, float] = {}
    for key, value in result.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name, skip_nan))
        else:
            value = float(value)
            if not (skip_nan and np.isnan(value)):
                flat[name] = value
    return flat
