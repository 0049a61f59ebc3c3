"""Self-describing checkpoints: model spec + config + genotype + weights (+ optimiser/RNG state to resume).

Loading needs no flags: ``load_checkpoint(path)`` rebuilds the model from the stored spec. Files are
loaded with ``weights_only=True`` (no pickled code), so RNG states are stored as tensors and lists.
Writes are atomic (temp file + rename): a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = 1
KIND = "nas-scam-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model asked for."""


def _encode_rng(state: dict) -> dict:
    py = state["python"]
    np_state = state["numpy"]
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _decode_rng(enc: dict) -> dict:
    py = enc["python"]
    npd = enc["numpy"]
    state = {
        "python": (py[0], tuple(py[1]), py[2]),
        "numpy": ("MT19937", npd["keys"].numpy().astype(np.uint32), npd["pos"], npd["has_gauss"], npd["gauss"]),
        "torch": enc["torch"],
    }
    if "cuda" in enc:
        state["cuda"] = enc["cuda"]
    return state


def save_checkpoint(path: Path, *, model: nn.Module, config: dict, phase: str, epoch: int,
                    metrics: dict | None = None, genotype: dict | None = None,
                    optimizers: dict[str, Any] | None = None, rng: dict | None = None,
                    state: dict | None = None) -> Path:
    """Atomically write a checkpoint. ``state`` holds loop bookkeeping (best score, history...)."""
    payload = {
        "format": FORMAT,
        "kind": KIND,
        "phase": phase,
        "epoch": epoch,
        "model_spec": getattr(model, "model_spec", None),
        "config": config,
        "genotype": genotype,
        "metrics": metrics or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "rng": _encode_rng(rng) if rng is not None else None,
        "state": state or {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{random.getrandbits(32):08x}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate the raw payload; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})"[:500]) from None
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a nas-scam checkpoint")
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {payload.get('format')!r}; this version reads {FORMAT}")
    if payload.get("rng") is not None:
        payload["rng"] = _decode_rng(payload["rng"])
    return payload


def _architecture(spec: dict | None) -> dict | None:
    """A model spec without ``impl``: the cell implementations share one function and one state_dict
    (nas_core/search_space/stacked.py), so weights saved by one load into the other."""
    if not spec or "impl" not in spec.get("options", {}):
        return spec
    return {**spec, "options": {k: v for k, v in spec["options"].items() if k != "impl"}}


def load_weights(model: nn.Module, payload: dict, path: str | Path = "checkpoint") -> None:
    """Load weights into ``model`` after checking the checkpoint was saved for the same architecture."""
    from nas_core.models.registry import canonical_name

    want = _architecture(getattr(model, "model_spec", None))
    have = _architecture(payload.get("model_spec"))
    if have is not None and have.get("name"):  # a checkpoint from before a model's rename
        have = {**have, "name": canonical_name(have["name"])}
    if want is not None and have is not None and want != have:
        raise CheckpointError(
            f"checkpoint {path} was saved for model {have.get('name')!r} with options {have.get('options')}, "
            f"not for {want.get('name')!r} with options {want.get('options')}")
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from the checkpoint's own spec and load its weights. Returns (model, meta)."""
    from nas_core.models import create_model

    payload = read_checkpoint(path, map_location)
    spec = payload.get("model_spec")
    if not spec:
        raise CheckpointError(f"checkpoint {path} holds no model spec")
    model = create_model(spec["name"], **spec.get("options", {}))
    load_weights(model, payload, path)
    model.eval()
    meta = {k: payload[k] for k in ("phase", "epoch", "config", "genotype", "metrics", "model_spec")}
    return model, meta
