"""`nas-scam ablate | table | report | compare | ui | hpo`: Table 2 ablations, rebuilding the table, the report,
paired comparisons, the MLflow UI, HPO."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from orchestrator.cli import example, preset_choices


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="run the Table 2 ablation (methods x seeds) as Ray Tune trials",
                       description="Run methods x seeds as Ray Tune trials (NAS-SCAM: search then retrain; "
                                   "baselines: retrain), track everything in MLflow, print Table 2 beside the paper. "
                                   "--plan first: what will run, for how long, on how many trials at once, and the "
                                   "GPU-hours on a measured device (--device-profile).",
                       epilog=example("nas-scam ablate experiments/table2.yaml --plan --device-profile h200",
                                      "nas-scam ablate experiments/table2.yaml --preset smoke --methods unet,nas-scam-p-sync "
                                      "--seeds 2"))
    p.add_argument("spec", help="ablation spec YAML, e.g. experiments/table2.yaml")
    _common(p)
    p.add_argument("--seeds", type=int, help="number of seeds (overrides the spec's seeds:)")
    p.add_argument("--methods", help="comma-separated method ids (overrides the spec's methods:)")
    p.add_argument("--axis", action="append", default=[], metavar="KEY=V1,V2",
                   help="a factor axis (adds to the spec's axes:), e.g. --axis train.lr=1e-4,1e-3 (repeatable)")
    p.add_argument("--no-model", action="store_true", help="skip mlflow.pytorch.log_model (checkpoints are still logged)")
    p.add_argument("--plan", action="store_true",
                   help="print what the command would do (trials, config diffs against the protocol, crops and "
                        "iterations per epoch, FLOPs and time estimates) and exit: no Ray, no MLflow run")
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as one JSON object")
    profiles = _device_profiles()
    p.add_argument("--device-profile", choices=profiles, metavar="NAME",
                   help=f"with --plan: add the hours on a device whose step times were measured ({', '.join(profiles)}; "
                        f"orchestrator/device_profiles.yaml says where)")
    p.add_argument("--remeasure", action="store_true",
                   help="with --plan: measure this machine's rate again instead of reusing the one kept for it")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("table", help="rebuild Table 2 from the MLflow store alone",
                       description="Rebuild Table 2 (Markdown, CSV, LaTeX, PNG) from the MLflow store alone, or "
                                   "re-score the kept checkpoints on another folder (--eval-data).",
                       epilog=example("nas-scam table table2"))
    p.add_argument("experiment", help="MLflow experiment name (the ablation's name:, e.g. table2)")
    p.add_argument("--parent", help="parent run id (default: the latest ablation run of the experiment)")
    p.add_argument("--out", type=Path, help="folder for table2.md/.csv/.tex/.png (default under runs)")
    p.add_argument("--eval-data", help="re-score the run folder's kept best.pt on every image of this folder")
    p.add_argument("--calibrate", action="store_true",
                   help="re-score the kept best.pt of every retrain on its own test split with per-class thresholds "
                        "fitted on its validation split (default 0.5), paired with the 0.5 scores "
                        "(written under the run folder's calibrated/ unless --out)")
    p.add_argument("--device", default="auto", help="with --eval-data or --calibrate: cpu, cuda or auto")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("report", help="one Markdown page of an ablation from its run folder: DSC and PQ "
                                      "tables, validation curves, genotypes, overlays",
                       description="Write report.md of an ablation from its run folder: DSC and PQ tables over "
                                   "seeds, validation curves, genotypes and overlays of the best method.",
                       epilog=example("nas-scam report table2 --overlay ../shared/data/he_samples/histo.jpg"))
    p.add_argument("experiment", help="the ablation's name (its run folder under the runs root)")
    p.add_argument("--out", type=Path, help="output folder (default: <run folder>/report)")
    p.add_argument("--overlay", action="append", default=[], metavar="IMAGE",
                   help="an image the best method predicts; its overlay is written and listed (repeatable)")
    p.add_argument("--format", choices=("svg", "png"), default="svg", help="figure format (default svg)")
    p.add_argument("--device", default="cpu", help="with --overlay: cpu, cuda or auto")
    p.add_argument("--bgr", action="store_true", help="the --overlay images store R and B swapped")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="paired comparison of two methods of an ablation over its test images: "
                                       "mean per-image DSC difference with a bootstrap 95%% interval",
                       description="A minus B in per-image DSC (DSC points), paired by test image (fold, image id), "
                                   "each method's runs (seeds, draws) of one variant pooled per image; a percentile "
                                   "bootstrap 95%% interval over images. Global DSC (Table 2) is a different number.",
                       epilog=example("nas-scam compare table2 nas-scam-p-sync unet"))
    p.add_argument("experiment", help="the ablation's name (its run folder under the runs root)")
    p.add_argument("a", help="method id A, e.g. nas-scam-p-sync")
    p.add_argument("b", help="method id B, e.g. random-p-sync")
    p.add_argument("--variant", help="the axes variant to compare, e.g. data.stain=none (default: the only one "
                                     "both methods have; '' = the runs without a variant)")
    p.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--axis", metavar="KEY=A,B", dest="axis_effect",
                   help="instead of two methods: what one axis is worth for method A (B is ignored): each variant "
                        "with KEY=A minus its twin with KEY=B, pooled over the other axes, e.g. "
                        "--axis train.sampler=uniform,balanced")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("ui", help="start the MLflow UI on the project's store (127.0.0.1)",
                       description="Start the MLflow UI (mlflow server, one worker) on the project's tracking "
                                   "store, on loopback; Ctrl-C stops it.",
                       epilog=example("nas-scam ui --port 5000"))
    p.add_argument("--port", type=int, default=5000, help="port of the UI (default 5000)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("hpo", help="Optuna + ASHA search over retraining hyperparameters; exports the best config",
                       description="Search retraining hyperparameters with Optuna and ASHA as Ray Tune trials; "
                                   "writes the best config, which train and ablate accept.",
                       epilog=example("nas-scam hpo experiments/hpo.yaml --preset smoke"))
    p.add_argument("spec", help="HPO spec YAML, e.g. experiments/hpo.yaml")
    _common(p)
    p.set_defaults(func=cmd_hpo)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=preset_choices(),
                   help="shrink the protocol: smoke = tiny crops and epochs on synthetic data, CPU minutes")
    p.add_argument("--data", help="dataset folder (MoNuSAC or image/mask); default: generated synthetic data")
    p.add_argument("--name", help="experiment/run-folder name (overrides the spec's name:)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="RunConfig override for every trial, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run; finished trials do not rerun")
    p.add_argument("--submit", action="store_true",
                   help="submit this command as a Ray job to NAS_SCAM_RAY_DASHBOARD instead of running it here")
    p.add_argument("--no-follow", action="store_true", help="with --submit: return after submitting")
    p.add_argument("--verbose", action="store_true",
                   help="show Tune's status table, worker output and Ray/MLflow logging instead of one line "
                        "per trial event (quiet mode writes them to <run folder>/logs/)")


def _device_profiles() -> list[str]:
    """The names of the measured device profiles (orchestrator.costs imports no pydantic or torch: the
    parser is built for every --help and every TAB)."""
    from orchestrator.costs import load_device_profiles

    return sorted(load_device_profiles())


def _announce(spec, settings) -> None:
    """The ablation's first line, before the slow start (data, Ray, MLflow): what runs and what comes first."""
    from orchestrator import plan

    grids = plan.stages(plan.expand(spec, settings.runs_root / spec.name, settings.data_root))
    ray = (f"attaching to the Ray cluster at {settings.ray_address}" if settings.ray_address else
           f"starting a local Ray ({settings.ray_num_cpus or os.cpu_count() or 1} CPUs)")
    print(f"ablation {spec.name!r}: {sum(len(g) for _, g in grids)} trials ("
          + ", then ".join(f"{stage} {len(g)}" for stage, g in grids)
          + f"); preparing the data, {ray}, opening the MLflow parent run in {settings.tracking_uri} ...",
          flush=True)


def _load(args, kind: str):
    """The spec of the command, parsed once: the file's mapping with the flags applied, then validated."""
    from nas_core.config import apply_overrides, parse_override
    from orchestrator.specs import parse_spec, read_spec

    updates: dict = {"preset": args.preset, "name": args.name}
    if getattr(args, "seeds", None) is not None:
        updates["seeds"] = args.seeds
    if getattr(args, "methods", None):
        updates["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if getattr(args, "axis", None):
        updates["axes"] = _axes(args.axis)
    if args.data:
        updates["data"] = {"source": str(Path(args.data).expanduser().resolve())}
    data = read_spec(args.spec, **updates)
    source = data["data"].get("source") if isinstance(data.get("data"), dict) else None
    if isinstance(source, str) and source and not Path(source).expanduser().is_absolute():
        # read from the folder the command runs in: Ray runs each trial in its own folder (chdir)
        data["data"] = {**data["data"], "source": str(Path(source).expanduser().resolve())}
    if args.set:
        extra: dict = {}
        for item in args.set:
            extra = apply_overrides(extra, parse_override(item))
        if "protocol" in extra:  # not a RunConfig override: the spec's protocol picks the table
            data["protocol"] = extra.pop("protocol")
        overrides = data.get("overrides") or {}
        # a non-mapping overrides: stays as it is, for the parser to name
        data["overrides"] = apply_overrides(overrides, extra) if isinstance(overrides, dict) else overrides
    spec = parse_spec(data, str(args.spec))
    if spec.kind != kind:
        raise ValueError(f"{args.spec}: kind: {spec.kind} is not an {kind} spec")
    return spec


def _axes(items: list[str]) -> dict:
    """``["train.lr=1e-4,1e-3"]`` -> ``{"train.lr": [0.0001, 0.001]}`` (each value read as YAML, as --set's)."""
    import yaml

    from nas_core.config import nest_dotted

    axes: dict = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"--axis {item!r} must look like key.sub=value1,value2")
        axes[key.strip()] = [nest_dotted({"v": yaml.safe_load(v.strip())})["v"] for v in values.split(",")]
    return axes


def _submit(args, argv_tail: list[str]) -> int:
    """``ray job submit`` done from Python: the same command, minus ``--submit``, runs as the job's driver
    over the current folder (uploaded); follows its log unless ``--no-follow``."""
    from orchestrator.jobs import JobServer, entrypoint, job_env
    from orchestrator.settings import get_settings

    spec_path = Path(args.spec).resolve()
    cwd = Path.cwd().resolve()
    if not spec_path.is_relative_to(cwd):
        raise ValueError(f"--submit uploads the current folder {cwd}; the spec {spec_path} must lie inside it")
    argv = [args.command, str(spec_path.relative_to(cwd)), *argv_tail]
    settings = get_settings()
    server = JobServer(settings.ray_dashboard)
    job_id = server.submit(argv, job_env(), python=settings.job_python, working_dir=cwd)
    print(f"submitted job {job_id} to {settings.ray_dashboard}: {entrypoint(argv, settings.job_python)}", flush=True)
    if args.no_follow:
        return 0
    status = server.follow(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def _tail(args) -> list[str]:
    out = []
    for flag in ("preset", "data", "name", "seeds", "methods"):
        value = getattr(args, flag, None)
        if value is not None:
            out += [f"--{flag}", str(value)]
    for item in args.set:
        out += ["--set", item]
    for item in getattr(args, "axis", None) or []:
        out += ["--axis", item]
    if args.resume:
        out.append("--resume")
    if getattr(args, "no_model", False):
        out.append("--no-model")
    if getattr(args, "verbose", False):
        out.append("--verbose")
    return out


def cmd_ablate(args) -> int:
    from orchestrator.settings import get_settings

    if not (args.plan or args.submit or args.json):
        # at once: checking the spec can take seconds (its registries import torch)
        print(f"ablation {args.spec}: checking the spec ...", flush=True)
    spec = _load(args, "ablation")  # validated here too: a bad spec never reaches the cluster
    if args.json and not args.plan:
        raise ValueError("--json goes with --plan (the ablation itself prints Table 2)")
    for flag, given in (("--device-profile", args.device_profile), ("--remeasure", args.remeasure)):
        if given and not args.plan:
            raise ValueError(f"{flag} goes with --plan")
    if args.plan:
        import json

        from orchestrator import plan

        # the data may be prepared now (crops are counted from it); that and the rest of the work show
        # their progress on stderr, so that --json's stdout stays one JSON object
        print(f"planning {spec.name!r}: preparing the data, counting FLOPs and memory per run, timing this "
              f"machine ...", file=sys.stderr, flush=True)
        p = plan.build_plan(spec, get_settings(), progress=not args.json, profile=args.device_profile,
                            remeasure=args.remeasure)
        print(json.dumps(p, indent=2) if args.json else plan.to_text(p), end="\n" if args.json else "")
        return 0
    if args.submit:
        return _submit(args, _tail(args))
    _announce(spec, get_settings())
    # imported after the first line: the runner brings Ray, Tune and MLflow (seconds)
    from orchestrator.progress import quiet_logging
    from orchestrator.runner import failure_report, run_ablation

    with quiet_logging(get_settings().runs_root / spec.name / "logs" / "driver.log", args.verbose):
        outcome = run_ablation(spec, get_settings(), resume=args.resume, log_model=not args.no_model,
                               verbose=args.verbose)
    print(outcome.text)
    if outcome.paths:
        print(f"written: {', '.join(str(p) for p in outcome.paths.values())}")
    print(mlflow_line(spec.name, get_settings().tracking_uri, outcome.experiment_id, outcome.parent_run_id),
          flush=True)
    if not outcome.failures:
        return 0
    # last, where a person looks: what failed, why, and how to go on
    logs = get_settings().runs_root / spec.name / "logs"
    print(failure_report(outcome.failures, f"once the cause is fixed, run the same command with --resume: finished "
                                           f"trials are kept, the failed ones run again (worker logs: {logs})"),
          file=sys.stderr)
    return 1


def ui_link(experiment_id: str, base: str = "http://127.0.0.1:5000", run_id: str | None = None) -> str:
    """The experiment's runs table (``run_id``: that run's page) in the MLflow UI at ``base``.

    MLflow 3.17's UI picks its view from ``workflowType`` (URL, else the sidebar switch remembered in the
    browser, default GenAI); the experiment's ``mlflow.experimentKind`` tag alone does not open the runs.
    """
    route = f"/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}{route}?workflowType=machine_learning"


def mlflow_line(name: str, tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where the run's results live: a tracking server's own page of the parent run; for a local store,
    the command that serves it and the page it then shows (nothing listens there until it runs)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: experiment {name!r}, parent run {run_id}: {ui_link(experiment_id, tracking_uri, run_id)}"
    return (f"MLflow: experiment {name!r}, parent run {run_id} in {tracking_uri}; to browse it, run `nas-scam ui` "
            f"(serves this store on port 5000), then open {ui_link(experiment_id, run_id=run_id)}")


def cmd_table(args) -> int:
    if args.eval_data and args.calibrate:
        raise ValueError("table: --eval-data and --calibrate are two different re-scorings; give one")
    if args.calibrate:
        from orchestrator.calibration import cmd_table_calibrate
        return cmd_table_calibrate(args)
    if args.eval_data:
        from orchestrator.rescore import cmd_table_eval
        return cmd_table_eval(args)
    from orchestrator.runner import table_from_mlflow
    from orchestrator.settings import get_settings

    outcome = table_from_mlflow(args.experiment, get_settings(), parent=args.parent, out_dir=args.out)
    print(outcome.text)
    if outcome.paths:
        print(f"written: {', '.join(str(p) for p in outcome.paths.values())}")
    return 0


def cmd_report(args) -> int:
    from orchestrator.report import cmd_report as run

    return run(args)


def cmd_compare(args) -> int:
    import json

    from orchestrator.settings import get_settings
    from orchestrator.stats import StatsError, axis_effect_runs, compare_runs

    root = get_settings().runs_root / args.experiment
    if args.axis_effect:
        key, _, values = args.axis_effect.partition("=")
        a, _, b = values.partition(",")
        if not (key and a and b):
            raise StatsError(f"--axis {args.axis_effect!r} must look like KEY=A,B (values as in the run names)")
        result = axis_effect_runs(root, args.a, key, a, b, resamples=args.resamples, seed=args.seed)
    else:
        result = compare_runs(root, args.a, args.b, variant=args.variant, resamples=args.resamples, seed=args.seed)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text())
    return 0


def cmd_ui(args) -> int:
    from orchestrator.settings import get_settings

    s = get_settings()
    uri = s.tracking_uri
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is a server already: open {uri}")
        return 0
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    s.artifacts_root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", args.host, "--port", str(args.port), "--workers", "1",
           "--backend-store-uri", uri, "--artifacts-destination", str(s.artifacts_root)]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it. The runs view: "
          f"http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning", flush=True)
    from orchestrator.ray_head import stop_process_group

    # the server (gunicorn/uvicorn and its workers) in a group of its own, stopped as a whole however we
    # end: Ctrl-C, SIGTERM (made a SystemExit so the `finally` runs) or an error
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    # Ctrl-C stops it however it was started: a shell's background job inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler of its own (uvicorn, for `serve`, sets its own)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_process_group(proc)


def cmd_hpo(args) -> int:
    from orchestrator.progress import quiet_logging
    from orchestrator.runner import run_hpo
    from orchestrator.settings import get_settings

    spec = _load(args, "hpo")
    if args.submit:
        return _submit(args, _tail(args))
    with quiet_logging(get_settings().runs_root / spec.name / "logs" / "driver.log", args.verbose):
        path, params = run_hpo(spec, get_settings(), resume=args.resume, verbose=args.verbose)
    print(f"best parameters: {params}")
    print(f"best config: {path} (load_config accepts it: nas-scam train {path})")
    return 0
