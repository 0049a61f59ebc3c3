"""Data layer: readers, synthetic MoNuSAC data, preparation cache, crops, sampler, augmentation, tiling.

Import the submodules directly (``from nas_core.data.dataset import CropDataset``); the names below
are re-exported lazily so ``import nas_core.data`` stays cheap (no torch/OpenCV import).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "readers", "list_samples": "readers", "detect_layout": "readers",
    "write_synthetic": "synthetic", "prepare": "prepare", "ensure_dataset": "prepare",
    "PreparedData": "dataset", "CropDataset": "dataset", "ClassBalancedBatchSampler": "dataset",
    "UniformBatchSampler": "dataset",    "make_loader": "dataset", "build_augmentation": "augment", "tile_positions": "tiling",
    "Stitcher": "tiling", "StainNormalizer": "stain", "inspect_source": "inspect",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
