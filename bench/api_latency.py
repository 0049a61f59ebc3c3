"""Latency of GET /v1/runs/{id} under concurrent load, on loopback: p50 / p99 / throughput.

Self-contained by default: a temporary home with one finished run (its MLflow parent and a train child
in a SQLite store, as a real job leaves them), `nas-scam serve` in a subprocess, then N requests from C
concurrent clients. Or point it at a running server with --url/--key/--run-id.

    .venv/bin/python bench/api_latency.py --requests 2000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_home(home: Path) -> str:
    """One succeeded ablation run: store record + state file + MLflow parent/child with test metrics."""
    sys.path.insert(0, str(ROOT))
    from orchestrator import tracking
    from api.store import RunRecord, RunStore
    from orchestrator.settings import Settings

    s = Settings(home=home)
    tracking.check_tracking_uri(s.tracking_uri)
    t = tracking.Tracker.connect(s.tracking_uri, "bench", s.artifacts_root)
    exp = t.experiment_id
    parent = t.open_parent("bench", "ablation", {"name": "bench"}, "name: bench\n")
    child, _ = t.child("unet", 0, "train", "train__unet__seed0")
    for epoch in range(5):
        t.log_epoch(child, epoch, {"loss": 1.0 / (epoch + 1), "val_dsc": 0.1 * epoch})
    t.finish(child)
    t.finish(parent)
    run_id = "bench0000000001"
    run_dir = s.runs_root / "api" / run_id
    (run_dir / "bench").mkdir(parents=True)
    (run_dir / "bench" / "ablation.json").write_text(json.dumps({"parent_run_id": parent, "experiment_id": exp}))
    RunStore(s.api_home / "runs.db").insert(RunRecord(
        id=run_id, kind="ablation", experiment="bench", spec={"kind": "ablation", "name": "bench", "methods": ["unet"],
                                                            "seeds": 1}, status="succeeded",
        submission_id=f"nas-scam-{run_id}", run_dir=str(run_dir), created_at=time.time()))
    return run_id


async def load(url: str, key: str, run_id: str, n: int, concurrency: int, budget_s: float) -> list[float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + budget_s
    remaining = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, limits=limits, timeout=30) as client:
        async def worker():
            nonlocal errors
            for _ in remaining:
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                resp = await client.get(f"/v1/runs/{run_id}")
                latencies.append(time.perf_counter() - t0)
                errors += resp.status_code != 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if errors:
        print(f"warning: {errors} non-200 answers", file=sys.stderr)
    return latencies


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    p.add_argument("--key", help="its API key (with --url)")
    p.add_argument("--run-id", help="the run to read (with --url)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=120.0, help="stop sending after this many seconds")
    args = p.parse_args()
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="nas-scam-bench-")
    try:
        if args.url:
            url, key, run_id = args.url, args.key, args.run_id
        else:
            home, key, port = Path(tmp.name), "bench-key", _free_port()
            run_id = seed_home(home)
            env = dict(os.environ, NAS_SCAM_HOME=str(home), NAS_SCAM_API_KEYS=key, RAY_AUTH_MODE="disabled",
                       NAS_SCAM_RAY_DASHBOARD=f"http://127.0.0.1:{_free_port()}")
            proc = subprocess.Popen([sys.executable, "-m", "nas_scam.cli", "serve", "--port", str(port),
                                     "--no-local-ray", "--log-level", "warning"], env=env, cwd=tmp.name,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
        asyncio.run(load(url, key, run_id, 20, 1, 30))  # warm-up: imports, MLflow store, connections
        t0 = time.perf_counter()
        lat = asyncio.run(load(url, key, run_id, args.requests, args.concurrency, args.budget_s))
        wall = time.perf_counter() - t0
        q = statistics.quantiles(lat, n=100)
        print(f"GET /v1/runs/{{id}}: {len(lat)} requests, concurrency {args.concurrency}, {wall:.1f} s, "
              f"{len(lat) / wall:.0f} req/s")
        print(f"  p50 {1000 * q[49]:.1f} ms  p90 {1000 * q[89]:.1f} ms  p99 {1000 * q[98]:.1f} ms  "
              f"max {1000 * max(lat):.1f} ms  (p99/p50 = {q[98] / q[49]:.1f})")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
