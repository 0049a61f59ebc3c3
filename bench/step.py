"""Training-step and search-loop throughput, peak memory and FLOP/s, measured side by side in one run.

    .venv/bin/python bench/step.py --quick            # 64x64, batches 4 and 8, 3 reps (a few minutes)
    .venv/bin/python bench/step.py                    # 256x256, batches 4 and 8, 3 reps (long on a CPU)
    .venv/bin/python bench/step.py --size 128 --batches 4 --reps 5 --device cuda
    .venv/bin/python bench/step.py --size 32 --batches 2 --reps 1 --json /tmp/step.json   # smoke + JSON

Prints numbers and ratios, never passes or fails. Every configuration is built once; repetitions are
interleaved (rep 1 of every config, then rep 2, ...) and the median is reported, so a noisy shared
machine slows all of them alike. Rows:
- train step (one Adam step on all weights; the supernets' w step, alpha frozen as in the engine):
  plain U-Net, fixed NAS-SCAM-P (a uniform genotype, or ``--genotype``) as the release builds it ("release-style fixed",
  bench/release_style.py) and as we do, synchronous supernet reference and stacked;
- search iteration of the ``paper`` protocol: a w step then an alpha step, with the engine's own
  ``optimisation_step``. "release-style" = what the authors' release does per iteration
  (bench/release_style.py: per-op conv -> BN -> act on every edge, Zero ops as real 1x1 convs times 0,
  per-tensor Adam, the other parameter group's requires_grad off in each step): the baseline every speed
  figure is a ratio against. "straightforward" = the per-op reference cell, backward into every
  parameter in both steps, per-tensor Adam (a second reference); "reference" / "stacked" = the engine's
  loop (alpha steps without weight gradients, fused Adam) with either cell.
All rows run at the same precision (``--amp``: bf16 autocast on CUDA, or float32; ``--tf32``), so a
ratio isolates the implementation; the release itself ran float32.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # release_style, also when imported
# oneDNN keeps 1024 conv primitives by default; the dozen models of one run need more than that, and
# evicting each other's primitives (re-JIT every step) slowed the many-conv reference form by up to
# 1.5x. A large cache makes each model run as it would alone in a training process.
ONEDNN_CACHE = os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "65536")  # as set for oneDNN at import


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


def build(kind: str, device, channels_last: bool, compile_mode: str = "off", genotype=None):
    """(model, optimisers) for one row; the supernet's optimisers split weights and alpha like the engine.

    ``genotype``: the fixed rows' genotype (default ``FIXED_GENOTYPE()``); its combine picks -P or -S."""
    import torch

    from nas_core.models import create_model
    from nas_core.search_space import Genotype

    import release_style

    genotype = genotype or FIXED_GENOTYPE()
    if kind == "unet":
        model = create_model("unet")
    elif kind == "release-style fixed":
        model = release_style.ReleaseFixedNet(genotype)
    elif kind == "supernet release-style":
        model = release_style.ReleaseSupernet("parallel")
    elif kind == "nas-scam-p fixed":  # the row's name says P; a serial genotype builds NAS-SCAM-S
        model = create_model(f"nas-scam-{genotype.combine[0]}", genotype=genotype)
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
    elif kind.startswith("release-style") or kind.endswith("release-style"):
        make = release_style.release_adam
    else:
        from nas_core.engine.loop import adam

        make = lambda params, lr: adam(params, lr, device)  # noqa: E731 - what the engine builds
    opts = {"w": make(model.weight_parameters(), 1e-4)}
    if model.arch_parameters():
        opts["alpha"] = make(model.arch_parameters(), 1e-3)
    return model, opts


def FIXED_GENOTYPE():  # noqa: N802 - a constant, built on demand (torch-free import of this module)
    from nas_core.search_space import Genotype

    return Genotype.uniform("parallel", "synchronous", "conv3", "conv9")


# row kinds, in print order; the first of each is the baseline the others are ratios against
TRAIN_KINDS = ("release-style fixed", "unet", "nas-scam-p fixed", "supernet reference", "supernet stacked")
SEARCH_KINDS = ("supernet release-style", "supernet straightforward", "supernet reference", "supernet stacked")


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

    def __init__(self, kind: str, what: str, b: int, size: int, ctx, channels_last: bool, compile_mode: str = "off",
                 genotype=None):
        self.kind, self.what, self.b, self.size, self.ctx, self.genotype = kind, what, b, size, ctx, genotype
        self.model, self.opts = build(kind, ctx.device, channels_last, compile_mode, genotype)
        self.model.train()
        self.w_batch = make_batch(b, size, ctx.device, channels_last, seed=1)
        self.a_batch = make_batch(b, size, ctx.device, channels_last, seed=2)
        self.times: list[float] = []
        self.peak_mb = float("nan")
        self.flops = float("nan")
        self.first_s = float("nan")  # the first call: eager warm-up, or compile + warm-up

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
    if run.kind == "supernet release-style":  # the Zero convs are no useful work either
        kind = "supernet reference"
    elif run.kind == "release-style fixed":
        kind = "nas-scam-p fixed"
    for s in (32, 64):
        probe = Runner(kind, run.what, run.b, s, run.ctx, channels_last=False, genotype=run.genotype)
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


def main(argv=None) -> dict:
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
    ap.add_argument("--amp", choices=["on", "off"], default="on",
                    help="bf16 autocast on CUDA (the engine's default); off = float32 (the release's precision)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convs on CUDA (float32 rows)")
    ap.add_argument("--rows", nargs="+", default=["train", "search"], choices=["train", "search"])
    ap.add_argument("--kinds", nargs="+", default=None, choices=sorted(set(TRAIN_KINDS + SEARCH_KINDS)),
                    help="only these row kinds (default: all)")
    ap.add_argument("--genotype", type=Path, default=None,
                    help="genotype.json of a search for the two fixed rows (default: every SAM edge conv3, every "
                         "CAM edge conv9, no Zero op: nothing for either form to skip)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count (it builds two probes per row)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and ratios to this JSON file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's). On a CPU shared with other jobs use 1, or set "
                         "OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads that wait for a descheduled peer made "
                         "a U-Net step 40x slower here")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.batches, args.reps = 64, [4, 8], 3
    if args.size % 16 or args.size < 32:
        raise SystemExit(f"--size must be a multiple of 16 and >= 32, got {args.size}")

    import dataclasses
    import json

    import torch

    from nas_core.config import RunConfig
    from nas_core.engine.device import resolve_device
    from nas_core.engine.loop import RunContext
    from nas_core.losses import create_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    cl = args.channels_last == "on" or (args.channels_last == "auto" and device.type == "cuda")
    cfg = RunConfig(amp=args.amp == "on")
    ctx = RunContext(cfg=cfg, out_dir=Path("."), device=device, data=None, loss_fn=create_loss("exp_log"))
    print(machine(device) + f"; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={ONEDNN_CACHE}")
    print(f"size {args.size}x{args.size}, batches {args.batches}, {args.reps} interleaved reps (median), "
          f"model channels_last={cl}, bf16 autocast={ctx.amp}, tf32={args.tf32 and device.type == 'cuda'}, "
          f"compile={args.compile}", flush=True)

    genotype = None
    if args.genotype:
        from nas_core.search_space import Genotype

        try:
            genotype = Genotype.load(args.genotype)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--genotype {args.genotype}: {exc}") from None
        print(f"fixed rows: genotype {args.genotype} ({genotype.combine}, "
              f"{sum(op == 'zero' for cell in genotype.sam + genotype.cam for op in cell)} Zero edges of "
              f"{sum(len(cell) for cell in genotype.sam + genotype.cam)})")
    torch.manual_seed(0)
    runs: list[Runner] = []
    for b in args.batches:
        for what, kinds in (("train", TRAIN_KINDS), ("search", SEARCH_KINDS)):
            if what in args.rows:
                for kind in kinds:
                    if args.kinds is None or kind in args.kinds:
                        runs.append(Runner(kind, what, b, args.size, ctx, cl, args.compile, genotype))
    for r in runs:  # warm-up (allocator, oneDNN primitive caches, compilation); peak memory from this pass
        sync(device)
        t = time.perf_counter()
        r()
        sync(device)
        r.first_s = time.perf_counter() - t
        r.peak_mb = float("nan") if args.no_memory else peak_memory_mb(r)
        r.flops = float("nan") if args.no_flops else count_flops(r)
        print(f"  built and warmed up {r.label.strip()}: first call {r.first_s:.2f} s", flush=True)
    limit, limit_layout = big_conv_flops(device, args.reps)
    for _ in range(args.reps):
        for r in runs:
            r.timed()

    print(f"\nreference: one large conv (64->64 3x3, 8x64x128x128, fwd+bwd, {limit_layout}): "
          f"{limit / 1e9:.1f} GFLOP/s")
    print(f"\n{'row':48s} {'median s':>9s} {'crops/s':>8s} {'peak MB':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} "
          f"{'% conv':>7s} {'1st call s':>10s}")
    rows = []
    for r in runs:
        t = statistics.median(r.times)
        rate = r.flops / t
        print(f"{r.label:48s} {t:9.3f} {r.b / t:8.2f} {r.peak_mb:8.0f} {r.flops / 1e9:8.1f} "
              f"{rate / 1e9:8.1f} {100 * rate / limit:6.0f}% {r.first_s:10.2f}")
        rows.append({"what": r.what, "kind": r.kind, "batch": r.b, "median_s": t, "times_s": r.times,
                     "crops_per_s": r.b / t, "peak_mb": r.peak_mb, "gflop": r.flops / 1e9,
                     "first_call_s": r.first_s, "compile_s": r.first_s - t if args.compile != "off" else None})
    ratios = speedups(runs, args)
    out = {"machine": machine(device), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "cuda": torch.version.cuda, "size": args.size, "batches": args.batches,
           "reps": args.reps, "amp": ctx.amp, "tf32": bool(args.tf32 and device.type == "cuda"),
           "compile": args.compile, "channels_last": cl, "conv_limit_gflops": limit / 1e9,
           "genotype": str(args.genotype) if args.genotype else "uniform conv3/conv9",
           "rows": rows, "ratios": ratios, "config": {"loss": "exp_log", **{k: v for k, v in
                                                      dataclasses.asdict(cfg).items() if k in ("amp",)}}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=float))
    return out


def speedups(runs: list[Runner], args) -> list[dict]:
    """Median time of the baseline row / median time of each row (> 1 = faster than the baseline).

    Baselines: the release-style rows (train: its fixed network; search: its SearchNet iteration) and, for
    search, the straightforward loop as a second reference."""
    out = []
    print("\nspeed-up over the baselines (median time baseline / row; > 1 = faster), per-rep ratios in ():")
    for b in args.batches:
        for what, kinds in (("train", TRAIN_KINDS), ("search", SEARCH_KINDS)):
            pair = {r.kind: r for r in runs if r.b == b and r.what == what}
            bases = [k for k in (kinds[0], "supernet straightforward" if what == "search" else None) if k in pair]
            for base_kind in bases:
                base = pair[base_kind]
                for kind in kinds:
                    if kind == base_kind or kind not in pair:
                        continue
                    r = pair[kind]
                    ratio = statistics.median(base.times) / statistics.median(r.times)
                    spread = [a / c for a, c in zip(base.times, r.times)]
                    print(f"  {what:6s} b={b} {kind:24s} vs {base_kind:24s}: {ratio:5.2f}x  "
                          f"({', '.join(f'{x:.2f}' for x in spread)})")
                    out.append({"what": what, "batch": b, "kind": kind, "baseline": base_kind, "speedup": ratio,
                                "per_rep": spread})
    return out


if __name__ == "__main__":
    main()
