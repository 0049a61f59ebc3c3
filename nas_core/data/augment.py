"""Augmentation pipelines of the two protocols (method.md sections 5 and 6), albumentations 2.x.

``paper``: random rotation, horizontal and vertical flips, Gaussian blur, median blur and an elastic
warp. ``code``: Gaussian blur only, p = 0.2 (the release). Masks are always warped with nearest
interpolation, so an augmented mask only holds labels of the original (the release interpolated
labels linearly in its elastic warp). Compose(strict=True) makes albumentations raise on any argument
it would otherwise ignore with a warning (2.x renamed several), so every argument here applies.
Call the result as ``t(image=(H, W, 3) uint8, masks=[label (H, W) uint8, ignore (H, W) uint8])``.
"""

from __future__ import annotations

import os
from typing import Optional

import cv2

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PIPELINES = ("paper", "code", "none")


def build_augmentation(pipeline: str = "paper", strength: float = 1.0, seed: Optional[int] = None):
    """albumentations Compose for ``pipeline`` (paper | code | none -> None). ``strength`` in [0, 1+]
    scales every probability (capped at 1) and the rotation/elastic magnitudes; 1.0 = as specified."""
    import albumentations as A

    if pipeline not in PIPELINES:
        raise ValueError(f"augmentation pipeline {pipeline!r}: expected one of {', '.join(PIPELINES)}")
    if strength < 0:
        raise ValueError(f"augmentation strength must be >= 0, got {strength}")
    if pipeline == "none" or strength == 0:
        return None

    def p(x: float) -> float:
        return min(1.0, x * strength)

    nearest = cv2.INTER_NEAREST
    if pipeline == "code":
        ops = [A.GaussianBlur(blur_limit=(3, 7), p=p(0.2))]
    else:
        ops = [
            # reflection keeps tissue in the corners (and valid labels there: reflected ones)
            A.Rotate(limit=(-180 * min(strength, 1.0), 180 * min(strength, 1.0)), interpolation=cv2.INTER_LINEAR,
                     mask_interpolation=nearest, border_mode=cv2.BORDER_REFLECT_101, p=p(0.5)),
            A.HorizontalFlip(p=p(0.5)),
            A.VerticalFlip(p=p(0.5)),
            A.GaussianBlur(blur_limit=(3, 5), p=p(0.2)),
            A.MedianBlur(blur_limit=(3, 5), p=p(0.2)),
            A.ElasticTransform(alpha=30.0 * strength, sigma=6.0, approximate=True, interpolation=cv2.INTER_LINEAR,
                               mask_interpolation=nearest, border_mode=cv2.BORDER_REFLECT_101, p=p(0.3)),
        ]
    return A.Compose(ops, strict=True, mask_interpolation=nearest, seed=seed)
