"""Prediction outputs: label masks, colour overlays (PNG) and QuPath-compatible GeoJSON nuclei."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage

from nas_core.classes import CLASS_BY_ID, PALETTE


def label_map(pred: np.ndarray) -> np.ndarray:
    """(4, H, W) bool or probabilities -> uint8 (H, W) class ids 0..4.

    Channels are independent sigmoids, so a pixel may pass 0.5 in two channels; it takes the most
    probable of those (with boolean input, the lowest class id).
    """
    if pred.ndim != 3 or pred.shape[0] != 4:
        raise ValueError(f"expected predictions of shape (4, H, W), got {pred.shape}")
    scores = pred.astype(np.float32)
    on = pred > 0.5 if pred.dtype != bool else pred
    best = scores.argmax(axis=0).astype(np.uint8) + 1
    return np.where(on.any(axis=0), best, 0).astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45, legend: bool = True) -> np.ndarray:
    """Blend class colours onto an RGB uint8 image (H, W, 3) where labels > 0; outlines drawn solid.

    ``legend``: each class's colour and name in the bottom-left corner (``draw_legend``); the overlay
    keeps the image's size, so it stays pixel-aligned with the labels PNG."""
    out = image.astype(np.float32).copy()
    for cid, colour in enumerate(PALETTE[1:], start=1):
        mask = labels == cid
        if mask.any():
            out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
            edge = mask & ~ndimage.binary_erosion(mask)
            out[edge] = colour
    out = out.clip(0, 255).astype(np.uint8)
    return draw_legend(out) if legend else out


def draw_legend(image: np.ndarray) -> np.ndarray:
    """The class legend, a swatch of each class's ``PALETTE`` colour beside its name on a darkened box in
    the bottom-left corner, drawn into the RGB uint8 image (H, W, 3) and returned.

    Text grows with the image's shorter side (about 11 px high at 300 px, 44 px from 1200 px); an image
    too small to keep the box under half its width and height gets no legend rather than one that hides it."""
    h, w = image.shape[:2]
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, float(np.clip(min(h, w) / 600, 0.45, 2.0))
    thick = max(1, round(1.5 * scale))
    sizes = [cv2.getTextSize(name, font, scale, thick) for name in CLASS_BY_ID.values()]
    text_w = max(size[0][0] for size in sizes)
    text_h = max(size[0][1] for size in sizes)
    descent = max(base for _, base in sizes)  # "p", "y" reach below the baseline
    pad, row = max(3, text_h // 2), text_h + descent + max(3, text_h // 3)
    box_w, box_h = 3 * pad + text_h + text_w + pad, 2 * pad + row * len(CLASS_BY_ID)
    if box_w > w // 2 or box_h > h // 2:
        return image
    x0, y0 = pad, h - pad - box_h
    box = image[y0:y0 + box_h, x0:x0 + box_w]
    box[:] = (box.astype(np.float32) * 0.25).astype(np.uint8)  # the image stays faintly visible under it
    for i, (cid, name) in enumerate(CLASS_BY_ID.items()):
        top = y0 + pad + i * row
        cv2.rectangle(image, (x0 + pad, top), (x0 + pad + text_h, top + text_h), PALETTE[cid], cv2.FILLED)
        cv2.putText(image, name, (x0 + 3 * pad + text_h, top + text_h), font, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
    return image


def to_geojson(labels: np.ndarray, min_area: int = 4) -> dict:
    """One polygon per nucleus (8-connected component of one class) as a GeoJSON FeatureCollection.

    Coordinates are (x, y) pixel positions, the convention QuPath imports; components smaller than
    ``min_area`` pixels carry no usable polygon and are left out.
    """
    features = []
    for cid, name in CLASS_BY_ID.items():
        comps, n = ndimage.label(labels == cid, structure=np.ones((3, 3), bool))
        if n == 0:
            continue
        for idx, sl in enumerate(ndimage.find_objects(comps), start=1):
            mask = (comps[sl] == idx).astype(np.uint8)
            if mask.sum() < min_area:
                continue
            contours, _ = cv2.findContours(np.pad(mask, 1), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            contour = max(contours, key=cv2.contourArea)[:, 0, :]  # (N, 2) x, y in the padded crop
            if len(contour) < 3:
                continue
            ring = (contour - 1 + np.array([sl[1].start, sl[0].start])).tolist()
            ring.append(ring[0])
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "detection", "classification": {"name": name, "color": list(PALETTE[cid])},
                               "class_id": cid, "area_px": int(mask.sum())},
            })
    return {"type": "FeatureCollection", "features": features}


def predict_files(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, *,
                  device: str = "auto", stride: int | None = None, bgr: bool = False,
                  progress: bool = False) -> list[dict]:
    """Predict every input image with a checkpoint; write NAME_labels.png, NAME_overlay.png, NAME.geojson.

    The model sees what it was trained on: the checkpoint's stain normalisation is applied first (the
    overlay is drawn on the image as given). ``bgr``: the files store R and B swapped (the MoNuSAC test-mask
    images). ``progress``: a bar per image over its windows, on a terminal (the ``predict`` command)."""
    from nas_core.data.prepare import progress_bar
    from nas_core.data.readers import read_image_file
    from nas_core.data.stain import StainNormalizer
    from nas_core.engine.checkpoint import load_checkpoint
    from nas_core.engine.device import resolve_device
    from nas_core.engine.evaluate import predict_probs, window_count

    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, map_location=dev)
    model.to(dev)
    data_cfg = meta["config"]["data"]
    tile = data_cfg["crop_size"]
    stride = stride or data_cfg["stride"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    normalizer = StainNormalizer(data_cfg.get("stain", "none"))
    grid = data_cfg.get("grid", "release")
    for k, path in enumerate(inputs, start=1):
        path = Path(path)
        image = read_image_file(path, bgr=bgr)  # uint8 (H, W, 3) RGB; errors name the file
        h, w = image.shape[:2]
        windows = window_count(h, w, tile=tile, stride=stride, grid=grid)
        with progress_bar(total=windows, unit="window", enabled=progress,
                          desc=f"predict {path.name} ({k}/{len(inputs)}, {w}x{h} px)") as bar:
            if normalizer.method != "none":
                bar.set_postfix_str(f"{normalizer.method} stain normalisation")
            model_input, note = normalizer.apply_or_keep(image, path.name)
            if note:
                warnings.warn(note, stacklevel=2)
            bar.set_postfix_str("")
            probs = predict_probs(model, model_input, tile=tile, stride=stride, device=dev,
                                  amp=meta["config"].get("amp", True) and dev.type == "cuda", binary=False,
                                  grid=grid, bar=bar)
        labels = label_map(probs)
        stem = out_dir / path.stem
        cv2.imwrite(f"{stem}_labels.png", labels)
        cv2.imwrite(f"{stem}_overlay.png", cv2.cvtColor(overlay(image, labels), cv2.COLOR_RGB2BGR))
        geo = to_geojson(labels)
        Path(f"{stem}.geojson").write_text(json.dumps(geo))
        counts = {CLASS_BY_ID[c]: sum(f["properties"]["class_id"] == c for f in geo["features"]) for c in CLASS_BY_ID}
        written.append({"input": str(path), "labels": f"{stem}_labels.png", "overlay": f"{stem}_overlay.png",
                        "geojson": f"{stem}.geojson", "nuclei": counts})
    return written

