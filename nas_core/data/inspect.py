"""``nas-scam data inspect``: what a dataset folder holds, before anything is prepared."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from nas_core.classes import CLASS_NAMES, NUM_CLASSES

from .readers import DataError, list_samples


def inspect_source(path: str | Path, layout: str = "auto", channel_order: str = "auto",
                   skip_bad: bool = True) -> dict:
    """Per image and in total: nuclei and pixels per class, image sizes, microns per pixel, warnings.
    Unreadable files are reported under "errors" (``skip_bad``) or raised."""
    path = Path(path)
    layout, refs = list_samples(path, layout=layout, channel_order=channel_order)
    images, errors, notes = [], [], []
    for ref in refs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = ref.load()
        except DataError as exc:
            if not skip_bad:
                raise
            errors.append(str(exc))
            continue
        pix = np.bincount(s.label.ravel(), minlength=NUM_CLASSES + 1)
        images.append({"id": s.id, "patient": s.patient, "height": int(s.label.shape[0]),
                       "width": int(s.label.shape[1]), "mpp": s.mpp,
                       "nuclei": {CLASS_NAMES[c - 1]: int(s.nuclei.get(c, 0)) for c in range(1, NUM_CLASSES + 1)},
                       "pixels": {CLASS_NAMES[c - 1]: int(pix[c]) for c in range(1, NUM_CLASSES + 1)},
                       "ignored_pixels": int(s.ignore.sum())})
        notes += s.warnings
    total = {k: {n: sum(im[k][n] for im in images) for n in CLASS_NAMES} for k in ("nuclei", "pixels")}
    mpps = sorted({im["mpp"] for im in images if im["mpp"] is not None})
    if layout == "monuseg":
        notes.insert(0, "MoNuSeg annotations are class-less: every nucleus is labelled 1 (Epithelial slot)")
    if not mpps:
        notes.append("no microns-per-pixel information in this layout")
    return {"path": str(path), "layout": layout, "images": images, "patients": len({i["patient"] for i in images}),
            "total": total, "mpp": mpps, "sizes": sorted({(i["height"], i["width"]) for i in images}),
            "warnings": notes, "errors": errors}


def format_report(rep: dict) -> str:
    lines = [f"{rep['path']}: layout {rep['layout']}, {len(rep['images'])} images, {rep['patients']} patients"]
    hs = [i["height"] for i in rep["images"]]
    ws = [i["width"] for i in rep["images"]]
    if hs:
        lines.append(f"image sizes (HxW): min {min(hs)}x{min(ws)}, max {max(hs)}x{max(ws)}")
    lines.append("microns per pixel: " + (", ".join(f"{m:g}" for m in rep["mpp"]) or "unknown"))
    lines.append(f"{'class':<12}{'nuclei':>10}{'pixels':>14}")
    for n in CLASS_NAMES:
        lines.append(f"{n:<12}{rep['total']['nuclei'][n]:>10}{rep['total']['pixels'][n]:>14}")
    for w in rep["warnings"][:20]:
        lines.append(f"warning: {w}")
    if len(rep["warnings"]) > 20:
        lines.append(f"... {len(rep['warnings']) - 20} more warnings (use --json)")
    for e in rep["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)
