"""The only Tuner / grid code: ablations (methods x seeds), HPO (Optuna + ASHA).

Flow of ``run_ablation``: checks (tracking URI, Ray address, data folder) -> Ray (resources) -> data ->
MLflow experiment + parent run (tagged with its repeat scope and std, the plan attached) -> one Tune
stage per repeat scope -> Table 2 from the MLflow children -> printed, written (md/csv/tex/png) and
attached to the parent run. Ray is imported inside functions so ``nas-scam table`` and ``--help``
never start it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from orchestrator import ray_env, tables, tracking
from orchestrator.settings import Settings
from orchestrator.specs import AblationSpec, HpoSpec, build_config

STATE_FILE = "ablation.json"


class RunnerError(ValueError):
    """A user-fixable problem found before any trial starts."""


@dataclass
class AblationOutcome:
    parent_run_id: str
    experiment_id: str
    table: Any  # pandas.DataFrame from tables.compare
    paths: dict[str, Path]
    failures: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""


# ---------------------------------------------------------------- checks and Ray start
def preflight(spec, settings: Settings) -> None:
    """Everything a user can get wrong, checked before Ray or any trial starts."""
    tracking.check_tracking_uri(settings.tracking_uri)
    address = ray_env.resolve_address(settings.ray_address)
    if address:
        ray_env.check_address(address)
    if spec.data.source is not None and not Path(spec.data.source).expanduser().is_dir():
        raise RunnerError(f"data folder {spec.data.source} does not exist (data.source / --data)")
    genotype = getattr(spec, "genotype", None)
    if genotype and not Path(genotype).is_file():
        raise RunnerError(f"genotype file {genotype} does not exist (genotype:)")


def start_ray(settings: Settings, cpu: float, gpu: float, log_to_driver: bool = True) -> bool:
    """Attach to the configured cluster or start a local one on loopback; True if we started it.

    ``log_to_driver=False`` (quiet mode): workers' output is not forwarded to this terminal; trials
    write theirs to the run's logs/ folder, and what a worker prints outside a trial (an interpreter's
    "Exception ignored" at exit, say) stays in Ray's own worker logs."""
    address = ray_env.resolve_address(settings.ray_address)
    ray_env.prepare(local=address is None)
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            ray_env.init_local(settings.ray_num_cpus or os.cpu_count() or 1, log_to_driver=log_to_driver)
            started = True
    total = ray.cluster_resources()
    if cpu > total.get("CPU", 0) or gpu > total.get("GPU", 0):
        if started:
            ray.shutdown()
        raise RunnerError(f"resources per trial cpu={cpu}, gpu={gpu} exceed the cluster's "
                          f"CPU={total.get('CPU', 0)}, GPU={total.get('GPU', 0)} (resources:)")
    return started


def _prepare_data(spec, settings: Settings, seeds: list[int]) -> None:
    # generate/prepare the dataset once in the driver: parallel trials must not race to create it
    from nas_core.data import ensure_dataset

    # the engine seeds data and split with data.seed (not the run seed): one dataset serves every seed
    method = spec.methods[0] if isinstance(spec, AblationSpec) else spec.method
    done = set()
    for seed in seeds:
        cfg = build_config(spec, method, seed, data_root=settings.data_root)
        if cfg.data not in done:
            ensure_dataset(cfg.data, settings.data_root, cfg.data.seed)
            done.add(cfg.data)


# ---------------------------------------------------------------- ablation
def _log_plan(c, parent: str, spec: AblationSpec, settings: Settings, trials) -> None:
    """The ``--plan`` of this ablation (``trials``: its ``plan.expand``) as parent-run artifacts
    (plan.json, plan.md) and its repeat scope and std as tags, before any trial starts."""
    from orchestrator import plan

    c.set_tag(parent, "repeat", spec.repeat)
    c.set_tag(parent, "std", spec.std)
    p = plan.build_plan(spec, settings, trials=trials)
    c.log_text(parent, json.dumps(p, indent=2), "plan.json")
    c.log_text(parent, plan.to_markdown(p), "plan.md")


def _open_parent(spec, settings: Settings, kind: str, resume: bool) -> tuple[Any, str, str, Path]:
    root = settings.runs_root / spec.name
    state_path = root / STATE_FILE
    c = tracking.client(settings.tracking_uri)
    exp_id = tracking.ensure_experiment(c, spec.name, settings.artifacts_root)
    spec_dict = spec.model_dump(mode="json")
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if not resume:
            raise RunnerError(f"{kind} {spec.name!r} already has runs in {root}; pass --resume to continue it, "
                              f"or give the spec another name:")
        if state["spec"] != spec_dict:
            diff = sorted(k for k in set(spec_dict) | set(state["spec"]) if spec_dict.get(k) != state["spec"].get(k))
            raise RunnerError(f"--resume of {spec.name!r}: the spec changed since the first run (fields: "
                              f"{', '.join(diff)}); restore them or give the spec another name:")
        tracking.reopen(c, state["parent_run_id"])
        return c, exp_id, state["parent_run_id"], root
    root.mkdir(parents=True, exist_ok=True)
    parent = tracking.start_parent(c, exp_id, spec.name, kind, spec_dict, yaml.safe_dump(spec_dict, sort_keys=False))
    state_path.write_text(json.dumps({"parent_run_id": parent, "experiment_id": exp_id, "spec": spec_dict}, indent=2))
    return c, exp_id, parent, root


def _begin(spec, settings: Settings, kind: str, resume: bool, seeds: list[int], started: bool):
    """Data, then the parent run and state file, once Ray is up: a failed start leaves nothing that
    demands --resume. The Ray we started stops if either fails."""
    try:
        _prepare_data(spec, settings, seeds)
        return _open_parent(spec, settings, kind, resume)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise


def _tuner(trainable, name: str, storage: Path, param_space: dict, tune_config, resources: dict,
           max_failures: int, resume: bool, progress=None, verbose: bool = False):
    from ray import tune

    from orchestrator.progress import tune_callback

    trainable = tune.with_resources(trainable, resources)
    path = storage / name
    # quiet: our one-line-per-event callback instead of Tune's status table. Tune's new output engine
    # prints its configuration box and a TensorBoard hint even at verbose=0; the legacy one, read from
    # RAY_AIR_NEW_OUTPUT when fit() starts, is silent at 0
    callbacks = [tune_callback(progress, storage.parent / "logs")] if progress is not None else []
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if resume and tune.Tuner.can_restore(str(path)):
        # finished trials stay finished; errored ones get another go
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
        # the stored RunConfig holds the first session's callbacks and verbosity: use this session's
        # (Tuner.restore has no argument for them; only a local tuner keeps its RunConfig in-process)
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            local.get_run_config().callbacks = callbacks
            local.get_run_config().verbose = 2 if verbose else 0
        return tuner
    run_config = tune.RunConfig(
        name=name, storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=callbacks, verbose=2 if verbose else 0)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _trial_name(trial) -> str:
    return trial.config["trial"]  # plan.Trial.name


def run_ablation(spec: AblationSpec, settings: Settings, resume: bool = False, log_model: bool = True,
                 verbose: bool = False) -> AblationOutcome:
    """Run (or resume) the grid, then build, print and record Table 2.

    ``verbose=False``: one progress line per trial event instead of Tune's table; worker output in
    ``<run folder>/logs/``."""
    from ray import tune

    from orchestrator import plan
    from orchestrator.progress import Progress
    from orchestrator.trials import ablation_trial

    preflight(spec, settings)
    root = settings.runs_root / spec.name
    trials = plan.expand(spec, root, settings.data_root)
    started = start_ray(settings, spec.resources.cpu, spec.resources.gpu, log_to_driver=verbose)
    c, exp_id, parent, root = _begin(spec, settings, "ablation", resume, spec.seed_list, started)
    failures: list[dict[str, Any]] = []
    try:
        _log_plan(c, parent, spec, settings, trials)
        ctx = {"tracking_uri": settings.tracking_uri, "experiment_id": exp_id, "parent_run_id": parent,
               "runs_dir": str(root), "data_root": str(settings.data_root), "log_model": log_model,
               "verbose": verbose}
        resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
        for stage, group in plan.stages(trials):
            # a grid over trial names; each trial's config dicts reach it through the object store
            # (tune.with_parameters), not through every result row as a Tune config would
            table = {t.name: t.to_dict() for t in group}
            space = {"trial": tune.grid_search(list(table)), "ctx": ctx}
            tc = tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, trial_name_creator=_trial_name,
                                 trial_dirname_creator=_trial_name)
            progress = None if verbose else Progress(len(table), spec.max_concurrent, f"{stage} trials",
                                                     names=list(table))
            trainable = tune.with_parameters(ablation_trial, trials=table)
            grid = _tuner(trainable, f"stage-{stage}", root / "tune", space, tc, resources,
                          spec.max_failures, resume, progress, verbose).fit()
            for res in grid:
                if res.error is not None:
                    t = table[res.config["trial"]]
                    failures.append({"stage": stage, "method": t["method"], "seed": t["seed"],
                                     "error": f"{type(res.error).__name__}: {res.error}"[:2000]})
    finally:
        tracking.kill_dangling(c, exp_id, parent, "the trial ended without closing its run")
        if started:
            import ray

            ray.shutdown()
    outcome = publish_table(c, exp_id, parent, root / "table2", title=f"Table 2 ({spec.name})", std=spec.std,
                            repeat=spec.repeat, subtitle=tables.describe(spec))
    outcome.failures = failures
    c.set_tag(parent, "failed_trials", json.dumps(failures)[:5000])
    tracking.finish(c, parent)
    return outcome


def publish_table(c, exp_id: str, parent: str, out_dir: Path, title: str = "Table 2",
                  log_to_parent: bool = True, std: Optional[str] = None,
                  repeat: Optional[str] = None, subtitle: str = "") -> AblationOutcome:
    """Table 2 from the parent's FINISHED train children: printed text, files, parent-run artifacts.

    ``std`` / ``repeat`` None: read from the parent run's spec params (a parent logged before ``std``
    existed printed the sample std)."""
    if std is None or repeat is None:
        params = c.get_run(parent).data.params
        std = std or params.get("std", "sample")
        repeat = repeat or params.get("repeat")
    records = tracking.collect_records(c, exp_id, parent)
    table = tables.with_flags(tables.compare(tables.summarize(records, std)), records)
    paths = tables.write_all(table, out_dir, title, std, repeat, subtitle) if records else {}
    if records and log_to_parent:
        tracking.log_files(c, parent, paths.values(), "table2")
        tracking.log_table_metrics(c, parent, table)
    text = tables.to_text(table, title, std, repeat) if records else f"{title}: no finished train runs under parent {parent}"
    return AblationOutcome(parent_run_id=parent, experiment_id=exp_id, table=table, paths=paths, text=text)


def table_from_mlflow(experiment: str, settings: Settings, parent: Optional[str] = None,
                      out_dir: Optional[Path] = None) -> AblationOutcome:
    """Rebuild Table 2 from MLflow alone (no run folders needed)."""
    tracking.check_tracking_uri(settings.tracking_uri)
    c = tracking.client(settings.tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in c.search_experiments()]
        raise RunnerError(f"no MLflow experiment {experiment!r} at {settings.tracking_uri}; "
                          f"experiments: {', '.join(names) or '(none)'}")
    parent = parent or tracking.latest_parent(c, exp.experiment_id)
    if parent is None:
        raise RunnerError(f"experiment {experiment!r} holds no ablation parent run")
    out = out_dir or settings.runs_root / experiment / "table2-rebuilt"
    return publish_table(c, exp.experiment_id, parent, out, title=f"Table 2 ({experiment})", log_to_parent=False)


# ---------------------------------------------------------------- HPO
def _space(spec: HpoSpec) -> dict[str, Any]:
    from ray import tune

    out = {}
    for key, r in spec.space.items():
        k = key.replace(".", "__")  # Tune flattens nested spaces on "/" and "."-free keys are safer
        if r.type == "choice":
            out[k] = tune.choice(r.values)
        elif r.type == "int":
            out[k] = tune.randint(int(r.low), int(r.high) + 1)
        elif r.type == "loguniform":
            out[k] = tune.loguniform(r.low, r.high)
        else:
            out[k] = tune.uniform(r.low, r.high)
    return out


def optuna_storage(settings: Settings, study: str, resume: bool):
    """The RDB storage of the HPO studies (SQLite under home by default); a fresh run needs a new study name.

    Study name = the spec's name, so ``optuna-dashboard <url>`` lists one study per HPO spec and
    ``--resume`` continues the same study (its finished trials inform the sampler).
    """
    import optuna

    url = settings.optuna_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as exc:  # bad URL, missing driver, unreachable server
        raise RunnerError(f"Optuna storage {url} cannot be opened ({type(exc).__name__}: {exc}); "
                          f"set NAS_SCAM_OPTUNA_STORAGE to a database URL") from None
    names = {s.study_name for s in storage.get_all_studies()}
    if study in names and not resume:
        raise RunnerError(f"Optuna study {study!r} already exists in {url}; pass --resume to continue it, "
                          f"or give the spec another name (name: or --name)")
    return storage


def run_hpo(spec: HpoSpec, settings: Settings, resume: bool = False,
            verbose: bool = False) -> tuple[Path, dict[str, Any]]:
    """Optuna TPE + ASHA over retraining hyperparameters; returns (best_config.yaml, best params).

    The Optuna study persists in ``settings.optuna_url`` under the spec's name (optuna-dashboard shows it)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from nas_core.config import apply_overrides, config_from_dict
    from orchestrator import plan
    from orchestrator.progress import Progress
    from orchestrator.trials import hpo_trial

    preflight(spec, settings)
    base = plan.hpo_base(spec, settings.data_root)
    storage = optuna_storage(settings, spec.name, resume)
    started = start_ray(settings, spec.resources.cpu, spec.resources.gpu, log_to_driver=verbose)
    c, exp_id, parent, root = _begin(spec, settings, "hpo", resume, [spec.seed], started)
    try:
        max_t = base["train"]["epochs"]
        ctx = {"tracking_uri": settings.tracking_uri, "experiment_id": exp_id, "parent_run_id": parent,
               "runs_dir": str(root), "data_root": str(settings.data_root), "verbose": verbose}
        searcher = OptunaSearch(seed=spec.seed, storage=storage, study_name=spec.name)
        tc = tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
            search_alg=searcher, max_concurrent_trials=spec.max_concurrent,
            trial_name_creator=lambda t: f"hpo_{t.trial_id}", trial_dirname_creator=lambda t: f"hpo_{t.trial_id}",
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=spec.grace_period,
                                    reduction_factor=spec.reduction_factor))
        trial = {"method": spec.method, "seed": spec.seed, "config": base}
        space = {"params": _space(spec), "trial": trial, "ctx": ctx}
        progress = None if verbose else Progress(spec.num_samples, spec.max_concurrent, label="HPO trials")
        grid = _tuner(hpo_trial, "hpo", root / "tune", space, tc,
                      {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}, 0, resume, progress, verbose).fit()
        if len(grid) and grid.num_errors == len(grid):
            # get_best_result returns the only trial even when it errored: a search without one
            # finished trial has no best configuration
            first = str(grid.errors[0]).strip().splitlines() if grid.errors else []
            err = RunnerError(f"all {len(grid)} HPO trials failed; the first: {first[-1][:500] if first else '?'}")
            tracking.mark_failed(c, parent, err)
            raise err
        best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="all")
    finally:
        tracking.kill_dangling(c, exp_id, parent, "stopped early by ASHA")
        if started:
            import ray

            ray.shutdown()
    params = {k.replace("__", "."): v for k, v in best.config["params"].items()}
    cfg = config_from_dict(apply_overrides(base, params))
    path = root / "best_config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tracking.log_files(c, parent, [path])
    tracking.log_params(c, parent, {"best": params})
    c.set_tag(parent, "best_score", str(best.metrics.get(spec.metric)))
    c.set_tag(parent, "optuna_study", spec.name)
    c.set_tag(parent, "optuna_storage", settings.optuna_url)
    tracking.finish(c, parent)
    return path, params
