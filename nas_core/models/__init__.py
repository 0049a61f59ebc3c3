"""Segmentation models: one U-Net skeleton with 8 attention slots, DeepLabV3+, and the registry."""

from nas_core.models.attention import CBAM, NASCAM, NASSAM, NASSCAM, SCSE
from nas_core.models.deeplab import DeepLabV3Plus
from nas_core.models.registry import (BUILDERS, MODEL_ALIASES, NAS_MODELS, ModelError, as_genotype, canonical_name, create_model,
                                      model_names)
from nas_core.models.unet import NASSCAMSupernet, SegmentationModel, UNet

__all__ = [
    "BUILDERS", "CBAM", "NAS_MODELS", "DeepLabV3Plus", "ModelError", "NASCAM", "NASSAM", "NASSCAM", "NASSCAMSupernet", "SCSE",
    "SegmentationModel", "UNet", "as_genotype", "create_model", "model_names", "MODEL_ALIASES", "canonical_name",
]
