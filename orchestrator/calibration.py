"""Post-hoc per-class thresholds for an ablation's kept checkpoints (``nas-scam table NAME --calibrate``).

For each finished retrain (``rescore.finished_retrains``): thresholds fitted on the retrain's own validation
split (``nas_core.engine.calibrate``: per class, the cut of 0.05 ... 0.95 with the best global DSC; 0.5
where the class has no true pixel there), its test split scored at 0.5 and at them from one forward pass.
Out: Table 2 at the fitted thresholds, the paired per-image effect (calibrated minus 0.5) per method and
variant with a bootstrap interval (``stats.compare``), predicted / true areas before and after, and the
thresholds of every retrain. The run folders are read, never written; the data are prepared (or opened
from the cache) as each retrain had them, under the settings' data root.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from nas_core.engine.score import json_ready
from orchestrator import results, stats, tables
from orchestrator.curves import retrain_did_not_learn
from orchestrator.rescore import RescoreOutcome, Retrain, finished_retrains
from orchestrator.specs import RunId

CALIBRATED_SUFFIX = "@0.5"  # the method label of the fixed-threshold rows in the paired comparison
MATCH_TOLERANCE = 1e-4  # fraction: how far the 0.5 re-score may sit from the run's own test DSC


@dataclass(frozen=True)
class _Scored:
    """A retrain re-scored on its own test split (the shape ``stats.image_frame`` reads)."""

    run: RunId
    result: dict[str, Any]
    folder: Path


def calibrate_retrain(retrain: Retrain, data_root: Path, device: str = "auto") -> dict[str, Any]:
    """Fit per-class thresholds on the retrain's own validation split and score its test split at 0.5 and
    at them (``nas_core.engine.calibrate``); the data are prepared (or opened) as the retrain had them.

    Returns {"calibration", "test": {"fixed", "calibrated"}, "matches_run"}: ``matches_run`` says whether
    the 0.5 scores reproduce the run's own result.json test DSC (False: the data or the code changed)."""
    from nas_core.config import config_from_dict
    from nas_core.data import ensure_dataset
    from nas_core.engine.calibrate import fit_thresholds, score_split
    from nas_core.engine.checkpoint import load_checkpoint
    from nas_core.engine.device import resolve_device

    dev = resolve_device(device)
    model, meta = load_checkpoint(retrain.checkpoint, map_location=dev)
    model = model.to(dev)
    cfg = config_from_dict(meta["config"])
    data = ensure_dataset(cfg.data, Path(data_root), cfg.data.seed, progress=False)
    amp = bool(cfg.amp) and dev.type == "cuda"
    size = dict(tile=int(cfg.data.crop_size), stride=int(cfg.data.stride), device=dev, amp=amp)
    calibration = fit_thresholds(model, data, split="val", **size)
    test = score_split(model, data, "test", calibration.thresholds, **size)
    own = ((retrain.result.get("test") or {}).get("dsc") or {})
    again = test["fixed"]["dsc"]
    # within 0.01 DSC points: threads and batch composition can flip a pixel whose probability sits at 0.5
    matches = bool(own) and all(
        (own.get(c) is None and math.isnan(again[c]))
        or (own.get(c) is not None and abs(own[c] - again[c]) <= MATCH_TOLERANCE) for c in tables.CLASSES)
    return {"run": retrain.folder.name, "checkpoint": str(retrain.checkpoint), "calibration": calibration.to_dict(),
            "test": test, "matches_run": matches}


def _threshold_markdown(outcomes: list[tuple[Retrain, dict[str, Any]]]) -> str:
    from nas_core.classes import CLASS_BY_ID

    names = [CLASS_BY_ID[c] for c in sorted(CLASS_BY_ID)]
    lines = ["Thresholds fitted on each retrain's validation split (- : the class has no true pixel there and "
             "keeps 0.5):", "", "| run | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for retrain, out in outcomes:
        cal = out["calibration"]
        cells = ["-" if px == 0 else f"{t:.2f}" for t, px in zip(cal["thresholds"], cal["val_pixels"])]
        lines.append(f"| {retrain.folder.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def calibrate_ablation(run_root: str | Path, data_root: str | Path, out_dir: Optional[str | Path] = None,
                       device: str = "auto", name: Optional[str] = None) -> RescoreOutcome:
    """Table 2 of an ablation's kept checkpoints with per-class thresholds fitted on each retrain's validation
    split, the paired per-image effect of the calibration (calibrated minus 0.5) per method and variant, and
    the predicted / true areas before and after.

    Writes ``out_dir`` (default ``run_root/calibrated``): ``<train folder>/calibration.json`` per retrain,
    Table 2 files and ``calibration.md``. The run's own files are not touched."""
    run_root = Path(run_root)
    found, skipped = finished_retrains(run_root)
    state = run_root / "ablation.json"
    spec = json.loads(state.read_text()).get("spec", {}) if state.is_file() else {}
    std, repeat = spec.get("std", "population"), spec.get("repeat")
    out_dir = Path(out_dir) if out_dir else run_root / "calibrated"
    records, outcomes, scored, mismatched = [], [], [], []
    for retrain in found:
        out = calibrate_retrain(retrain, Path(data_root), device=device)
        folder = out_dir / retrain.folder.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "calibration.json").write_text(json.dumps(json_ready(out), indent=1))
        outcomes.append((retrain, out))
        if not out["matches_run"]:
            mismatched.append(retrain.folder.name)
        g = out["test"]["calibrated"]["dsc"]
        records.append({"method": retrain.method, "seed": retrain.seed, "draw": retrain.run.draw,
                        "fold": retrain.run.fold, "variant": retrain.run.variant,
                        **{c: g[c] for c in tables.CLASSES},
                        "no_learning": retrain_did_not_learn(retrain.result.get("history") or [])})
        for key, method in (("calibrated", retrain.method), ("fixed", retrain.method + CALIBRATED_SUFFIX)):
            run = RunId(retrain.run.phase, method, retrain.run.seed, retrain.run.draw, retrain.run.fold,
                        retrain.run.variant)
            scored.append(_Scored(run, {"test": out["test"][key]}, retrain.folder))
    table = results.table2(records, std)
    title = f"Table 2 ({name or run_root.name}), per-class thresholds fitted on each fold's validation patients"
    paths = tables.write_all(table, out_dir, title, std, repeat, records=records)
    frame, _ = stats.image_frame(scored)
    comparisons = []
    for (method, variant), _ in frame[~frame["method"].str.endswith(CALIBRATED_SUFFIX)].groupby(
            ["method", "variant"], sort=False):
        comparisons.append(stats.compare(frame, method, method + CALIBRATED_SUFFIX, variant))
    text = tables.to_text(table, title, std, repeat)
    md = [f"# Calibrated thresholds: {name or run_root.name}", "", tables.to_markdown(table, title, std, repeat), "",
          "Calibrated minus 0.5 (the same checkpoints, the same test images):", "",
          stats.comparisons_markdown(comparisons), "", "Before (0.5, rows marked @0.5) and after calibration:", "",
          stats.area_markdown(frame), "", _threshold_markdown(outcomes)]
    if mismatched:
        line = (f"the 0.5 scores differ from the run's own result.json (data or code changed since): "
                f"{', '.join(mismatched)}")
        md.append(f"Note: {line}.")
        text += f"\nnote: {line}"
    if skipped:
        text += "\nskipped: " + ", ".join(skipped)
    paths["calibration"] = out_dir / "calibration.md"
    paths["calibration"].write_text("\n".join(md) + "\n")
    text += "\n\n" + stats.comparisons_markdown(comparisons)
    return RescoreOutcome(table=table, records=records, paths=paths, text=text, skipped=skipped)


def cmd_table_calibrate(args) -> int:
    """``nas-scam table NAME --calibrate [--out DIR]``."""
    from orchestrator.settings import get_settings

    settings = get_settings()
    outcome = calibrate_ablation(settings.runs_root / args.experiment, settings.data_root, args.out,
                                 device=getattr(args, "device", "auto"), name=args.experiment)
    print(outcome.text)
    print(f"written: {', '.join(str(p) for p in outcome.paths.values())}")
    return 0
