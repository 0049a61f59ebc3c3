"""Ray Tune trainables: a plain ``fn(config: dict)`` that calls the engine and reports to Tune and MLflow.

One trial = one (method, seed) of an ablation: a NAS-SCAM search (when the stage asks for it) then the
retrain, each phase a child MLflow run. The trial receives its runs' RunConfig dicts from
``orchestrator.plan`` (``config_from_dict``); it never sees the spec. Every epoch the engine's resumable ``last.pt`` goes into a Tune
checkpoint, so a trial restored on another node (or after the driver died) continues where it stopped;
a phase whose ``result.json`` exists is returned by the engine without running again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray
from ray import tune

from nas_core.config import apply_overrides, config_from_dict
from nas_core.engine import Callback
from orchestrator import tracking
from orchestrator.phases import run_phase

# files a finished search needs downstream; small, so they ride along in every later checkpoint
_SEARCH_FILES = ("result.json", "genotype.json", "alpha_history.npz")


class TuneReport(Callback):
    """Per epoch, after the MLflow recorder: ``tune.report`` with the metrics and the resumable state
    (``last.pt``, and the finished search folders in ``carry``) as a Tune checkpoint."""

    def __init__(self, run_dir: Path, carry: tuple[Path, ...] = ()):
        self.run_dir, self.carry = run_dir, carry

    def on_run_start(self, phase, cfg, out_dir):
        self.epochs = (cfg.search if phase == "search" else cfg.train).epochs

    def on_epoch_end(self, phase, epoch, metrics, out_dir):
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        # epochs: the driver's progress line says "epoch k/K"
        report.update(phase=phase, run=self.run_dir.name, epochs=getattr(self, "epochs", 0))
        with tempfile.TemporaryDirectory() as tmp:
            _pack(Path(tmp), [(Path(out_dir), ("last.pt",))] + [(d, _SEARCH_FILES) for d in self.carry])
            tune.report(report, checkpoint=tune.Checkpoint.from_directory(tmp))


@contextmanager
def worker_output(ctx: dict, name: str) -> Iterator[None]:
    """Quiet mode (the default): this worker's stdout/stderr go to ``<run folder>/logs/<name>.log``.

    File descriptors 1 and 2 are redirected, not only ``sys.stdout``: logging handlers, MLflow's
    warnings and C++ code write to the descriptors, and Ray forwards them to the driver's terminal.
    tqdm bars are off (NAS_SCAM_PROGRESS=0): the driver prints one line per epoch instead.
    """
    if ctx.get("verbose", True):
        yield
        return
    os.environ["NAS_SCAM_PROGRESS"] = "0"
    log = Path(ctx["runs_dir"]) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def _pack(dst: Path, sources: list[tuple[Path, tuple[str, ...]]]) -> None:
    # hard links when possible: last.pt is tens of MB and Tune copies the folder into its storage anyway
    for folder, names in sources:
        for name in names:
            src = folder / name
            if src.exists():
                (dst / folder.name).mkdir(exist_ok=True)
                try:
                    (dst / folder.name / name).hardlink_to(src)
                except OSError:
                    shutil.copy2(src, dst / folder.name / name)


def _unpack(root: Path) -> None:
    """Restore a Tune checkpoint's run folders under ``root`` where this node lacks them."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        for folder in Path(d).iterdir():
            if not folder.is_dir():
                continue
            target = root / folder.name
            for f in folder.iterdir():
                if not (target / f.name).exists():
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, target / f.name)


def _phase(tracker: tracking.Tracker, method: str, seed: int, phase: str, cfg, out_dir: Path, carry=(),
           tags=None, **kw):
    """One engine phase in its MLflow child run (``phases.run_phase``), reported to Tune every epoch:
    the engine's result. The child run is tagged with the Ray node that ran it (a retried trial may move)."""
    tags = {"ray_node_id": ray.get_runtime_context().get_node_id(), **(tags or {})}
    _, result = run_phase(tracker, method, seed, phase, cfg, out_dir, callbacks=[TuneReport(out_dir, carry)],
                                  tags=tags, **kw)
    return result


def ablation_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]]) -> None:
    """Tune trainable. ``config``: trial (a name in ``trials``), ctx (paths/ids); ``trials``: name ->
    ``plan.Trial.to_dict()`` (its runs' RunConfig dicts and identity), passed by ``tune.with_parameters``."""
    trial = trials[config["trial"]]
    with worker_output(config["ctx"], trial["name"]):
        _ablation_trial(trial, config["ctx"])


def _ablation_trial(trial: dict[str, Any], ctx: dict[str, Any]) -> None:
    root = Path(ctx["runs_dir"])
    tracker = tracking.Tracker.attach(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"])
    _unpack(root)
    # the search run whose genotype the retrain reads: its files ride along in the retrain's checkpoints
    carry = (root / trial["carry"],) if trial["carry"] else ()
    for run in trial["runs"]:
        cfg = config_from_dict(run["config"])
        out_dir = root / run["name"]
        tags = identity_tags(run)
        if run["phase"] == "search":
            _phase(tracker, run["method"], run["seed"], "search", cfg, out_dir, tags=tags)
            continue
        if run.get("genotype_draw") is not None:
            draw_genotype(run["method"], run["genotype_draw"], Path(cfg.model.genotype))
        result = _phase(tracker, run["method"], run["seed"], "train", cfg, out_dir, carry, tags=tags,
                        log_model=ctx.get("log_model", True))
        # a final report: the trial's result row in Tune's table (test DSC in %)
        tune.report({"phase": "done", "run": out_dir.name,
                     **{f"test_{k}": 100 * v for k, v in result.test["dsc"].items()}})


def identity_tags(run: dict[str, Any]) -> dict[str, str]:
    """A run's place in the grid as MLflow tags (draw, fold, variant and each axis value)."""
    tags = {key: str(run[key]) for key in (tracking.T_DRAW, tracking.T_FOLD) if run.get(key) is not None}
    if run.get("variant"):
        tags[tracking.T_VARIANT] = run["variant"]
    for key, value in (run.get("axes") or {}).items():
        tags[tracking.T_AXIS + key] = str(value)
    if run.get("genotype_draw") is not None:
        tags["genotype_draw_seed"] = str(run["genotype_draw"])
    return tags


def draw_genotype(method: str, seed: int, path: Path) -> Path:
    """A random control's genotype (``Genotype.random`` of the method's combination and search mode,
    drawn with ``seed``) at ``path``, written atomically; a retried trial finds the same draw there (a
    torn or different file is replaced by the deterministic draw)."""
    from nas_core.search_space.genotype import Genotype, GenotypeError
    from orchestrator.specs import METHODS

    m = METHODS[method]
    drawn = Genotype.random(m.combine, m.search, seed)
    try:
        if Genotype.load(path) == drawn:
            return path
    except (FileNotFoundError, GenotypeError, OSError, ValueError):
        pass  # absent, or torn by a worker killed mid-write: the draw is deterministic, write it again
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    drawn.save(tmp)
    os.replace(tmp, path)
    return path


def hpo_trial(config: dict[str, Any]) -> None:
    """Tune trainable for HPO: one retrain with sampled ``params`` (dotted RunConfig keys) applied to
    ``trial``'s config dict (``plan.hpo_base``)."""
    with worker_output(config["ctx"], f"hpo_{tune.get_context().get_trial_id()}"):
        _hpo_trial(config)


def _hpo_trial(config: dict[str, Any]) -> None:
    ctx, trial = config["ctx"], config["trial"]
    # Tune's search space uses "__" for the dots of RunConfig keys (see runner._space)
    params = {k.replace("__", "."): v for k, v in config["params"].items()}
    trial_id = tune.get_context().get_trial_id()
    root = Path(ctx["runs_dir"])
    tracker = tracking.Tracker.attach(ctx["tracking_uri"], ctx["experiment_id"], ctx["parent_run_id"])
    _unpack(root)
    cfg = config_from_dict(apply_overrides(trial["config"], params))
    method, seed = trial["method"], trial["seed"]
    out_dir = root / f"train__{method}__{trial_id}"
    _phase(tracker, method, seed, "train", cfg, out_dir, label=f"hpo-{trial_id}", log_model=False,
           params={"hpo": params}, tags={"hpo_params": json.dumps(params)})
