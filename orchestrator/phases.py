"""One engine phase in its MLflow child run: which engine runs, whether it runs at all, and what the
recorder is handed.

``run_phase`` finds or creates the child run (``Tracker.child``), decides (a FINISHED run was recorded
completely before: the engine only reads its stored result back; any other is reopened and run on),
dispatches to ``run_search`` or ``run_train`` with the recorder (``tracking.PhaseRecorder``, which only
records) and the caller's callbacks, samples MLflow's system metrics around it, and ends the run
FINISHED, or FAILED with the error. ``phase_figures`` makes the figures the recorder logs: the learning
curve, a search's genotype and alpha slides, a retrain's genotype, all kept in the run folder's
``figures/``. Ablation and HPO trials, single runs and the benchmarks all run phases through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from orchestrator import tracking


def phase_figures(phase: str, cfg, result, out_dir: Path) -> tracking.PhaseFigures:
    """The figures of a finished phase, written under ``out_dir`` (the learning curve beside the run's
    files, the rest in ``figures/``), and the ``no_learning`` tag when the curve says so."""
    from orchestrator.curves import TAG, learning_curve
    from orchestrator.figures import genotype_figure, search_figures

    out_dir = Path(out_dir)
    curve, flagged = learning_curve(phase, cfg, result, out_dir)
    paths = [curve]
    genotype = None
    if phase == "search":
        genotype = result.genotype.to_dict()
    elif getattr(getattr(cfg, "model", None), "genotype", None) and Path(cfg.model.genotype).is_file():
        genotype = json.loads(Path(cfg.model.genotype).read_text())
    if genotype:
        paths.append(genotype_figure(genotype, out_dir / "figures" / "genotype_cells.png"))
    npz = getattr(result, "alpha_history_path", None)
    if phase == "search" and npz and Path(npz).exists():
        paths += search_figures(Path(npz), out_dir / "figures")
    return tracking.PhaseFigures(paths=paths, tags={TAG: "true"} if flagged else {})


def run_phase(tracker: tracking.Tracker, method: str, seed: int, phase: str, cfg, out_dir: Path,
              callbacks: Sequence = (), log_model: bool = True, label: Optional[str] = None,
              params: Optional[Mapping[str, Any]] = None,
              tags: Optional[Mapping[str, str]] = None) -> tuple[str, Any]:
    """Run one engine phase (``search`` or ``train``) inside its child run: (the child's run id, the
    engine's result).

    ``label``: the child run's phase tag when it is not the engine phase (an HPO trial's
    ``hpo-<trial id>``); ``params``/``tags``: recorded before the engine starts; ``callbacks``: more of
    the engine's callbacks, called after the recorder (Tune's report). A crash marks the run FAILED and
    re-raises (a Tune stop by ASHA is no crash: the driver closes those runs).
    """
    from nas_core.engine import run_search, run_train

    out_dir = Path(out_dir)
    rid, status = tracker.child(method, seed, label or phase, out_dir.name)
    engine = run_search if phase == "search" else run_train
    if status == "FINISHED":
        return rid, engine(cfg, out_dir, resume=True)
    if status != "RUNNING":
        tracker.reopen(rid)
    if params:
        tracker.log_params(rid, params)
    for key, value in {tracking.T_UNIT: tracking.UNIT, **(tags or {})}.items():
        tracker.set_tag(rid, key, value)
    recorder = tracking.PhaseRecorder(tracker, rid, cfg, out_dir, log_model, figures=phase_figures)
    monitor = tracker.system_metrics(rid)
    try:
        result = engine(cfg, out_dir, callbacks=[recorder, *callbacks], resume=True)
        if recorder.result is None:  # a stored result.json: the engine returned without running
            recorder.on_run_end(phase, result)
    except Exception as exc:
        tracker.stop_system_metrics(monitor)
        tracker.fail(rid, exc)
        raise
    tracker.stop_system_metrics(monitor)
    tracker.finish(rid)
    return rid, result
