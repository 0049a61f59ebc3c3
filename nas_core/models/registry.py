"""Model registry: a plain dict of builders behind ``create_model(name, **options)``.

Every model returned carries ``model_spec = {"name": ..., "options": {...}}`` (JSON-serialisable,
defaults filled in) so that ``create_model(spec["name"], **spec["options"])`` rebuilds the same
architecture; checkpoints store it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from nas_core.models.attention import CBAM, NASSCAM, SCSE
from nas_core.models.deeplab import DeepLabV3Plus
from nas_core.models.unet import NASSCAMSupernet, SegmentationModel, UNet
from nas_core.search_space import IMPLS, ZERO_OPS
from nas_core.search_space.genotype import SEARCHES, Genotype


class ModelError(ValueError):
    """Unknown model name or option, or an inconsistent option value; the message names it."""


def _unet() -> SegmentationModel:
    return UNet()


def _deeplab() -> SegmentationModel:
    return DeepLabV3Plus()


def _cbam() -> SegmentationModel:
    return UNet(lambda index, channels: CBAM(channels))


def _scse() -> SegmentationModel:
    return UNet(lambda index, channels: SCSE(channels))


def as_genotype(genotype: Genotype | dict | str | Path) -> Genotype:
    """A Genotype, its JSON dict, or the path of its JSON file -> Genotype."""
    if isinstance(genotype, Genotype):
        return genotype
    if isinstance(genotype, dict):
        return Genotype.from_json(genotype)
    if isinstance(genotype, (str, Path)):
        return Genotype.load(genotype)
    raise ModelError(f"genotype: expected a Genotype, its JSON dict or a file path, got {type(genotype).__name__}")


def _nas_scam(combine: str) -> Callable[..., SegmentationModel]:
    def build(supernet: str | None = None, genotype: Genotype | dict | str | Path | None = None,
              zero_op: str = "paper", impl: str = "stacked") -> SegmentationModel:
        name = f"nas-scam-{combine[0]}"
        if (supernet is None) == (genotype is None):
            raise ModelError(f"{name}: give exactly one of supernet= ({' or '.join(SEARCHES)}, search form) "
                             f"or genotype= (fixed form)")
        if zero_op not in ZERO_OPS:
            raise ModelError(f"{name}: zero_op {zero_op!r} is not one of {', '.join(ZERO_OPS)}")
        if impl not in IMPLS:
            raise ModelError(f"{name}: impl {impl!r} is not one of {', '.join(IMPLS)}")
        if supernet is not None:
            if supernet not in SEARCHES:
                raise ModelError(f"{name}: supernet {supernet!r} is not one of {', '.join(SEARCHES)}")
            return NASSCAMSupernet(combine, supernet, zero_op, impl)
        geno = as_genotype(genotype)
        if geno.combine != combine:
            raise ModelError(f"{name} needs a {combine} genotype, got combine={geno.combine!r}")

        def factory(index: int, channels: int) -> NASSCAM:
            return NASSCAM(channels, combine, geno.sam[index], geno.cam[index], zero_op, impl)

        return UNet(factory)

    return build


BUILDERS: dict[str, Callable[..., SegmentationModel]] = {
    "unet": _unet,
    "deeplabv3plus": _deeplab,
    "cbam": _cbam,
    "scse": _scse,
    "nas-scam-s": _nas_scam("serial"),
    "nas-scam-p": _nas_scam("parallel"),
}

# the searchable models: a supernet form (search) and a genotype form (retrain)
NAS_MODELS: tuple[str, ...] = tuple(n for n, b in BUILDERS.items() if "supernet" in inspect.signature(b).parameters)

# Former names, still accepted (configs and checkpoints written before the rename). One name per model
# everywhere: the registry, `nas-scam model info`, ablation method ids, the API and MLflow tags.
MODEL_ALIASES: dict[str, str] = {"unet-cbam": "cbam", "unet-scse": "scse"}


def model_names() -> list[str]:
    return list(BUILDERS)


def canonical_name(name: str) -> str:
    """The registry name of ``name`` (itself, or what an alias stands for)."""
    return MODEL_ALIASES.get(name, name)


def create_model(name: str, **options: Any) -> SegmentationModel:
    """Build a registry model by name. Output: (B, 3, H, W) -> (B, 4, H, W) probabilities."""
    name = canonical_name(name)
    if name not in BUILDERS:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(BUILDERS)}")
    builder = BUILDERS[name]
    params = inspect.signature(builder).parameters
    for key in options:
        if key not in params:
            valid = ", ".join(params) or "none"
            raise ModelError(f"unknown option {key!r} for model {name!r}; valid options: {valid}")
    if options.get("genotype") is not None:
        options["genotype"] = as_genotype(options["genotype"])  # a file is read once
    model = builder(**options)
    bound = inspect.signature(builder).bind(**options)
    bound.apply_defaults()
    spec_options = dict(bound.arguments)
    if spec_options.get("genotype") is not None:
        spec_options["genotype"] = spec_options["genotype"].to_dict()
    model.model_spec = {"name": name, "options": spec_options}
    return model
