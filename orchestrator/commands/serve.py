"""`nas-scam run-spec SPEC.json`: the entrypoint of the Ray jobs the API submits (``nas-scam serve`` itself
is the API's command, api/serve.py).

``run-spec`` runs one spec of any kind inside the job: ablation and HPO through the runner's Tune
code, a single search/train/pipeline in the job's driver with MLflow tracking (``runner.run_spec_file``).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from orchestrator.cli import example

    p = sub.add_parser("run-spec", help="run a spec JSON/YAML of any kind here (the entrypoint of API jobs)",
                       description="Run one spec of any kind (search, train, pipeline, ablation, hpo) in this "
                                   "process with MLflow tracking: what a Ray job that the API submits runs.",
                       epilog=example("nas-scam run-spec experiments/table2.yaml"))
    p.add_argument("spec", help="spec file (JSON or YAML): kind search|train|pipeline|ablation|hpo")
    p.add_argument("--no-model", action="store_true", help="skip mlflow.pytorch.log_model (checkpoints are still logged)")
    p.set_defaults(func=cmd_run_spec)


# ---------------------------------------------------------------- run-spec (inside a Ray job)
def cmd_run_spec(args: argparse.Namespace) -> int:
    from orchestrator.runner import run_spec_file

    return run_spec_file(Path(args.spec), log_model=not args.no_model)
