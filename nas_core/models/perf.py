"""Opt-in speed switches for a built model, kept out of the models themselves and out of the engine.

The engine decides when to use them (device, config); these helpers only apply them:
- ``maybe_compile``: ``torch.compile`` in place (``nn.Module.compile``), so ``state_dict`` keys, the
  optimisers' parameter lists and ``arch_parameters()`` stay exactly those of the eager model.
  ``mode="reduce-overhead"`` is the CUDA-graphs path on a GPU (small-batch steps are launch-bound).
- ``set_stacked_channels_last``: whether stacked 2-D cells run their convs in channels_last.
- ``step_flops`` and ``measure_conv_rate``: the FLOPs of a step and the machine's rate, for cost plans.
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
    from nas_core.search_space.stacked import StackedCell

    n = 0
    for m in model.modules():
        if isinstance(m, StackedCell) and m.dim == 2:
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


def step_flops(build, size: int, kind: str = "w") -> int:
    """FLOPs of one step on a single ``(1, 3, size, size)`` crop, counted by ``FlopCounterMode`` on the
    meta device (no memory, no arithmetic: shapes only). ``build()`` returns the model.

    ``kind``: ``"forward"`` (inference, no grad), ``"w"`` (forward + backward, gradients for the weights
    only, alpha frozen as in a w step) or ``"alpha"`` (gradients for alpha only). Counts convolutions
    and matrix products (torch's FLOP formulas); element-wise work (norms, activations) is not counted.
    FLOPs scale with the batch: multiply by the batch size.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if kind not in ("forward", "w", "alpha"):
        raise ValueError(f"kind {kind!r} is not one of 'forward', 'w', 'alpha'")
    with torch.device("meta"):
        model = build()
    x = torch.zeros(1, 3, size, size, device="meta")
    counter = FlopCounterMode(display=False)
    if kind == "forward":
        model.eval()
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    arch = {id(p) for p in model.arch_parameters()} if hasattr(model, "arch_parameters") else set()
    for p in model.parameters():
        p.requires_grad_((id(p) in arch) == (kind == "alpha"))
    model.train()
    with counter:
        model(x).sum().backward()
    return int(counter.get_total_flops())


def measure_conv_rate(device: str | torch.device = "cpu", amp: bool = False, seconds: float = 1.0) -> dict:
    """The machine's rate on a conv workload like the models' (3x3, 32 -> 32 channels, forward +
    backward of a (8, 32, 128, 128) batch, float32 or bf16 autocast), measured for about ``seconds``.

    Returns ``{"flops_per_s", "seconds", "steps", "device", "dtype", "workload"}``.
    """
    import time

    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(device)
    conv = nn.Conv2d(32, 32, 3, padding=1).to(device)
    x = torch.randn(8, 32, 128, 128, device=device, requires_grad=True)
    use_amp = amp and device.type == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            y = conv(x)
        y.float().sum().backward()

    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the warm-up (cuDNN algorithm choice, allocations)
    flops = counter.get_total_flops()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    steps, start = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - start < seconds:
        step()
        steps += 1
        sync()
    elapsed = time.perf_counter() - start
    return {"flops_per_s": flops * steps / elapsed, "seconds": round(elapsed, 3), "steps": steps,
            "device": str(device), "dtype": "bfloat16 autocast" if use_amp else "float32",
            "workload": "conv 3x3 32->32, forward + backward of (8, 32, 128, 128)"}
