"""Opt-in speed switches for a built model, kept out of the models themselves and out of the engine.

The engine decides when to use them (device, config); these helpers only apply them:
- ``maybe_compile``: ``torch.compile`` in place (``nn.Module.compile``), so ``state_dict`` keys, the
  optimisers' parameter lists and ``arch_parameters()`` stay exactly those of the eager model.
  ``mode="reduce-overhead"`` is the CUDA-graphs path on a GPU (small-batch steps are launch-bound).
- ``set_stacked_channels_last``: whether stacked 2-D cells run their convs in channels_last.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from nas_core.config import CompileMode

# torch.compile modes; the config type (RunConfig.compile) adds "off"
COMPILE_MODES = tuple(m for m in get_args(CompileMode) if m != "off")


def maybe_compile(model: nn.Module, enabled: bool, mode: str = "default", dynamic: bool | None = False) -> nn.Module:
    """Compile ``model``'s forward in place when ``enabled``; returns the same object either way.

    ``dynamic=False``: training crops have one fixed size, so one static graph per step kind (the
    w step and the alpha step differ in which parameters require grad: two graphs, compiled once).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if not enabled:
        return model
    model.compile(mode=mode, dynamic=dynamic)
    return model


def set_stacked_channels_last(model: nn.Module, enabled: bool) -> int:
    """Switch channels_last on or off in every stacked 2-D cell of ``model``; returns how many cells."""
    from nas_core.search_space.cell import Cell

    n = 0
    for m in model.modules():
        if isinstance(m, Cell) and m.dim == 2:
            m.channels_last = enabled
            n += 1
    return n


def compile_works(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether torch.compile can build and run a tiny conv net here: (ok, reason when not)."""
    try:
        net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()).to(device)
        compiled = torch.compile(net)
        compiled(torch.randn(2, 2, 8, 8, device=device)).sum().backward()
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any backend failure means "not here"
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
