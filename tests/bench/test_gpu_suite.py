"""`bench/gpu_suite.sh --dry-run` runs every part's plumbing on the CPU at a tiny size and writes one
Markdown + JSON summary; the packages the GPU machine lacks must not be needed by its measuring parts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# absent on the GPU machine the suite is written for (torch, numpy, yaml, scipy, cv2 are there)
ABSENT_ON_GPU = ("albumentations", "imagecodecs", "pydantic", "pydantic_settings", "ray", "mlflow", "optuna",
                 "fastapi")


@pytest.mark.slow  # four interpreter starts with torch: under a minute on an idle CPU
def test_gpu_suite_dry_run_writes_the_summary(tmp_path):
    out = tmp_path / "suite"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    work = tmp_path / "parts"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--dry-run", "--out", str(out), "--work",
                           str(work)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"env", "dry_run", "size", "batch", "budget_s", "elapsed_s", "parts", "rows", "share"} <= set(summary)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "summary.md"]  # the part files go to --work
    assert summary["dry_run"] is True and {"gpu", "torch", "cuda", "python"} <= set(summary["env"])
    parts = {p["name"]: p for p in summary["parts"]}
    for name in ("step_eager_bf16", "step_eager_fp32", "step_eager_tf32", "gpu_share"):
        assert parts[name]["status"] == "ok", parts[name]
    for name in ("step_compile_default_supernet", "step_compile_reduce_overhead_fixed", "step_eager_bf16_b8",
                 "smoke_ablation"):
        assert parts[name]["status"] == "skipped" and parts[name]["reason"], parts[name]
    rows = {(r["precision"], r["kind"]): r for r in summary["rows"]}
    assert set(rows) == {("bf16", "release-style fixed"), ("bf16", "unet"), ("fp32", "unet"), ("tf32", "unet")}
    for r in rows.values():
        assert {"median_s", "crops_per_s", "peak_mb", "compile_s", "vs_release_style", "first_call_s"} <= set(r)
    assert rows[("bf16", "release-style fixed")]["vs_release_style"] == pytest.approx(1.0)
    unet = rows[("bf16", "unet")]
    base = rows[("bf16", "release-style fixed")]["median_s"]
    assert unet["vs_release_style"] == pytest.approx(base / unet["median_s"])
    assert rows[("fp32", "unet")]["vs_release_style"] is None  # no fp32 release-style row in a dry run
    assert [p["trials"] for p in summary["share"]] == [1, 2] and summary["share"][0]["vs_1"] == 1.0
    md = (out / "summary.md").read_text()
    for heading in ("# GPU suite", "## Parts", "## Step and search rows", "## Trials per GPU", "## Smoke ablation"):
        assert heading in md
    assert "| train | unet | 2 | bf16 | off |" in md
    for part in ("step_eager_bf16", "gpu_share"):
        assert (work / f"{part}.log").stat().st_size > 0 and parts[part]["log_tail"]


def test_measuring_parts_import_without_the_packages_the_gpu_machine_lacks():
    # the modules the step, search and gpu_share parts import, with every absent package made unimportable
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {ABSENT_ON_GPU!r}:
            raise ImportError("blocked on the GPU machine: " + name)
sys.meta_path.insert(0, Block())
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'bench')!r}]
import step, gpu_share, gpu_suite, release_style
from nas_core.engine.loop import optimisation_step, RunContext
from nas_core.engine.search import frozen
from nas_core.models.perf import maybe_compile
from nas_core.losses import create_loss
from nas_core.engine.device import resolve_device
from nas_core.config import RunConfig
run = step.Runner("supernet release-style", "search", 1, 32,
                  RunContext(RunConfig(), __import__("pathlib").Path("."), resolve_device("cpu"), None,
                             create_loss("exp_log")), False)
run()
part = gpu_suite.ablation_part(type("A", (), {{"dry_run": False}})(), False)
print("SKIP:", part["skip"])
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SKIP: not importable here: ray, mlflow" in proc.stdout
