"""Full-image tiled inference and evaluation (method.md section 7).

Each image is cut into ``tile`` windows at ``stride`` on the crop grid (``release`` by default: the
authors' windows from 0, zero-padded on the far side; see nas_core/data/tiling.py), every channel
thresholded at 0.5, and the windows stitched keeping each tile's centre (border tiles reach the image
edge), cropped to the image: predictions on the padding never reach a metric. Windows that own no
image pixel are not run (their output would be cropped away). Only one batch of tiles and the
(4, H, W) boolean output are in memory at a time, so large images and SVS regions fit.

A progress bar (``bar``: a tqdm bar whose total the caller sets, ``window_count``) advances per batch
of windows; the commands show it on a terminal, the training loop's validations pass none.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from nas_core.engine.device import autocast

THRESHOLD = 0.5


def window_count(h: int, w: int, *, tile: int, stride: int, grid: str = "release") -> int:
    """How many windows ``predict_probs`` runs on an (h, w) image: those that own an image pixel."""
    from nas_core.data.tiling import Stitcher

    return len(Stitcher(h, w, tile=tile, stride=stride, grid=grid).positions())


@torch.no_grad()
def predict_probs(model: nn.Module, image: np.ndarray, *, tile: int = 256, stride: int = 128,
                  device: torch.device | str = "cpu", amp: bool = False, batch: int = 8,
                  binary: bool = True, grid: str = "release", bar=None) -> np.ndarray:
    """Tiled prediction of one RGB image; ``bar`` (tqdm-like) advances by the windows of each batch.

    image: uint8 (H, W, 3). Returns (4, H, W): bool masks (``binary``) or float32 probabilities.
    """
    from nas_core.data.tiling import Stitcher, pad_window

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {tuple(image.shape)}")
    if tile % 16:
        raise ValueError(f"tile size {tile} must be a multiple of 16 (the U-Net downsamples 4 times)")
    device = torch.device(device)
    model.eval()
    h, w = image.shape[:2]
    stitcher = Stitcher(h, w, tile=tile, stride=stride, grid=grid)
    positions = [tuple(p) for p in stitcher.positions().tolist()]
    for start in range(0, len(positions), batch):
        chunk = positions[start:start + batch]
        tiles = np.stack([pad_window(image, y, x, tile) for y, x in chunk])  # (b, tile, tile, 3)
        x_t = torch.from_numpy(tiles).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        with autocast(device, amp):
            probs = model(x_t).float()  # (b, 4, tile, tile)
        out = (probs > THRESHOLD) if binary else probs
        out = out.cpu().numpy()
        for (y, x), t in zip(chunk, out):
            stitcher.add(y, x, t)
        if bar is not None:
            bar.update(len(chunk))
    return stitcher.result()


def evaluate_images(model: nn.Module, items: Iterable[tuple], *, tile: int, stride: int,
                    device: torch.device | str = "cpu", amp: bool = False, grid: str = "release",
                    ids: Optional[Sequence[str]] = None, patients: Optional[Sequence[Optional[str]]] = None,
                    bar=None) -> dict:
    """items: (image uint8 (H,W,3), label uint8 (H,W), ignore bool (H,W) or None, instances or None).
    With ``ids`` (one per item; ``patients`` likewise, optional) the result has per-image ``"images"`` rows.
    ``bar``: advanced per batch of windows (``predict_probs``)."""
    from nas_core.metrics import SegmentationMetrics

    acc = SegmentationMetrics()
    for image, label, ignore, instances in items:
        pred = predict_probs(model, image, tile=tile, stride=stride, device=device, amp=amp, grid=grid, bar=bar)
        acc.update(pred, label, ignore=ignore, instances=instances)
    out = acc.compute()
    if ids is not None:
        out["images"] = acc.image_rows(ids, patients)
    return out


def evaluate_split(model: nn.Module, data, split: str, *, tile: int, stride: int,
                   device: torch.device | str = "cpu", amp: bool = False, grid: str | None = None,
                   images: bool = False, progress: bool = False) -> dict:
    """Global per-class DSC (the paper's number), per-image DSC, PQ and pixel accuracy on one split.
    ``grid`` None = the grid the data was prepared with; ``images``: add the per-image rows (the
    manifest's patient of each), off for validations, whose results are flattened into scalars;
    ``progress``: a bar over the split's windows on a terminal (the ``evaluate`` command)."""
    from nas_core.data.prepare import progress_bar

    ids = data.image_ids(split)
    if not ids:
        raise ValueError(f"the {split!r} split holds no images")
    items = ((data.load_image(i), data.load_label(i), data.load_ignore(i), data.load_instances(i)) for i in ids)
    patients = None
    if images:
        patient_of = {m["id"]: m.get("patient") for m in getattr(data, "manifest", {}).get("images", [])}
        patients = [patient_of.get(i) for i in ids]
    grid = grid or getattr(data, "grid", "release")
    total = None
    if progress:
        shapes = {m["id"]: (m["height"], m["width"]) for m in getattr(data, "manifest", {}).get("images", [])}
        if all(i in shapes for i in ids):
            total = sum(window_count(*shapes[i], tile=tile, stride=stride, grid=grid) for i in ids)
    bar = progress_bar(total=total, desc=f"evaluate {split} ({len(ids)} images)", unit="window", enabled=progress)
    was_training = model.training
    try:
        return evaluate_images(model, items, tile=tile, stride=stride, device=device, amp=amp, grid=grid,
                               ids=ids if images else None, patients=patients, bar=bar)
    finally:
        bar.close()
        model.train(was_training)
