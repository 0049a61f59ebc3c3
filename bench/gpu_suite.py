"""Every GPU measurement the project needs, in one budgeted run, with one Markdown + JSON summary.

    bash bench/gpu_suite.sh --out /tmp/gpu_suite          # on the GPU machine (about 8 minutes)
    bash bench/gpu_suite.sh --dry-run --out /tmp/dry      # CPU, tiny sizes, under a minute: checks the plumbing

Parts, in priority order (each a subprocess with its own timeout, cut to what is left of the suite's
budget, so one hung compile cannot eat the rest; a part that fails or times out is recorded as such and
the suite goes on):
1. eager step and search rows (bench/step.py, every row kind) in bf16 autocast, float32 and TF32;
2. trials per GPU 1/2/4/8 (bench/gpu_share.py, process mode);
3. torch.compile "default" and "reduce-overhead" of the engine's models (compile time reported apart
   from the step time);
4. batch 8 (eager, bf16) when time is left;
5. one smoke ablation (`nas-scam ablate --preset smoke`) on the GPU when Ray and MLflow import, else a
   SKIPPED line with the reason.
Every speed figure is also given as a ratio against the release-style row of the same step kind, batch
and precision (eager), and against the straightforward search loop. Progress goes to stdout as it
happens; the summary (summary.json, summary.md) and every part's log are rewritten after each part, so
a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def env_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "gpu": None, "gpu_memory_gib": None,
            "cpus": os.cpu_count(), "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}")
    return info


def plan(a, cuda: bool) -> list[dict]:
    """The parts: name, command (or a skip reason), timeout in s."""
    py = [sys.executable, "-u"]
    size, batch, reps = (32, 2, 1) if a.dry_run else (a.size, a.batch, a.reps)
    device = "cuda" if cuda else "cpu"
    step = py + [str(BENCH / "step.py"), "--device", device, "--size", str(size), "--reps", str(reps)]
    if a.dry_run:
        step += ["--rows", "train"]
    if not cuda:
        step += ["--threads", "1", "--no-memory"]  # the CPU profiler's memory pass is slow
    step += ["--no-flops"]  # FLOPs do not depend on the device (bench/step.py on a CPU counts them); on the
    # GPU the eager FlopCounterMode probes of ~700 small convs took longer than the timed steps
    all_kinds = None
    small = ["release-style fixed", "unet"]  # dry-run: train rows only (the search rows: tests/bench/test_step.py)
    engine = ["unet", "nas-scam-p fixed", "supernet stacked"]
    parts = []

    def step_part(name, extra, kinds, timeout, precision, compile_mode="off", b=batch):
        cmd = step + ["--batches", str(b), "--json", f"{{work}}/{name}.json"] + extra
        if kinds:
            cmd += ["--kinds", *kinds]
        parts.append({"name": name, "kind": "step", "cmd": cmd, "timeout": timeout, "precision": precision,
                      "compile": compile_mode, "batch": b})

    def compile_parts(group, kinds, timeout):
        for mode in ("default", "reduce-overhead"):
            name = f"step_compile_{mode.replace('-', '_')}_{group}"
            if a.dry_run or not cuda:
                why = "dry-run" if a.dry_run else "no CUDA device"
                parts.append({"name": name, "kind": "step", "skip": f"{why}: torch.compile is measured on the GPU only",
                              "timeout": 0, "precision": "bf16", "compile": mode, "batch": batch})
            else:
                step_part(name, ["--amp", "on", "--compile", mode], kinds, timeout, "bf16", mode)

    # On an H200 (first run): an eager part of all 9 rows took about 50 s, 1/2/4/8 trials about 85 s; the
    # compiled supernet did not finish in 90 s (dynamo hits its recompile limit on the stacked cells), so
    # the retrain models' compile (what the retrain speed goal needs) comes first.
    step_part("step_eager_bf16", ["--amp", "on"], small if a.dry_run else all_kinds, 75, "bf16")
    compile_parts("fixed", engine[:2], 75)
    step_part("step_eager_fp32", ["--amp", "off"], ["unet"] if a.dry_run else all_kinds, 60, "fp32")
    step_part("step_eager_tf32", ["--amp", "off", "--tf32"], ["unet"] if a.dry_run else all_kinds, 60, "tf32")
    share_s = 0.5 if a.dry_run else a.share_seconds
    trials = ["1", "2"] if a.dry_run else ["1", "2", "4", "8"]
    parts.append({"name": "gpu_share", "kind": "share", "timeout": 100, "cmd": py + [
        str(BENCH / "gpu_share.py"), "--device", device, "--size", str(size), "--batch", str(batch),
        "--model", "unet" if a.dry_run else "supernet stacked", "--seconds", str(share_s),
        "--trials", *trials, "--json", "{work}/gpu_share.json"]})
    compile_parts("supernet", engine[2:], 120)
    if a.dry_run:
        parts.append({"name": "step_eager_bf16_b8", "kind": "step", "skip": "dry-run: batch 8 on the GPU only",
                      "timeout": 0, "precision": "bf16", "compile": "off", "batch": 8})
    else:
        step_part("step_eager_bf16_b8", ["--amp", "on"], all_kinds, 60, "bf16", b=8)
    parts.append(ablation_part(a, cuda))
    return parts


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def ablation_part(a, cuda: bool) -> dict:
    part = {"name": "smoke_ablation", "kind": "ablation", "timeout": 120}
    missing = [m for m in ("ray", "mlflow", "optuna", "pydantic", "albumentations") if not importable(m)]
    if missing:
        part["skip"] = f"not importable here: {', '.join(missing)} (the orchestrator needs them)"
    elif a.dry_run:
        part["skip"] = "dry-run: the smoke ablation runs in the full suite only"
    else:
        part["cmd"] = [sys.executable, "-u", "-m", "orchestrator.cli", "ablate", "{work}/smoke_ablation.yaml",
                       "--preset", "smoke", "--seeds", "1", "--no-model", "--name", "gpu-suite-smoke"]
        part["gpu_fraction"] = 0.5 if cuda else 0
    return part


def write_ablation_spec(out: Path, gpu: float) -> None:
    import yaml

    spec = yaml.safe_load((ROOT / "experiments" / "table2.yaml").read_text())
    spec.update(name="gpu-suite-smoke", methods=["unet", "nas-scam-p-sync"], seeds=1)
    spec["resources"] = {"cpu": 1, "gpu": gpu}
    (out / "smoke_ablation.yaml").write_text(yaml.safe_dump(spec))


def run_part(part: dict, work: Path, left_s: float) -> dict:
    """Run one part as a subprocess in its own process group; its log and JSON go to work/<name>.*."""
    rec = {"name": part["name"], "kind": part["kind"], "status": "skipped", "seconds": 0.0, "reason": None,
           **{k: part[k] for k in ("precision", "compile", "batch") if k in part}}
    if "skip" in part:
        rec["reason"] = part["skip"]
        print(f"[suite] SKIPPED {part['name']}: {part['skip']}", flush=True)
        return rec
    timeout = min(part["timeout"], left_s)
    if timeout < 15:
        rec["reason"] = f"the suite's budget is spent ({left_s:.0f} s left)"
        print(f"[suite] SKIPPED {part['name']}: {rec['reason']}", flush=True)
        return rec
    if part["kind"] == "ablation":
        write_ablation_spec(work, part["gpu_fraction"])
    cmd = [c.replace("{work}", str(work)) for c in part["cmd"]]
    rec["cmd"] = " ".join(cmd)
    log = work / f"{part['name']}.log"
    rec["log"] = str(log)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if part["kind"] == "ablation":
        env.update(NAS_SCAM_HOME=str(work / "ablation_home"), RAY_AUTH_MODE="disabled", NAS_SCAM_PROGRESS="0")
    print(f"[suite] START {part['name']} (timeout {timeout:.0f} s): {rec['cmd']}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            rec["status"] = "ok" if rc == 0 else "failed"
            rec["reason"] = None if rc == 0 else f"exit status {rc}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part's own group: its workers go with it
            proc.wait()
            rec["status"], rec["reason"] = "timeout", f"killed after {timeout:.0f} s"
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    # the summary carries the log's end (more of it when the part did not finish): $OUT holds only the summary
    tail = log.read_text(errors="replace").splitlines()[-(15 if rec["status"] == "ok" else 40):]
    rec["log_tail"] = tail
    print(f"[suite] {rec['status'].upper()} {part['name']} in {rec['seconds']} s"
          + (f" ({rec['reason']})" if rec["reason"] else ""), flush=True)
    if rec["status"] != "ok":
        print("\n".join("    " + line for line in tail), flush=True)
    data = work / f"{part['name']}.json"
    if data.exists():  # a part cut short may still have written (gpu_share writes after every point)
        rec["data"] = json.loads(data.read_text())
    return rec


def collect(parts: list[dict]) -> tuple[list[dict], list[dict]]:
    """Step rows of every part, each with its speed-up over the eager release-style / straightforward row."""
    rows = []
    for p in parts:
        for r in (p.get("data") or {}).get("rows", []) if p["kind"] == "step" else []:
            rows.append({"part": p["name"], "precision": p["precision"], "compile": p["compile"], **r})
    eager = {(r["what"], r["kind"], r["batch"], r["precision"]): r["median_s"] for r in rows if r["compile"] == "off"}
    for r in rows:
        for key, kind in (("vs_release_style", {"train": "release-style fixed", "search": "supernet release-style"}),
                          ("vs_straightforward", {"search": "supernet straightforward"})):
            base = eager.get((r["what"], kind.get(r["what"]), r["batch"], r["precision"]))
            r[key] = base / r["median_s"] if base else None
    share = []
    for p in parts:
        if p["kind"] == "share" and p.get("data"):
            share = p["data"]["points"]
    return rows, share


def fmt(x, spec=".2f", none="-") -> str:
    return none if x is None or x != x else format(x, spec)


def markdown(summary: dict) -> str:
    e = summary["env"]
    lines = ["# GPU suite", "",
             f"- device: {e.get('gpu') or 'CPU (no CUDA)'}" + (f", {e['gpu_memory_gib']} GiB" if e.get("gpu") else ""),
             f"- torch {e['torch']}, CUDA {e['cuda']}, cuDNN {e['cudnn']}, Python {e['python']}",
             f"- size {summary['size']}x{summary['size']}, batch {summary['batch']}, {summary['reps']} reps; "
             f"budget {summary['budget_s']} s, used {summary['elapsed_s']} s"
             + (" (dry-run)" if summary["dry_run"] else ""),
             "", "## Parts", "", "| part | status | s | note |", "|---|---|---|---|"]
    for p in summary["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']} | {p['reason'] or ''} |")
    lines += ["", "## Step and search rows", "",
              "Speed-ups are median time of the eager baseline row (same step kind, batch and precision) / "
              "this row's; > 1 = faster. compile s = first call - median step (compilation and warm-up).", "",
              "| what | kind | batch | precision | compile | median s | crops/s | peak MB | compile s "
              "| vs release-style | vs straightforward |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['what']} | {r['kind']} | {r['batch']} | {r['precision']} | {r['compile']} | "
                     f"{fmt(r['median_s'], '.4f')} | {fmt(r['crops_per_s'], '.1f')} | {fmt(r['peak_mb'], '.0f')} | "
                     f"{fmt(r['compile_s'], '.1f')} | {fmt(r['vs_release_style'])} | {fmt(r['vs_straightforward'])} |")
    lines += ["", "## Trials per GPU (processes sharing one device)", "", "| trials | crops/s (sum) | vs 1 trial |",
              "|---|---|---|"]
    lines += [f"| {p['trials']} | {p['crops_per_s']:.1f} | {p['vs_1']:.2f}x |" for p in summary["share"]]
    abl = next((p for p in summary["parts"] if p["kind"] == "ablation"), None)
    if abl:
        lines += ["", "## Smoke ablation", "", f"{abl['status'].upper()}: {abl['reason'] or 'finished'}"]
        if abl.get("log_tail"):
            lines += ["", "```", *abl["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict) -> None:
    summary["rows"], summary["share"] = collect(summary["parts"])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text(markdown(summary))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu_suite"))
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for every part's log and JSON (default: a new temporary folder); --out gets only "
                         "summary.md and summary.json (a lent machine returns few files)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, compile and batch 8 skipped (< 1 min)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--share-seconds", type=float, default=6.0, help="timed seconds per trials-per-GPU point")
    a = ap.parse_args(argv)
    start = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.work is None:
        import tempfile

        a.work = Path(tempfile.mkdtemp(prefix="gpu_suite_parts_"))
    a.work.mkdir(parents=True, exist_ok=True)
    info = env_info()
    cuda = info["cuda_available"] and not a.dry_run
    print(f"[suite] {json.dumps(info)}", flush=True)
    summary = {"env": info, "dry_run": a.dry_run, "size": 32 if a.dry_run else a.size,
               "batch": 2 if a.dry_run else a.batch, "reps": 1 if a.dry_run else a.reps, "budget_s": a.budget,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "elapsed_s": 0.0, "parts": [],
               "work": str(a.work)}
    for part in plan(a, cuda):
        left = a.budget - (time.perf_counter() - start)
        summary["parts"].append(run_part(part, a.work, left))
        summary["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_summary(a.out, summary)
    print(f"[suite] done in {summary['elapsed_s']} s; summary: {a.out / 'summary.md'}, {a.out / 'summary.json'}; "
          f"part logs: {a.work}", flush=True)
    print((a.out / "summary.md").read_text(), flush=True)
    return summary


if __name__ == "__main__":
    main()
