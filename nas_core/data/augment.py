"""Augmentation of training and alpha-update crops, the release's way (method.md 5a), in numpy/OpenCV.

**Exactly one method per crop**, chosen by cumulative probability from a list of (method, p): a number
u ~ U(0, 1) picks the first method whose interval [p_1 + ... + p_(i-1), p_1 + ... + p_i] holds it; when
u lies past the total, the crop is left unchanged (the release's ``data_aug``). Pipelines, one entry each
in ``PIPELINES`` (each named for the protocol that brought it in; a protocol's record in
nas_core.config.PROTOCOLS may name any of them):

- ``code`` (the release's default): ``gaussian_blur`` with p = 0.2, else nothing.
- ``paper``: the paper's five methods (rotation, flip, Gaussian blur, median blur, elastic) with equal
  shares of 0.2 each, so every crop gets exactly one of them. The paper names the methods but gives no
  probabilities; equal shares are our choice, and 0.2 is the one share the release shows.
- ``none``: no augmentation.

Parameters are the release's (W = crop width):

- ``rotate``: an integer angle in [-179, 179] degrees about the centre; image bilinear with zero fill,
  labels nearest. The zero-filled corners are marked ignore (the same kind of pixel as the zero padding
  of the crop grid, which the loss ignores; the release trained them as background).
- ``flip``: an OpenCV flip code drawn from {-1, 0, 1} (both axes, vertical, horizontal).
- ``gaussian_blur``: 5x5 kernel, sigma ~ U(0, 2); image only.
- ``median_blur``: 3x3; image only.
- ``elastic``: a random affine map that moves three points (the centre +-W/3 square's corners) by
  U(-0.09 W, 0.09 W) each (reflect-101 border), then a displacement field per axis of uniform noise
  U(-1, 1) smoothed by a Gaussian of sigma 0.07 W and scaled by 3 W, sampled with reflection. The
  release smooths noise of shape (H, W, 7) (its image and one-hot label stacked) with a 3-D Gaussian,
  which also averages the field across those 7 planes and divides its strength by about sqrt(7); we
  draw and smooth the same (H, W, 7) noise and use its middle plane for every channel, which keeps the
  release's strength (displacement std about 2.9 px per axis; alpha and sigma both scale with W, so
  about the same at any crop width) with one field for image and labels. Labels and the ignore mask
  are warped with nearest neighbour (the release interpolated labels linearly here: the one release
  bug not copied), so an augmented mask only holds labels of the input.

``strength`` scales every probability (0 = off, 1 = as listed); the shares must still sum to <= 1.
Call the result as ``t(image=(H, W, 3) uint8, masks=[label (H, W) uint8, ignore (H, W) uint8])``; it
returns ``{"image": ..., "masks": [label, ignore]}``. ``set_random_seed`` gives it its own stream.
"""

from __future__ import annotations

from typing import Callable, Optional

import cv2
import numpy as np

# (method, probability) lists, in the order the cumulative draw walks them
PIPELINES: dict[str, tuple[tuple[str, float], ...]] = {
    "paper": (("rotate", 0.2), ("flip", 0.2), ("gaussian_blur", 0.2), ("median_blur", 0.2), ("elastic", 0.2)),
    "code": (("gaussian_blur", 0.2),),
    "none": (),
}
# the release's elastic constants, as fractions of the crop width W
ELASTIC_ALPHA, ELASTIC_SIGMA, ELASTIC_AFFINE = 3.0, 0.07, 0.09
ELASTIC_PLANES = 7  # the release warps 3 image + 4 label channels as one stack

Arrays = tuple[np.ndarray, list[np.ndarray]]


def _rotate(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> Arrays:
    h, w = image.shape[:2]
    angle = int(rng.integers(-179, 180))
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    image = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    label, ignore = masks
    label = cv2.warpAffine(label, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    ignore = cv2.warpAffine(ignore, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=1)
    return image, [label, ignore]


def _flip(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> Arrays:
    code = int(rng.integers(-1, 2))
    return cv2.flip(image, code), [cv2.flip(m, code) for m in masks]


def _gaussian_blur(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> Arrays:
    return cv2.GaussianBlur(image, (5, 5), float(rng.uniform(0, 2))), masks


def _median_blur(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> Arrays:
    return cv2.medianBlur(image, 3), masks


def _plane_weights(sigma: float) -> np.ndarray:
    """(7,) weights of the 7 noise planes in the middle plane of a 1-D Gaussian (reflect) across them."""
    # imported here: scipy.ndimage takes about half a second to import, and every config check reads
    # PIPELINES (nas_core.config._check_registered)
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(np.eye(ELASTIC_PLANES), sigma, axis=0, mode="reflect")[ELASTIC_PLANES // 2]


def smooth_field(noise: np.ndarray, sigma: float) -> np.ndarray:
    """The middle plane of ``scipy.ndimage.gaussian_filter(noise, sigma)`` for noise (h, w, 7), computed
    as a weighted sum of the planes then one 2-D blur (the filter is linear and separable): ~100x
    faster at W = 256. Same kernel as scipy (truncated at 4 sigma), reflect border."""
    plane = (noise @ _plane_weights(sigma)).astype(np.float32)
    k = 2 * int(4.0 * sigma + 0.5) + 1
    return cv2.GaussianBlur(plane, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def elastic_fields(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The elastic step's random parts for an (h, w) crop: the 2x3 affine matrix and the per-pixel
    displacements (dx, dy), float32 (h, w) each (module docstring; W = w)."""
    centre = np.float32((h, w)) // 2
    half = min(h, w) // 3
    # (row, col) points as the release builds them; OpenCV reads them as (x, y), as the release does
    pts1 = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    pts2 = pts1 + rng.uniform(-ELASTIC_AFFINE * w, ELASTIC_AFFINE * w, size=pts1.shape).astype(np.float32)
    affine = cv2.getAffineTransform(pts1, pts2)
    dx, dy = (smooth_field(rng.uniform(-1, 1, (h, w, ELASTIC_PLANES)), ELASTIC_SIGMA * w) * (ELASTIC_ALPHA * w)
              for _ in range(2))
    return affine, dx, dy


def _elastic(image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator) -> Arrays:
    h, w = image.shape[:2]
    affine, dx, dy = elastic_fields(h, w, rng)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x, map_y = xs + dx, ys + dy

    def warp(a: np.ndarray, interp: int) -> np.ndarray:
        a = cv2.warpAffine(a, affine, (w, h), flags=interp, borderMode=cv2.BORDER_REFLECT_101)
        return cv2.remap(a, map_x, map_y, interp, borderMode=cv2.BORDER_REFLECT)

    return warp(image, cv2.INTER_LINEAR), [warp(m, cv2.INTER_NEAREST) for m in masks]


METHODS: dict[str, Callable[[np.ndarray, list[np.ndarray], np.random.Generator], Arrays]] = {
    "rotate": _rotate, "flip": _flip, "gaussian_blur": _gaussian_blur, "median_blur": _median_blur,
    "elastic": _elastic,
}


class OneOf:
    """Apply exactly one method of ``choices`` ((name, p) pairs) per call, by cumulative probability."""

    def __init__(self, choices, seed: Optional[int] = None):
        self.choices = tuple((str(n), float(p)) for n, p in choices)
        for name, p in self.choices:
            if name not in METHODS:
                raise ValueError(f"augmentation method {name!r}: expected one of {', '.join(METHODS)}")
            if p < 0:
                raise ValueError(f"augmentation method {name!r}: probability {p} must be >= 0")
        total = sum(p for _, p in self.choices)
        if total > 1 + 1e-9:
            raise ValueError(f"augmentation probabilities sum to {total:g} > 1: {self.choices}")
        self.rng = np.random.default_rng(seed)

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def pick(self, u: float) -> Optional[str]:
        """The method a draw ``u`` in [0, 1) selects, or None (crop unchanged)."""
        top = 0.0
        for name, p in self.choices:
            top += p
            if u <= top and p > 0:
                return name
        return None

    def __call__(self, image: np.ndarray, masks: list[np.ndarray]) -> dict:
        name = self.pick(float(self.rng.random()))
        if name is not None:
            image, masks = METHODS[name](image, list(masks), self.rng)
        return {"image": np.ascontiguousarray(image), "masks": [np.ascontiguousarray(m) for m in masks]}

    def __repr__(self) -> str:
        return f"OneOf({', '.join(f'{n}:{p:g}' for n, p in self.choices)})"


def build_augmentation(pipeline: str = "paper", strength: float = 1.0, seed: Optional[int] = None) -> Optional[OneOf]:
    """The :class:`OneOf` of ``pipeline`` (paper | code | none -> None), probabilities times ``strength``."""
    if pipeline not in PIPELINES:
        raise ValueError(f"augmentation pipeline {pipeline!r}: expected one of {', '.join(PIPELINES)}")
    if strength < 0:
        raise ValueError(f"augmentation strength must be >= 0, got {strength}")
    choices = [(n, p * strength) for n, p in PIPELINES[pipeline]]
    if not choices or strength == 0:
        return None
    return OneOf(choices, seed=seed)
