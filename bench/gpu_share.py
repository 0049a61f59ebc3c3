"""Aggregate training crops/s when 1, 2, 4 and 8 trials (processes) share one device.

    .venv/bin/python bench/gpu_share.py --device cuda --size 256 --batch 4 --seconds 30
    .venv/bin/python bench/gpu_share.py --quick          # CPU smoke: 32x32, 4 s per point

Each trial is a separate process (as Ray trials with fractional GPUs are) that builds its own model
and optimiser, warms up, waits at a barrier, then runs w steps for ``--seconds``; the table reports
the summed crops/s of all trials and the speed-up over one trial. Prints numbers, never passes or
fails. On a CPU the processes share the cores (1 torch thread each), so this is only a smoke test of
the script: the figures that matter need a GPU (Ray: ``resources_per_trial={"gpu": 1 / n}``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _trial(args: dict, barrier, results) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from step import Runner  # bench/step.py: the same step the step benchmark times

    from nas_core.config import RunConfig
    from nas_core.engine.device import resolve_device
    from nas_core.engine.loop import RunContext
    from nas_core.losses import create_loss

    device = resolve_device(args["device"])
    ctx = RunContext(cfg=RunConfig(), out_dir=Path("."), device=device, data=None,
                     loss_fn=create_loss("exp_log"))
    run = Runner(args["model"], "train", args["batch"], args["size"], ctx, device.type == "cuda")
    run()  # warm-up: allocator, cuDNN/oneDNN kernels
    barrier.wait()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args["seconds"]:
        run()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results.put((steps * args["batch"], time.perf_counter() - start))


def measure(n: int, args: dict) -> float:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_trial, args=(args, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    out = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(crops / wall for crops, wall in out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="supernet stacked",
                    choices=["unet", "nas-scam-p fixed", "supernet reference", "supernet stacked"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--quick", action="store_true", help="32x32, 4 s per point, trials 1 2 4 8")
    a = ap.parse_args(argv)
    if a.quick:
        a.size, a.seconds, a.model = 32, 4.0, "unet"
    import torch

    from nas_core.engine.device import resolve_device

    device = resolve_device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke only: processes share the cores)"
    print(f"device {device}: {name}; torch {torch.__version__}; model {a.model}, {a.size}x{a.size}, batch {a.batch}")
    args = {"device": str(device), "model": a.model, "size": a.size, "batch": a.batch, "seconds": a.seconds}
    base = None
    print(f"{'trials':>6s} {'crops/s (sum)':>14s} {'vs 1 trial':>10s}")
    for n in a.trials:
        rate = measure(n, args)
        base = base or rate
        print(f"{n:6d} {rate:14.2f} {rate / base:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
