"""`nas-scam run-spec SPEC.json`: the entrypoint of the Ray jobs the API submits (``nas-scam serve`` itself
is the API's command, api/serve.py).

``run-spec`` runs one spec of any kind inside the job: ablation and HPO through the runner's Tune
code, a single search/train/pipeline in the job's driver with MLflow tracking.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("run-spec", help="run a spec JSON/YAML of any kind here (the entrypoint of API jobs)")
    p.add_argument("spec", help="spec file (JSON or YAML): kind search|train|pipeline|ablation|hpo")
    p.add_argument("--no-model", action="store_true", help="skip mlflow.pytorch.log_model (checkpoints are still logged)")
    p.set_defaults(func=cmd_run_spec)


# ---------------------------------------------------------------- run-spec (inside a Ray job)
def cmd_run_spec(args: argparse.Namespace) -> int:
    import yaml

    from orchestrator.settings import get_settings
    from orchestrator.specs import parse_spec

    path = Path(args.spec)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {path} does not exist")
    spec = parse_spec(yaml.safe_load(path.read_text()) or {}, str(path))  # JSON is YAML
    settings = get_settings()
    outcome: dict = {"kind": spec.kind, "experiment": spec.name}
    if spec.kind == "ablation":
        from orchestrator.runner import run_ablation

        result = run_ablation(spec, settings, resume=True, log_model=not args.no_model)
        print(result.text, flush=True)
        outcome.update(parent_run_id=result.parent_run_id, experiment_id=result.experiment_id,
                       failures=result.failures, files={k: str(v) for k, v in result.paths.items()})
    elif spec.kind == "hpo":
        from orchestrator.runner import run_hpo

        best_path, params = run_hpo(spec, settings, resume=True)
        outcome.update(best_config=str(best_path), best_params=params, failures=[])
    else:
        outcome.update(run_single(spec, settings, log_model=not args.no_model), failures=[])
    (settings.runs_root / "outcome.json").write_text(json.dumps(outcome, indent=2, default=str))
    for f in outcome["failures"]:
        print(f"FAILED {f['stage']} {f['method']} seed {f['seed']}: {f['error'].splitlines()[0]}", file=sys.stderr)
    return 1 if outcome["failures"] else 0


def run_single(spec, settings, log_model: bool = True) -> dict:
    """A search, train or pipeline RunSpec in this process: MLflow parent + one child run per phase."""
    import torch
    import yaml

    from nas_core.engine import Callback, run_search, run_train
    from orchestrator import tracking
    from orchestrator.specs import build_config, run_name

    class _Epochs(Callback):
        def __init__(self, c, rid):
            self.c, self.rid = c, rid

        def on_run_start(self, phase, cfg, out_dir):
            tracking.log_params(self.c, self.rid, cfg.to_dict())

        def on_epoch_end(self, phase, epoch, metrics, out_dir):
            tracking.log_epoch(self.c, self.rid, epoch, metrics)

    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # the CPUs Ray reserved for this driver
    tracking.check_tracking_uri(settings.tracking_uri)
    c = tracking.client(settings.tracking_uri)
    exp_id = tracking.ensure_experiment(c, spec.name, settings.artifacts_root)
    root = settings.runs_root / spec.name
    root.mkdir(parents=True, exist_ok=True)
    spec_dict = spec.model_dump(mode="json")
    parent = tracking.start_parent(c, exp_id, spec.name, spec.kind, spec_dict, yaml.safe_dump(spec_dict, sort_keys=False))
    (root / "run.json").write_text(json.dumps({"parent_run_id": parent, "experiment_id": exp_id, "spec": spec_dict}))
    phases = {"search": ["search"], "train": ["train"], "pipeline": ["search", "train"]}[spec.kind]
    genotype = Path(spec.genotype) if spec.genotype else None
    out: dict = {"parent_run_id": parent, "experiment_id": exp_id, "phases": {}}
    try:
        for phase in phases:
            name = run_name(phase, spec.method, spec.seed)
            out_dir = root / name
            cfg = build_config(spec, spec.method, spec.seed, data_root=settings.data_root,
                               genotype=genotype if phase == "train" else None)
            rid, _ = tracking.child_run(c, exp_id, parent, spec.method, spec.seed, phase, name)
            try:
                if phase == "search":
                    result = run_search(cfg, out_dir, callbacks=[_Epochs(c, rid)], resume=True)
                    tracking.log_search_result(c, rid, result)
                    genotype = Path(result.genotype_path)
                else:
                    result = run_train(cfg, out_dir, callbacks=[_Epochs(c, rid)], resume=True)
                    tracking.log_train_result(c, rid, result, log_model=log_model)
            except Exception as exc:
                tracking.mark_failed(c, rid, exc)
                raise
            tracking.finish(c, rid)
            out["phases"][phase] = {"run_id": rid, "out_dir": str(out_dir)}
    except Exception as exc:
        tracking.mark_failed(c, parent, exc)
        raise
    tracking.finish(c, parent)
    return out
