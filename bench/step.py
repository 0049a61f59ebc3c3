"""Training-step and search-loop throughput, peak memory and FLOP/s, measured side by side in one run.

    .venv/bin/python bench/step.py --quick            # 64x64, batches 4 and 8, 3 reps (a few minutes)
    .venv/bin/python bench/step.py                    # 256x256, batches 4 and 8, 3 reps (long on a CPU)
    .venv/bin/python bench/step.py --size 128 --batches 4 --reps 5 --device cuda

Prints numbers and ratios, never passes or fails. Every configuration is built once; repetitions are
interleaved (rep 1 of every config, then rep 2, ...) and the median is reported, so a noisy shared
machine slows all of them alike. Rows:
- train step (one Adam step on all weights; the supernets' w step, alpha frozen as in the engine):
  plain U-Net, fixed NAS-SCAM-P (a uniform genotype), synchronous supernet reference and stacked;
- search iteration of the ``paper`` protocol: a w step then an alpha step, with the engine's own
  ``optimisation_step``. "straightforward" = the per-op reference cell, backward into every
  parameter in both steps, per-tensor Adam (the baseline the performance goal is measured against);
  "reference" / "stacked" = the engine's loop (alpha steps without weight gradients, fused Adam) with
  either cell.
FLOPs come from torch.utils.flop_counter (convs and matmuls; elementwise and norms are not counted),
counted at two small sizes and extrapolated exactly (conv FLOPs are affine in H*W); both supernet
forms are credited with the reference's FLOPs (the useful work of the same function). Peak memory:
CUDA -> torch.cuda.max_memory_allocated; CPU -> the torch profiler's allocation events during one step
(cumulative maximum of allocations minus frees, i.e. the step's own tensors, not the parameters).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# oneDNN keeps 1024 conv primitives by default; the dozen models of one run need more than that, and
# evicting each other's primitives (re-JIT every step) slowed the many-conv reference form by up to
# 1.5x. A large cache makes each model run as it would alone in a training process.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")


def machine(device) -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (f"CPU {cpu} ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}){gpu}; "
            f"torch {torch.__version__}; device {device}")


def build(kind: str, device, channels_last: bool, compile_mode: str = "off"):
    """(model, optimisers) for one row; the supernet's optimisers split weights and alpha like the engine."""
    import torch

    from nas_core.models import create_model
    from nas_core.search_space import Genotype

    if kind == "unet":
        model = create_model("unet")
    elif kind == "nas-scam-p fixed":
        model = create_model("nas-scam-p", genotype=Genotype.uniform("parallel", "synchronous", "conv3", "conv9"))
    else:
        impl = "reference" if kind == "supernet straightforward" else kind.split()[-1]
        model = create_model("nas-scam-p", supernet="synchronous", impl=impl)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_mode != "off":
        from nas_core.models.perf import maybe_compile

        maybe_compile(model, enabled=True, mode=compile_mode)
    if kind == "supernet straightforward":
        # the textbook loop: per-tensor Adam (torch's CPU default)
        make = lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=False)  # noqa: E731
    else:
        from nas_core.engine.loop import adam

        make = lambda params, lr: adam(params, lr, device)  # noqa: E731 - what the engine builds
    opts = {"w": make(model.weight_parameters(), 1e-4)}
    if model.arch_parameters():
        opts["alpha"] = make(model.arch_parameters(), 1e-3)
    return model, opts


def make_batch(b: int, size: int, device, channels_last: bool, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, size, size, generator=g)
    target = (torch.rand(b, 4, size, size, generator=g) > 0.8).float()
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    return {"image": image.to(device), "target": target.to(device)}


class Runner:
    """One timed unit of work: a train step (w step) or a paper search iteration (w + alpha step)."""

    def __init__(self, kind: str, what: str, b: int, size: int, ctx, channels_last: bool, compile_mode: str = "off"):
        self.kind, self.what, self.b, self.size, self.ctx = kind, what, b, size, ctx
        self.model, self.opts = build(kind, ctx.device, channels_last, compile_mode)
        self.model.train()
        self.w_batch = make_batch(b, size, ctx.device, channels_last, seed=1)
        self.a_batch = make_batch(b, size, ctx.device, channels_last, seed=2)
        self.times: list[float] = []
        self.peak_mb = float("nan")
        self.flops = float("nan")

    def __call__(self) -> None:
        from nas_core.engine.loop import optimisation_step
        from nas_core.engine.search import frozen

        m = self.model
        if self.kind == "supernet straightforward":
            # backward fills every gradient; each optimiser steps only its own parameters
            optimisation_step(m, self.w_batch, self.opts["w"], self.ctx, "bench w step")
            if self.what == "search":
                optimisation_step(m, self.a_batch, self.opts["alpha"], self.ctx, "bench alpha step")
            return
        with frozen(m.arch_parameters()):
            optimisation_step(m, self.w_batch, self.opts["w"], self.ctx, "bench w step")
        if self.what == "search":
            with frozen(m.weight_parameters()):
                optimisation_step(m, self.a_batch, self.opts["alpha"], self.ctx, "bench alpha step")

    def timed(self) -> None:
        sync(self.ctx.device)
        t = time.perf_counter()
        self()
        sync(self.ctx.device)
        self.times.append(time.perf_counter() - t)

    @property
    def label(self) -> str:
        return f"{self.what:6s} {self.kind:22s} b={self.b}"


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(run: Runner) -> float:
    """Peak bytes allocated by one unit of work (see the module docstring for the method)."""
    import torch

    dev = run.ctx.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        run()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # every allocation (+) and free (-) the profiler saw, in time order
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def count_flops(run: Runner) -> float:
    """FLOPs of one unit at run.size, from counts at sizes 32 and 64 (affine in H*W)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    # the stacked form pads small kernels with zero taps: count the useful FLOPs, i.e. the reference's
    kind = "supernet reference" if run.kind == "supernet stacked" else run.kind
    for s in (32, 64):
        probe = Runner(kind, run.what, run.b, s, run.ctx, channels_last=False)
        probe.model.load_state_dict(run.model.state_dict())
        with FlopCounterMode(display=False) as fc:
            probe()
        counts.append(fc.get_total_flops())
    per_pixel = (counts[1] - counts[0]) / (64 * 64 - 32 * 32)
    return counts[0] + per_pixel * (run.size * run.size - 32 * 32)


def big_conv_flops(device, reps: int) -> tuple[float, str]:
    """FLOP/s of one large conv (64->64, 3x3, fwd + bwd) in its faster layout: the practical limit."""
    import torch
    import torch.nn.functional as F

    best, label = 0.0, ""
    for cl in (False, True):
        x = torch.randn(8, 64, 128, 128, device=device)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        w = torch.randn(64, 64, 3, 3, device=device, requires_grad=True)
        flops = 3 * 2 * x.numel() * 64 * 9  # forward + grad input + grad weight
        times = []
        for _ in range(reps + 1):
            sync(device)
            t = time.perf_counter()
            F.conv2d(x, w, padding=1).sum().backward()
            sync(device)
            times.append(time.perf_counter() - t)
        rate = flops / statistics.median(times[1:])
        if rate > best:
            best, label = rate, "channels_last" if cl else "NCHW"
    return best, label


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64x64, batches 4 and 8, 3 reps")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                    help="whole-model channels_last (auto: on for CUDA, off on CPU as the engine does)")
    from typing import get_args

    from nas_core.config import CompileMode  # no torch import: threads are set below

    ap.add_argument("--compile", default="off", choices=get_args(CompileMode),
                    help="torch.compile every timed model (reduce-overhead = CUDA graphs); FLOPs are counted eagerly")
    ap.add_argument("--rows", nargs="+", default=["train", "search"], choices=["train", "search"])
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a CPU shared with other jobs use 1, or set "
                         "OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads that wait for a descheduled peer made "
                         "a U-Net step 40x slower here")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.reps = 64, [4, 8], 3
    if args.size % 16 or args.size < 32:
        raise SystemExit(f"--size must be a multiple of 16 and >= 32, got {args.size}")

    import torch

    from nas_core.config import RunConfig
    from nas_core.engine.device import resolve_device
    from nas_core.engine.loop import RunContext
    from nas_core.losses import create_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cl = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    cfg = RunConfig()
    ctx = RunContext(cfg=cfg, out_dir=Path("."), device=device, data=None, loss_fn=create_loss("exp_log"))
    print(machine(device) + f"; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY']}")
    print(f"size {args.size}x{args.size}, batches {args.batches}, {args.reps} interleaved reps (median), "
          f"model channels_last={cl}, bf16 autocast={ctx.amp}, compile={args.compile}")

    torch.manual_seed(0)
    runs: list[Runner] = []
    for b in args.batches:
        if "train" in args.rows:
            for kind in ("unet", "nas-scam-p fixed", "supernet reference", "supernet stacked"):
                runs.append(Runner(kind, "train", b, args.size, ctx, cl, args.compile))
        if "search" in args.rows:
            for kind in ("supernet straightforward", "supernet reference", "supernet stacked"):
                runs.append(Runner(kind, "search", b, args.size, ctx, cl, args.compile))
    for r in runs:  # warm-up (allocator, oneDNN primitive caches); peak memory from this pass
        if args.no_memory:
            r()
            r.peak_mb = float("nan")
        else:
            r.peak_mb = peak_memory_mb(r)
        r.flops = count_flops(r)
    limit, limit_layout = big_conv_flops(device, args.reps)
    for _ in range(args.reps):
        for r in runs:
            r.timed()

    print(f"\nreference: one large conv (64->64 3x3, 8x64x128x128, fwd+bwd, {limit_layout}): "
          f"{limit / 1e9:.1f} GFLOP/s")
    print(f"\n{'row':44s} {'median s':>9s} {'crops/s':>8s} {'peak MB':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
          f"{'% conv':>7s}")
    for r in runs:
        t = statistics.median(r.times)
        rate = r.flops / t
        print(f"{r.label:44s} {t:9.3f} {r.b / t:8.2f} {r.peak_mb:8.0f} {r.flops / 1e9:8.1f} "
              f"{rate / 1e9:8.1f} {100 * rate / limit:6.0f}%")
    print("\nsearch loop, the engine (stacked cell, alpha steps without weight gradients, fused Adam) vs the"
          "\nstraightforward implementation (per-op cell, every gradient in both steps, per-tensor Adam):")
    for b in args.batches:
        pair = {r.kind: r for r in runs if r.b == b and r.what == "search"}
        base, fast = pair.get("supernet straightforward"), pair.get("supernet stacked")
        if base and fast:
            ratio = statistics.median(base.times) / statistics.median(fast.times)
            spread = [a / c for a, c in zip(base.times, fast.times)]
            print(f"  search b={b}: {ratio:.2f}x  (per-rep ratios {', '.join(f'{x:.2f}' for x in spread)})")
    print("\nratios (median time reference / stacked; > 1 = stacked faster):")
    for b in args.batches:
        for what in args.rows:
            pair = {r.kind: r for r in runs if r.b == b and r.what == what}
            ref, st = pair.get("supernet reference"), pair.get("supernet stacked")
            if ref and st:
                ratio = statistics.median(ref.times) / statistics.median(st.times)
                spread = [a / c for a, c in zip(ref.times, st.times)]
                print(f"  {what:6s} b={b}: {ratio:.2f}x  (per-rep ratios {', '.join(f'{x:.2f}' for x in spread)})")


if __name__ == "__main__":
    main()
