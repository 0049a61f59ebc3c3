"""Score a checkpoint on every image of a folder: no split, no cache, per-image rows and global numbers.

A lab tests a trained model on its own annotated slides with this: any layout that
``nas_core.data.readers.list_samples`` reads (MoNuSAC, MoNuSeg, images/ + masks/), every image scored
through the engine's tiled inference (``evaluate.predict_probs``) at the checkpoint's own crop size,
stride and stain normalisation (a checkpoint describes itself). The global numbers are those of
``nas_core.metrics`` (global DSC = the paper's number, PQ over the whole folder); each image's row also
carries its pixel intersections and sums per class, so the global DSC can be recomputed from the CSV.

Outputs of ``write_scores``: ``scores.json`` (folder, checkpoint, global metrics, rows) and
``per_image.csv`` (one row per image).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
from torch import nn

from nas_core.classes import CLASS_BY_ID
from nas_core.metrics import SegmentationMetrics

ROW_METRICS = ("dsc", "pq")


def _image_row(sample, acc: SegmentationMetrics) -> dict[str, Any]:
    res = acc.compute()
    row: dict[str, Any] = {"id": sample.id, "patient": sample.patient, "height": int(sample.label.shape[0]),
                           "width": int(sample.label.shape[1])}
    for key in ROW_METRICS:
        for cls, v in res[key].items():
            row[f"{key}_{cls}"] = v
    for c, name in CLASS_BY_ID.items():
        row[f"inter_{name}"] = int(acc.inter[c - 1])
        row[f"pred_{name}"] = int(acc.pred_sum[c - 1])
        row[f"gt_{name}"] = int(acc.gt_sum[c - 1])
    return row


def score_folder(model: nn.Module, folder: str | Path, *, tile: int, stride: int, stain: str = "none",
                 device="cpu", amp: bool = False, layout: str = "auto", progress: bool = False) -> dict[str, Any]:
    """Every image of ``folder`` through ``model``. Returns {"folder", "layout", "n_images", "global",
    "images"}: ``global`` as ``SegmentationMetrics.compute()``, ``images`` one row per image.

    Raises ``nas_core.data.readers.DataError`` naming the folder (missing, empty, unknown layout) or
    the file (unreadable image or mask)."""
    import warnings

    from nas_core.data.readers import list_samples
    from nas_core.data.stain import StainNormalizer
    from nas_core.engine.evaluate import predict_probs

    folder = Path(folder).expanduser()
    layout, refs = list_samples(folder, layout=layout)
    normalizer = StainNormalizer(stain)
    total = SegmentationMetrics()
    rows, notes = [], []
    was_training = model.training
    it = refs
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(refs, desc=f"score {folder.name}", unit="img")
    try:
        for ref in it:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reader notes are collected below
                sample = ref.load()
            notes += sample.warnings
            image, note = normalizer.apply_or_keep(sample.image, sample.id)  # as in data.prepare
            notes += [note] if note else []
            pred = predict_probs(model, image, tile=tile, stride=stride, device=device, amp=amp)
            acc = SegmentationMetrics()
            acc.update(pred, sample.label, ignore=sample.ignore, instances=sample.instances)
            rows.append(_image_row(sample, acc))
            total.merge(acc)
    finally:
        model.train(was_training)
    return {"folder": str(folder.resolve()), "layout": layout, "n_images": len(rows), "global": total.compute(),
            "images": rows, "warnings": notes}


def score_checkpoint(checkpoint: str | Path, folder: str | Path, *, device: str = "auto",
                     stride: Optional[int] = None, progress: bool = False) -> dict[str, Any]:
    """``score_folder`` with a checkpoint's model at its own crop size, stride and stain method."""
    from nas_core.engine.checkpoint import load_checkpoint
    from nas_core.engine.device import resolve_device

    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, map_location=dev)
    data_cfg = meta["config"]["data"]
    result = score_folder(model.to(dev), folder, tile=int(data_cfg["crop_size"]),
                          stride=int(stride or data_cfg["stride"]), stain=data_cfg.get("stain", "none"),
                          device=dev, amp=bool(meta["config"].get("amp", False)) and dev.type == "cuda",
                          progress=progress)
    spec = meta.get("model_spec") or {}
    result.update(checkpoint=str(Path(checkpoint).resolve()), model=spec.get("name"), epoch=meta.get("epoch"),
                  tile=int(data_cfg["crop_size"]), stride=int(stride or data_cfg["stride"]),
                  stain=data_cfg.get("stain", "none"))
    return result


def json_ready(x: Any) -> Any:
    """``x`` with NaN as None and numpy scalars as Python numbers, for JSON (a class absent from an image
    has an undefined DSC)."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_ready(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_scores(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``scores.json`` (everything) and ``per_image.csv`` (the rows; empty cell = undefined) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "scores.json", "csv": out_dir / "per_image.csv"}
    paths["json"].write_text(json.dumps(json_ready(result), indent=1))
    rows = result["images"]
    with open(paths["csv"], "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return paths
