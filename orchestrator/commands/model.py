"""`nas-scam model ...`: inspect registry models (parameter counts, alpha shapes, FLOPs)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from orchestrator.cli import example

# Kept in sync with nas_core.models.registry.BUILDERS by tests/orchestrator/test_model_cli.py; listed here so that
# `--help` needs no torch import.
MODEL_NAMES = ["unet", "deeplabv3plus", "cbam", "scse", "nas-scam-s", "nas-scam-p"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("model", help="inspect the registry models",
                                   description="Inspect the registry's models: parameter counts (attention and "
                                               "architecture parameters apart), alpha shapes, FLOPs and output shape.",
                                   epilog=example("nas-scam model info nas-scam-p --supernet synchronous"))
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    sub.required = True
    info = sub.add_parser("info", help="parameters, attention parameters, alpha shapes, FLOPs, output shape",
                          description="Build one registry model (a NAS-SCAM supernet with --supernet, a fixed net "
                                      "with --genotype) and measure it on one input of --size pixels.",
                          epilog=example("nas-scam model info unet --size 128 --json",
                                         "nas-scam model info nas-scam-p --genotype genotype.json"))
    info.add_argument("name", help=f"registry name: {', '.join(MODEL_NAMES)} (the ablation's method ids; "
                                   f"nas-scam-s/-p take --supernet or --genotype)")
    form = info.add_mutually_exclusive_group()
    form.add_argument("--genotype", metavar="FILE", help="genotype JSON: the fixed NAS-SCAM net (nas-scam-* only)")
    form.add_argument("--supernet", choices=["synchronous", "shared"], help="the search form (nas-scam-* only)")
    info.add_argument("--zero-op", choices=["paper", "code"], help="Zero op on sigmoid edges (nas-scam-* only)")
    info.add_argument("--impl", help="supernet implementation (nas-scam-* only): stacked (default) or reference")
    info.add_argument("--size", type=int, default=256, help="input side for FLOPs and the output shape (default 256)")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(func=run_info)


def model_info(name: str, options: dict[str, Any], size: int = 256) -> dict[str, Any]:
    """Build the model and measure it on one (1, 3, size, size) input (eval mode, no grad)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nas_core.models import create_model

    model = create_model(name, **options)
    total = sum(p.numel() for p in model.parameters())
    arch = model.arch_parameters()
    slots = getattr(model, "attention", None)
    attention = sum(p.numel() for p in slots.parameters()) if isinstance(slots, torch.nn.ModuleDict) else None
    model.eval()
    x = torch.zeros(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        y = model(x)
    alphas = {}
    if hasattr(model, "alphas"):
        alphas = {kind: list(t.shape) for kind, t in model.alphas().items()}
    return {
        "name": model.model_spec["name"],  # the registry name, also when asked by a former alias
        "options": model.model_spec["options"],
        "params_total": total,
        "params_attention": attention,
        "params_arch": sum(p.numel() for p in arch),
        "alpha_shapes": alphas,
        "flops": counter.get_total_flops(),
        "input_shape": list(x.shape),
        "output_shape": list(y.shape),
    }


def _format(info: dict[str, Any]) -> str:
    opts = {k: v for k, v in info["options"].items() if v is not None and k != "genotype"}
    if info["options"].get("genotype") is not None:
        g = info["options"]["genotype"]
        opts["genotype"] = f"{g['combine']}/{g['search']}"
    title = info["name"] + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
    attention = "n/a (no attention slots)" if info["params_attention"] is None else f"{info['params_attention']:,}"
    lines = [
        f"model             {title}",
        f"parameters        {info['params_total']:,}",
        f"attention params  {attention}",
    ]
    if info["alpha_shapes"]:
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in info["alpha_shapes"].items())
        lines.append(f"alpha             {shapes} ({info['params_arch']:,} arch params)")
    shape = "x".join(map(str, info["input_shape"]))
    lines += [
        f"FLOPs             {info['flops']:,} ({info['flops'] / 1e9:.2f} GFLOPs at {shape}, FlopCounterMode)",
        f"output shape      {tuple(info['output_shape'])}",
    ]
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    if args.size <= 0 or args.size % 16:
        raise ValueError(f"--size must be a positive multiple of 16, got {args.size}")
    options: dict[str, Any] = {}
    for key in ("genotype", "supernet", "zero_op", "impl"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    info = model_info(args.name, options, args.size)
    print(json.dumps(info) if args.json else _format(info))
    return 0
