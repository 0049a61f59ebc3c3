"""Re-scoring on an external folder: one checkpoint (``nas-scam evaluate --all``) or every kept checkpoint
of an ablation (``nas-scam table NAME --eval-data FOLDER``), with Table 2 for that folder.

An ablation's checkpoints are found by the run-folder layout the runner writes
(``settings.runs_root/NAME/train__METHOD__seedN[__drawD][__foldK][__VARIANT]/best.pt``, the run's
identity read back from the folder name, ``ablation.json`` naming the spec's std and repeat); a train
folder without ``result.json`` did not finish and is listed as skipped. No MLflow or Ray is needed: the
folder is the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator import results, tables
from orchestrator.curves import retrain_did_not_learn
from orchestrator.specs import RunId, parse_run_name
from orchestrator.units import percent_tree


class RescoreError(ValueError):
    """A run folder or checkpoint cannot be re-scored; the message names it."""


@dataclass
class RescoreOutcome:
    table: Any  # tables.compare frame
    records: list[dict[str, Any]]
    paths: dict[str, Path]
    text: str
    skipped: list[str] = field(default_factory=list)


def default_out(checkpoint: Path, folder: Path) -> Path:
    """``--out`` when omitted: ``eval-<folder name>`` beside the checkpoint (the run's own folder)."""
    return Path(checkpoint).resolve().parent / f"eval-{Path(folder).resolve().name}"


def evaluate_all(checkpoint: str | Path, folder: str | Path, out: Optional[str | Path] = None,
                 device: str = "auto", overwrite: bool = False) -> tuple[dict[str, Any], dict[str, Path]]:
    """Score one checkpoint on every image of ``folder``; write scores.json and per_image.csv.

    Earlier scores in ``out`` are never replaced unless ``overwrite`` (checked before any work)."""
    from nas_core.engine.loop import ensure_writable_dir
    from nas_core.engine.score import score_checkpoint, write_scores

    out = Path(out) if out else default_out(Path(checkpoint), Path(folder))
    if (out / "scores.json").exists() and not overwrite:
        raise RescoreError(f"{out / 'scores.json'} exists; pass --overwrite to replace it or choose another --out")
    ensure_writable_dir(out)
    result = score_checkpoint(checkpoint, folder, device=device, progress=True)
    paths = write_scores(result, out)
    return result, paths


def find_checkpoints(run_root: Path) -> tuple[list[tuple[RunId, Path]], list[str]]:
    """(run identity, best.pt) of every finished train folder under ``run_root``, and the skipped ones.

    The identity is the folder name read back (``specs.parse_run_name``: method, seed and, in grids that
    have them, draw, fold and variant)."""
    run_root = Path(run_root)
    if not run_root.is_dir():
        raise RescoreError(f"{run_root}: no such run folder (an ablation's runs live in settings.runs_root/NAME)")
    found, skipped = [], []
    for d in sorted(p for p in run_root.iterdir() if p.is_dir()):
        run = parse_run_name(d.name)
        if run is None or run.phase != "train":
            continue
        if not (d / "best.pt").is_file() or not (d / "result.json").is_file():
            skipped.append(f"{d.name} (unfinished: no best.pt/result.json)")
            continue
        found.append((run, d / "best.pt"))
    if not found:
        raise RescoreError(f"{run_root}: no finished train run (train__METHOD__seedN/best.pt with result.json)")
    return found, skipped


@dataclass(frozen=True)
class Retrain:
    """A finished retrain of an ablation: its identity (from the folder name), best.pt, result.json."""

    run: RunId
    checkpoint: Path
    result: dict[str, Any]

    @property
    def method(self) -> str:
        return self.run.method

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def folder(self) -> Path:
        return self.checkpoint.parent


def finished_retrains(run_root: Path) -> tuple[list[Retrain], list[str]]:
    """Every finished retrain under ``run_root`` with its ``result.json`` read, and the skipped folders.

    A ``result.json`` that is not a JSON object fails with its path (report and table read it alike)."""
    found, skipped = find_checkpoints(run_root)
    runs = []
    for run, ckpt in found:
        path = ckpt.parent / "result.json"
        try:
            result = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RescoreError(f"{path}: unreadable ({exc})") from None
        if not isinstance(result, dict):
            raise RescoreError(f"{path}: not a JSON object")
        runs.append(Retrain(run, ckpt, result))
    return runs, skipped


def rescore_ablation(run_root: str | Path, folder: str | Path, out_dir: Optional[str | Path] = None,
                     device: str = "auto", name: Optional[str] = None) -> RescoreOutcome:
    """Table 2 of an ablation's kept checkpoints scored on every image of ``folder`` (global DSC).

    Each checkpoint's scores.json/per_image.csv go to ``out_dir/<train folder>/``, Table 2 files to
    ``out_dir`` (default ``run_root/eval-<folder name>``)."""
    from nas_core.data.readers import detect_layout
    from nas_core.engine.score import score_checkpoint, write_scores

    run_root, folder = Path(run_root), Path(folder).expanduser()
    detect_layout(folder)  # a bad folder fails before the first checkpoint loads
    found, skipped = finished_retrains(run_root)
    state = run_root / "ablation.json"
    spec = json.loads(state.read_text()).get("spec", {}) if state.is_file() else {}
    std, repeat = spec.get("std", "population"), spec.get("repeat")
    out_dir = Path(out_dir) if out_dir else run_root / f"eval-{folder.resolve().name}"
    records = []
    for run in found:
        result = score_checkpoint(run.checkpoint, folder, device=device)
        write_scores(result, out_dir / run.checkpoint.parent.name)
        records.append({"method": run.method, "seed": run.seed, "draw": run.run.draw, "fold": run.run.fold,
                        "variant": run.run.variant,
                        **{c: result["global"]["dsc"][c] for c in tables.CLASSES},
                        "no_learning": retrain_did_not_learn(run.result.get("history") or [])})
    table = results.table2(records, std)
    title = f"Table 2 ({name or run_root.name}) on {folder.resolve()}"
    paths = tables.write_all(table, out_dir, title, std, repeat)
    text = tables.to_text(table, title, std, repeat)
    if skipped:
        text += "\nskipped: " + ", ".join(skipped)
    return RescoreOutcome(table=table, records=records, paths=paths, text=text, skipped=skipped)


# ---------------------------------------------------------------- command entry points (called from commands/*)
def cmd_evaluate_all(args) -> int:
    """``nas-scam evaluate --checkpoint CKPT --data FOLDER --all [--out DIR]``."""
    if not args.data:
        raise RescoreError("evaluate --all scores every image of a folder: give it with --data FOLDER")
    result, paths = evaluate_all(args.checkpoint, args.data, args.out, device=args.device,
                                 overwrite=getattr(args, "overwrite", False))
    g = result["global"]
    print(json.dumps(percent_tree({"folder": result["folder"], "n_images": result["n_images"], "dsc": g["dsc"],
                                   "pq": g["pq"], "dsc_per_image": g["dsc_per_image"],
                                   "units": "DSC and PQ in % (the files keep fractions)"}), indent=2, default=str))
    print(f"written: {paths['json']}, {paths['csv']}")
    return 0


def cmd_table_eval(args) -> int:
    """``nas-scam table NAME --eval-data FOLDER [--out DIR]``."""
    from orchestrator.settings import get_settings

    outcome = rescore_ablation(get_settings().runs_root / args.experiment, args.eval_data, args.out,
                               device=getattr(args, "device", "auto"), name=args.experiment)
    print(outcome.text)
    print(f"written: {', '.join(str(p) for p in outcome.paths.values())}")
    return 0
