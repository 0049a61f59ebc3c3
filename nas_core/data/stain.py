"""Stain normalisation to a fixed target: Reinhard (LAB statistics) and Macenko (stain vectors).

Written here rather than taken from torchstain 1.4.1 (whose numpy backend was checked and agrees, see
tests): torchstain's Macenko fails on images with almost no tissue (empty optical-density set) and its
Reinhard truncates instead of rounding. The default targets are numbers computed once from the
1000x1000 ``target_image.png`` of tiatoolbox 2.1.3 (a common normalisation target; BSD-3), so nothing
has to be read at run time; ``StainNormalizer.fit(image)`` fits to any user image instead.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

# Reinhard: mean and std of L*, a*, b* (CIE LAB, L in [0, 100]) of the target image
REINHARD_TARGET = {"mean": (52.1030, 30.3052, -13.2185), "std": (17.3533, 8.4593, 6.7847)}
# Macenko: haematoxylin and eosin unit OD vectors (RGB rows x stain columns) and 99th-pct concentrations
MACENKO_TARGET = {"stains": ((0.5305, 0.1777), (0.7507, 0.8347), (0.3937, 0.5213)),
                  "max_conc": (2.7187, 1.1740)}
_IO = 240.0  # transmitted light intensity (Macenko et al.)


class StainError(ValueError):
    """An image cannot be stain-normalised (e.g. almost no tissue)."""


def rgb_to_lab(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32 L* in [0, 100], a*, b*."""
    return cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def reinhard_stats(img: np.ndarray) -> dict:
    lab = rgb_to_lab(img).reshape(-1, 3).astype(np.float64)
    return {"mean": tuple(lab.mean(0)), "std": tuple(lab.std(0))}


def reinhard(img: np.ndarray, target: Optional[dict] = None) -> np.ndarray:
    """Match per-channel LAB mean/std to ``target`` (default REINHARD_TARGET). (H, W, 3) uint8."""
    target = target or REINHARD_TARGET
    lab = rgb_to_lab(img)
    flat = lab.reshape(-1, 3).astype(np.float64)
    mu, sd = flat.mean(0), flat.std(0)
    sd = np.where(sd < 1e-6, 1.0, sd)
    out = (lab - mu) / sd * np.asarray(target["std"]) + np.asarray(target["mean"])
    return lab_to_rgb(out)


def _od(img: np.ndarray) -> np.ndarray:
    return -np.log((img.reshape(-1, 3).astype(np.float64) + 1.0) / _IO)


def macenko_stats(img: np.ndarray, alpha: float = 1.0, beta: float = 0.15) -> dict:
    """Stain matrix (3, 2) [H, E] and 99th-percentile concentrations of an image (Macenko 2009)."""
    od = _od(img)
    tissue = od[~np.any(od < beta, axis=1)]
    if tissue.shape[0] < 100:
        raise StainError(f"Macenko: only {tissue.shape[0]} tissue pixels (optical density > {beta}); "
                         "need at least 100")
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin absorbs red more than eosin does: it goes first
    he = np.stack([v1, v2], 1) if v1[0] > v2[0] else np.stack([v2, v1], 1)
    he *= np.sign(he.sum(0, keepdims=True))  # eigenvector signs are arbitrary; ODs are positive
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    return {"stains": he, "max_conc": np.percentile(conc, 99, axis=1), "conc": conc}


def macenko(img: np.ndarray, target: Optional[dict] = None) -> np.ndarray:
    """Re-render ``img`` with the target's stain vectors and concentration range. (H, W, 3) uint8."""
    target = target or MACENKO_TARGET
    st = macenko_stats(img)
    ref = np.asarray(target["stains"], np.float64)
    conc = st["conc"] * (np.asarray(target["max_conc"]) / np.maximum(st["max_conc"], 1e-6))[:, None]
    out = _IO * np.exp(-(ref @ conc))
    return np.clip(np.rint(out.T), 0, 255).astype(np.uint8).reshape(img.shape)


class StainNormalizer:
    """``method`` in none | reinhard | macenko; default targets, or ``fit(target_image)``."""

    METHODS = ("none", "reinhard", "macenko")

    def __init__(self, method: str = "none"):
        if method not in self.METHODS:
            raise ValueError(f"stain method {method!r}: expected one of {', '.join(self.METHODS)}")
        self.method = method
        self.target = None  # None = the built-in target

    def fit(self, target_image: np.ndarray) -> "StainNormalizer":
        if self.method == "reinhard":
            self.target = reinhard_stats(target_image)
        elif self.method == "macenko":
            st = macenko_stats(target_image)
            self.target = {"stains": st["stains"].tolist(), "max_conc": st["max_conc"].tolist()}
        return self

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if self.method == "reinhard":
            return reinhard(img, self.target)
        if self.method == "macenko":
            return macenko(img, self.target)
        return img

    def apply_or_keep(self, img: np.ndarray, name: str = "image") -> tuple[np.ndarray, str | None]:
        """``(normalised image, None)``, or the image as it is and a note naming it when it cannot be
        normalised (too little tissue): what data preparation, scoring and prediction all do."""
        try:
            return self(img), None
        except StainError as exc:
            return img, f"{name}: stain normalisation skipped ({exc})"

    def describe(self) -> dict:
        target = self.target
        if target is not None:
            target = {k: np.asarray(v).round(6).tolist() for k, v in target.items()}
        return {"method": self.method, "target": target or "default"}
