"""Aggregate training crops/s when 1, 2, 4 and 8 trials (processes) share one device.

    .venv/bin/python bench/gpu_share.py --device cuda --size 256 --batch 4 --seconds 30
    .venv/bin/python bench/gpu_share.py --quick          # CPU smoke: 32x32, 4 s per point
    .venv/bin/python bench/gpu_share.py --quick --ray    # the same points as Ray Tune trials, gpu = 1/n each

Each trial is a separate process (as Ray trials with fractional GPUs are) that builds its own model
and optimiser, warms up, waits at a barrier, then runs w steps for ``--seconds``; the table reports
the summed crops/s of all trials and the speed-up over one trial. With ``--ray`` the trials are Ray Tune
trials scheduled by the orchestrator's own tuner with ``{"cpu": 1, "gpu": 1/n}`` (a local Ray; on a
machine without a GPU it declares one, so the scheduling is the same and the work runs on the CPU);
they start together at a wall-clock time instead of a barrier. Prints numbers, never passes or
fails. On a CPU the processes share the cores (1 torch thread each), so this is only a smoke test of
the script: the figures that matter need a GPU (Ray: ``resources_per_trial={"gpu": 1 / n}``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_steps(args: dict, wait) -> tuple[int, float]:
    """Build the step, warm up, ``wait()`` for the common start, run ``args["seconds"]`` of steps:
    (crops, seconds). Shared by the process and the Ray trials."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    wait()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args["seconds"]:
        run()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * args["batch"], time.perf_counter() - start


def _trial(args: dict, barrier, results) -> None:
    results.put(timed_steps(args, barrier.wait))


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


def _ray_trainable(args: dict, bench_dir: str):
    """A Tune trainable (a closure: Ray workers pickle it by value and cannot import this script) that
    runs ``timed_steps`` from the wall-clock time ``config["t0"]`` on."""

    def trainable(config):
        from ray import tune

        sys.path.insert(0, bench_dir)
        from gpu_share import timed_steps

        late = []

        def wait():
            late.append(time.time() - config["t0"])
            time.sleep(max(0.0, -late[0]))

        crops, wall = timed_steps(args, wait)
        tune.report({"crops": crops, "wall": wall, "late_s": max(0.0, late[0])})

    return trainable


def measure_ray(n: int, args: dict, lead_s: float) -> tuple[float, float]:
    """(summed crops/s, latest start after t0 in s) of ``n`` Tune trials sharing one GPU."""
    from ray import tune

    from orchestrator.runner import tuner

    with tempfile.TemporaryDirectory() as tmp:
        space = {"i": tune.grid_search(list(range(n))), "t0": time.time() + lead_s}
        grid = tuner(_ray_trainable(args, str(Path(__file__).resolve().parent)), f"share-{n}", Path(tmp), space,
                      tune.TuneConfig(max_concurrent_trials=n), {"cpu": 1, "gpu": 1 / n}, 0, False).fit()
        if grid.errors:
            raise SystemExit(f"{n} trials: {grid.errors[0]}")
        metrics = [r.metrics for r in grid]
    return sum(m["crops"] / m["wall"] for m in metrics), max(m["late_s"] for m in metrics)


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
    ap.add_argument("--ray", action="store_true", help="run the trials as Ray Tune trials with gpu = 1/n each")
    ap.add_argument("--lead", type=float, default=30.0,
                    help="--ray: seconds from submitting the trials to their common start (start-up and warm-up)")
    ap.add_argument("--json", type=Path, default=None, help="also write the points to this JSON file")
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
    points = []
    if a.ray:
        import ray

        from orchestrator import ray_env

        gpus = torch.cuda.device_count() or 1  # no GPU: declare one, the scheduling is what is shown
        ray_env.init_local(max(a.trials), num_gpus=gpus, log_to_driver=False)
        print(f"Ray Tune trials, {{'cpu': 1, 'gpu': 1/n}} each, local Ray with {gpus} GPU(s) "
              f"({'real' if torch.cuda.device_count() else 'declared'}), common start {a.lead:.0f} s after submission")
    print(f"{'trials':>6s} {'crops/s (sum)':>14s} {'vs 1 trial':>10s}" + ("  latest start after t0" if a.ray else ""))
    try:
        for n in a.trials:
            if a.ray:
                rate, late = measure_ray(n, args, a.lead)
            else:
                rate, late = measure(n, args), None
            base = base or rate
            extra = "" if late is None else f"  {late:.1f} s" + ("  (late: raise --lead)" if late > 0.5 else "")
            print(f"{n:6d} {rate:14.2f} {rate / base:9.2f}x{extra}", flush=True)
            points.append({"trials": n, "crops_per_s": rate, "vs_1": rate / base, "late_s": late})
            if a.json:  # after every point, so a run cut short still leaves the points it measured
                import json

                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps({"device": str(device), "gpu": name, "torch": torch.__version__,
                                              "model": a.model, "size": a.size, "batch": a.batch,
                                              "seconds": a.seconds, "ray": a.ray, "points": points}, indent=1))
    finally:
        if a.ray:
            import ray

            ray.shutdown()


if __name__ == "__main__":
    main()
