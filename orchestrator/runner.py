"""The only Tuner / grid code: ablations (methods x seeds), HPO (Optuna + ASHA), single runs, spec files.

Flow of ``run_ablation``: checks (tracking URI, Ray address, data folder) -> Ray (resources) -> data ->
MLflow experiment + parent run (tagged with its repeat scope and std, the plan attached) -> one Tune
stage per repeat scope -> Table 2 from the MLflow children -> printed, written (md/csv/tex/png) and
attached to the parent run. Ray is imported inside functions so ``nas-scam table`` and ``--help``
never start it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import yaml

from orchestrator import ray_env, results, tables, tracking, units
from orchestrator.settings import Settings
from orchestrator.specs import AblationSpec, HpoSpec, build_config

STATE_FILE = "ablation.json"  # an ablation's or HPO's parent run and spec
SINGLE_STATE_FILE = "run.json"  # a single run's parent run


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
def preflight(spec, settings: Settings, resume: bool = True) -> None:
    """Everything a user can get wrong, checked before Ray or any trial starts (a rerun of a name without
    ``resume`` included: it was refused only after Ray and the data had started)."""
    state = settings.runs_root / spec.name / STATE_FILE
    if not resume and spec.kind in ("ablation", "hpo") and state.exists():
        raise RunnerError(f"{spec.kind} {spec.name!r} already has runs in {state.parent}; pass --resume to continue "
                          f"it, or give the spec another name:")
    tracking.check_tracking_uri(settings.tracking_uri)
    address = ray_env.resolve_address(settings.ray_address)
    if address:
        ray_env.check_address(address)
    if spec.data.source is not None and not Path(spec.data.source).expanduser().is_dir():
        raise RunnerError(f"data folder {spec.data.source} does not exist (data.source / --data)")
    genotype = getattr(spec, "genotype", None)
    if genotype and not Path(genotype).is_file():
        raise RunnerError(f"genotype file {genotype} does not exist (genotype:)")


def start_ray(settings: Settings, cpu: float, gpu: float, log_to_driver: bool = True,
              memory: Optional[Mapping[str, int]] = None) -> bool:
    """Attach to the configured cluster or start a local one on loopback; True if we started it.

    ``log_to_driver=False`` (quiet mode): workers' output is not forwarded to this terminal; trials
    write theirs to the run's logs/ folder, and what a worker prints outside a trial (an interpreter's
    "Exception ignored" at exit, say) stays in Ray's own worker logs. ``memory``: trial name -> the
    bytes it will ask for (``plan.trial_memory``); refused when one fits on no node."""
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
    problem = None
    if cpu > total.get("CPU", 0) or gpu > total.get("GPU", 0):
        problem = (f"resources per trial cpu={cpu}, gpu={gpu} exceed the cluster's "
                   f"CPU={total.get('CPU', 0)}, GPU={total.get('GPU', 0)} (resources:)")
    elif memory:
        problem = memory_problem(memory, [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")])
    if problem:
        if started:
            ray.shutdown()
        raise RunnerError(problem)
    return started


def memory_problem(memory: Mapping[str, int], nodes: list[float]) -> Optional[str]:
    """Why trials that ask for ``memory`` (trial name -> bytes) cannot run on nodes offering ``nodes``
    bytes of Ray's ``memory`` resource each, or None when every trial fits on some node (a trial runs
    on one node: the cluster's sum does not count)."""
    from orchestrator.plan import fmt_bytes

    largest = max(nodes, default=0)
    too_big = {name: need for name, need in memory.items() if need > largest}
    if not too_big:
        return None
    name = max(too_big, key=too_big.get)
    more = f" (and {len(too_big) - 1} more trials)" if len(too_big) > 1 else ""
    return (f"trial {name}{more} needs about {fmt_bytes(too_big[name])} of memory, more than any node of the "
            f"cluster offers (the largest: {fmt_bytes(largest)} of Ray's memory resource; the plan's estimate, "
            f"--plan shows it); use smaller crops (data.crop_size) or batches (search.per_class, "
            f"train.per_class), or a node with more memory")


def prepare_data(spec, settings: Settings, seeds: list[int], trials=None) -> None:
    """Generate/prepare every dataset the trials read, once, in the driver: parallel trials must not race
    to create them. ``trials``: an ablation's ``plan.expand`` (every fold and axes variant has its own
    data config); without it, the spec's first method at each seed."""
    from nas_core.config import config_from_dict
    from nas_core.data import ensure_dataset

    # the engine seeds data and split with data.seed (not the run seed): one dataset serves every seed
    if trials is not None:
        configs = [config_from_dict(r.config) for t in trials for r in t.runs]
    else:
        method = spec.methods[0] if isinstance(spec, AblationSpec) else spec.method
        configs = [build_config(spec, method, seed, data_root=settings.data_root) for seed in seeds]
    done = set()
    for cfg in configs:
        if cfg.data not in done:
            ensure_dataset(cfg.data, settings.data_root, cfg.data.seed)
            done.add(cfg.data)


# ---------------------------------------------------------------- ablation
def _log_plan(tracker: tracking.Tracker, spec: AblationSpec, settings: Settings, trials) -> dict:
    """The ``--plan`` of this ablation (``trials``: its ``plan.expand``) as parent-run artifacts
    (plan.json, plan.md) and its repeat scope and std as tags, before any trial starts."""
    from orchestrator import plan

    parent = tracker.parent_run_id
    tracker.set_tag(parent, "repeat", spec.repeat)
    tracker.set_tag(parent, "std", spec.std)
    p = plan.build_plan(spec, settings, trials=trials)
    tracker.log_text(parent, json.dumps(p, indent=2), "plan.json")
    tracker.log_text(parent, plan.to_markdown(p), "plan.md")
    return p  # its per-trial costs make the run's ETA


def spec_tracker(spec, settings: Settings, resume: bool) -> tuple[tracking.Tracker, Path]:
    """A spec's tracker with its MLflow parent run open (``Tracker.open_parent``) or reopened, and its run
    folder ``<runs>/<name>``.

    An ablation or HPO keeps its parent in ``ablation.json``: a second start needs ``resume`` and the
    same spec, and reopens that parent. A single search/train/pipeline run opens a new parent every
    time and names it in ``run.json`` (the API's resume moves an old one aside first).
    """
    root = settings.runs_root / spec.name
    single = spec.kind in ("search", "train", "pipeline")
    state_path = root / (SINGLE_STATE_FILE if single else STATE_FILE)
    tracker = tracking.Tracker.connect(settings.tracking_uri, spec.name, settings.artifacts_root)
    spec_dict = spec.model_dump(mode="json")
    if state_path.exists() and not single:
        state = json.loads(state_path.read_text())
        if not resume:
            raise RunnerError(f"{spec.kind} {spec.name!r} already has runs in {root}; pass --resume to continue "
                              f"it, or give the spec another name:")
        if state["spec"] != spec_dict:
            diff = sorted(k for k in set(spec_dict) | set(state["spec"]) if spec_dict.get(k) != state["spec"].get(k))
            raise RunnerError(f"--resume of {spec.name!r}: the spec changed since the first run (fields: "
                              f"{', '.join(diff)}); restore them or give the spec another name:")
        tracker.parent_run_id = state["parent_run_id"]
        tracker.reopen(tracker.parent_run_id)
        return tracker, root
    root.mkdir(parents=True, exist_ok=True)
    parent = tracker.open_parent(spec.name, spec.kind, spec_dict, yaml.safe_dump(spec_dict, sort_keys=False))
    state = {"parent_run_id": parent, "experiment_id": tracker.experiment_id, "spec": spec_dict}
    state_path.write_text(json.dumps(state) if single else json.dumps(state, indent=2))
    return tracker, root


def _begin(spec, settings: Settings, resume: bool, seeds: list[int], started: bool, trials=None):
    """Data, then the parent run and state file, once Ray is up: a failed start leaves nothing that
    demands --resume. The Ray we started stops if either fails."""
    try:
        prepare_data(spec, settings, seeds, trials)
        return spec_tracker(spec, settings, resume)
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise


def tuner(trainable, name: str, storage: Path, param_space: dict, tune_config, resources: Union[dict, Callable],
           max_failures: int, resume: bool, progress=None, verbose: bool = False):
    """The Tune ``Tuner`` of one grid or HPO under ``storage/name`` (restored when ``resume`` finds its
    state). ``resources``: a trial's request (``{"cpu", "gpu", "memory"}``) or ``trial_resources``'s
    function of its config."""
    from ray import tune

    from orchestrator.progress import tune_callback

    _trial_deaths_fail_the_trial()
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
        restored = tune.Tuner.restore(str(path), trainable, resume_errored=True)
        # the stored RunConfig holds the first session's callbacks and verbosity: use this session's
        # (Tuner.restore has no argument for them; only a local tuner keeps its RunConfig in-process)
        local = getattr(restored, "_local_tuner", None)
        if local is not None:
            local.get_run_config().callbacks = callbacks
            local.get_run_config().verbose = 2 if verbose else 0
        return restored
    run_config = tune.RunConfig(
        name=name, storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=callbacks, verbose=2 if verbose else 0)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def trial_resources(cpu: float, gpu: float, memory: Mapping[str, int]) -> Callable:
    """Each grid trial's request, a function of its config: its CPUs and GPUs, and the memory its plan
    measures (``memory``: trial name -> bytes, ``plan.trial_memory``), so Ray's scheduler never starts
    more trials on a node than its memory holds."""
    from ray import tune

    def request(config: dict):
        return tune.PlacementGroupFactory([{"CPU": cpu, "GPU": gpu, "memory": memory[config["trial"]]}])

    return request


def _trial_deaths_fail_the_trial() -> None:
    """Make a trial whose worker dies in the middle of a task fail alone, as one that dies while starting does.

    Ray Tune 2.60 handles a trial task's actor errors and task errors; any other Ray error ends the
    whole ``fit()`` ("RuntimeError: Caught unexpected exception: 1 worker(s) were killed due to the node
    running low on memory") and every running trial with it. The errors that mean the trial's worker is
    gone (``WORKER_GONE``: killed for memory, crashed, its raylet or node died) are handed on as the
    actor's error, with Ray's message, and Tune retries the trial (``max_failures``) or reports it failed;
    every other error still ends the run as Ray meant it to. Patched once per process, and only where
    Ray's private method still has the signature this was written against (else a warning, unpatched)."""
    import inspect
    import warnings

    import ray.exceptions as rex
    from ray.air.execution._internal.actor_manager import RayActorManager
    from ray.exceptions import RayActorError

    original = getattr(RayActorManager, "_actor_task_failed", None)
    if getattr(original, "trial_deaths_fail_the_trial", False):
        return
    if original is None or list(inspect.signature(original).parameters) != ["self", "tracked_actor_task",
                                                                              "exception"]:
        warnings.warn("Ray's RayActorManager._actor_task_failed changed: a trial killed for memory may end the "
                      "whole ablation (orchestrator.runner._trial_deaths_fail_the_trial needs updating)",
                      RuntimeWarning, stacklevel=2)
        return
    gone = tuple(getattr(rex, name) for name in WORKER_GONE if hasattr(rex, name))

    def _actor_task_failed(self, tracked_actor_task, exception):
        if isinstance(exception, gone) and not isinstance(exception, RayActorError):
            exception = RayActorError(error_msg=f"{type(exception).__name__}: {exception}")
        return original(self, tracked_actor_task=tracked_actor_task, exception=exception)

    _actor_task_failed.trial_deaths_fail_the_trial = True
    RayActorManager._actor_task_failed = _actor_task_failed


# Ray's errors that mean a trial's worker process is gone (ray.exceptions names; absent ones are skipped)
WORKER_GONE = ("OutOfMemoryError", "WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError")


def unfinished_runs(root: Path, runs) -> list[str]:
    """The names of a failed trial's runs that did not finish: a search + retrain trial whose retrain
    failed keeps its finished search (result.json is the engine's last write of a run)."""
    return [r["name"] for r in runs if not (Path(root) / r["name"] / "result.json").exists()]


def trial_name(trial) -> str:
    """A grid trial's Tune name and folder: its ``plan.Trial`` name."""
    return trial.config["trial"]


def _result_trial(res, names) -> str:
    """The name of the grid trial a Tune result belongs to. One that failed before its first report has
    no config (``res.config`` is None); its folder is named for it (``trial_dirname_creator``)."""
    name = (res.config or {}).get("trial")
    if name in names:
        return name
    return Path(res.path).name if res.path else "?"


def run_ablation(spec: AblationSpec, settings: Settings, resume: bool = False, log_model: bool = True,
                 verbose: bool = False) -> AblationOutcome:
    """Run (or resume) the grid, then build, print and record Table 2.

    ``verbose=False``: one progress line per trial event instead of Tune's table; worker output in
    ``<run folder>/logs/``."""
    from ray import tune

    from orchestrator import plan
    from orchestrator.progress import Eta, Progress, failure_reason
    from orchestrator.trials import ablation_trial

    preflight(spec, settings, resume)
    root = settings.runs_root / spec.name
    trials = plan.expand(spec, root, settings.data_root)
    # what each trial will ask Ray for, known before Ray starts: a trial no node holds is refused now
    # (its data is prepared here: the data's size counts)
    memory = plan.trial_memory(trials, settings.data_root)
    started = start_ray(settings, spec.resources.cpu, spec.resources.gpu, log_to_driver=verbose, memory=memory)
    tracker, root = _begin(spec, settings, resume, spec.seed_list, started, trials)
    parent = tracker.parent_run_id
    failures: list[dict[str, Any]] = []
    try:
        eta = Eta.from_plan(_log_plan(tracker, spec, settings, trials))
        ctx = {**tracker.ctx(), "runs_dir": str(root), "data_root": str(settings.data_root), "log_model": log_model,
               "verbose": verbose}
        resources = trial_resources(spec.resources.cpu, spec.resources.gpu, memory)
        failed_runs: set[str] = set()
        for stage, group in plan.stages(trials):
            # a grid over trial names; each trial's config dicts reach it through the object store
            # (tune.with_parameters), not through every result row as a Tune config would
            table = {t.name: t.to_dict() for t in group}
            space = {"trial": tune.grid_search(list(table)), "ctx": ctx}
            tc = tune.TuneConfig(max_concurrent_trials=spec.max_concurrent, trial_name_creator=trial_name,
                                 trial_dirname_creator=trial_name)
            progress = None if verbose else Progress(len(table), spec.max_concurrent, f"{stage} trials",
                                                     names=list(table), eta=eta)
            trainable = tune.with_parameters(ablation_trial, trials=table)
            grid = tuner(trainable, f"stage-{stage}", root / "tune", space, tc, resources,
                          spec.max_failures, resume, progress, verbose).fit()
            # a trial that finally failed (after max_failures retries): its cause in one line; the others ran on
            failed = [(_result_trial(res, table), failure_reason(res.error)) for res in grid if res.error is not None]
            for name, cause in failed:
                t = table.get(name, {})
                if t.get("carry") in failed_runs:  # a retrain of a failed search (the grid stays whole for --resume)
                    cause = f"its search {t['carry']} failed; then {cause}"
                failures.append({"stage": stage, "trial": name, "method": t.get("method", "?"),
                                 "seed": t.get("seed", "?"), "error": cause})
                failed_runs.update(unfinished_runs(root, t.get("runs", ())))
            tracker.close_failed({r["name"]: cause for name, cause in failed
                                  for r in table.get(name, {}).get("runs", ())})
    finally:
        tracker.kill_dangling("the trial ended without closing its run")
        if started:
            import ray

            ray.shutdown()
    outcome = publish_table(tracker, root / "table2", title=f"Table 2 ({spec.name})", std=spec.std,
                            repeat=spec.repeat, subtitle=tables.describe(spec), expected=_replicates(trials))
    outcome.failures = failures
    from orchestrator.stats import paired_summary

    paired = paired_summary(root, spec.methods)
    outcome.text += f"\n{paired}" if paired else ""
    tracker.set_tag(parent, "failed_trials", _failed_tag(failures))
    tracker.finish(parent)
    return outcome


def _replicates(trials) -> dict[tuple[str, str], int]:
    """(variant, method) -> how many retrains (seeds x draws x folds) the plan makes: the cells the spec
    asked for, which Table 2 marks where they have no result."""
    runs: dict[tuple[str, str], set] = {}
    for t in trials:
        for r in t.runs:
            if r.phase == "train":
                key = (getattr(r, "variant", "") or "", r.method)
                runs.setdefault(key, set()).add((r.seed, getattr(r, "draw", None)))
    return {key: len(v) for key, v in runs.items()}


def _failed_tag(failures: list[dict[str, Any]]) -> str:
    """The parent's ``failed_trials`` tag: JSON, whole (MLflow tags hold 5000 characters here), the causes
    shortened as far as that needs."""
    for width in (400, 200, 100, 0):
        text = json.dumps([{**f, "error": f["error"][:width]} for f in failures])
        if len(text) <= 5000:
            return text
    return json.dumps([f.get("trial") for f in failures])[:5000]


def publish_table(tracker: tracking.Tracker, out_dir: Path, title: str = "Table 2",
                  log_to_parent: bool = True, std: Optional[str] = None,
                  repeat: Optional[str] = None, subtitle: str = "",
                  expected: Optional[Mapping[tuple[str, str], int]] = None) -> AblationOutcome:
    """Table 2 from the parent's FINISHED train children: printed text, files, parent-run artifacts.

    ``std`` / ``repeat`` None: read from the parent run's spec params (a parent logged before ``std``
    existed printed the sample std). ``expected``: (variant, method) -> the retrains the spec asked for;
    the cells without a result are marked (``tables.with_missing``)."""
    parent = tracker.parent_run_id
    store = results.Results(tracker.tracking_uri)
    if std is None or repeat is None:
        run = store.run(parent)
        std = std or (run.std if run else results.LEGACY_STD)
        repeat = repeat or (run.repeat if run else None)
    found = store.records(parent, tracker.experiment_id)
    records = results.rows(found)
    table = results.table2(records, std)
    if expected:
        table = tables.with_missing(table, expected)
    paths = tables.write_all(table, out_dir, title, std, repeat, subtitle, records) if len(table) else {}
    if paths and log_to_parent:
        tracker.log_files(parent, paths.values(), "table2")
        tracker.log_table_metrics(parent, table)
        # the registry's alias best-<ablation> on each method's best retrain (by test Average DSC)
        parent_run = store.run(parent)
        ablation = (parent_run.tags.get(tracking.T_ABLATION) if parent_run else None) or title
        tracker.set_best_aliases(ablation, [{"method": r.method, "Average": r.dsc.get("Average"),
                                             "run_id": r.run_id} for r in found])
    text = (tables.to_text(table, title, std, repeat) if len(table)
            else f"{title}: no finished train runs under parent {parent}")
    return AblationOutcome(parent_run_id=parent, experiment_id=tracker.experiment_id, table=table, paths=paths,
                           text=text)


def table_from_mlflow(experiment: str, settings: Settings, parent: Optional[str] = None,
                      out_dir: Optional[Path] = None) -> AblationOutcome:
    """Rebuild Table 2 from MLflow alone (no run folders needed)."""
    tracking.check_tracking_uri(settings.tracking_uri)
    store = results.Results(settings.tracking_uri)
    exp = store.experiment(experiment)
    if exp is None:
        names = [e.name for e in store.experiments()]
        raise RunnerError(f"no MLflow experiment {experiment!r} at {settings.tracking_uri}; "
                          f"experiments: {', '.join(names) or '(none)'}")
    if parent is None:
        latest = store.latest_run(exp.id, kind="ablation")
        if latest is None:
            raise RunnerError(f"experiment {experiment!r} holds no ablation parent run")
        parent = latest.run_id
    tracker = tracking.Tracker.attach(settings.tracking_uri, exp.id, parent)
    out = out_dir or settings.runs_root / experiment / "table2-rebuilt"
    return publish_table(tracker, out, title=f"Table 2 ({experiment})", log_to_parent=False)


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

    preflight(spec, settings, resume)
    base = plan.hpo_base(spec, settings.data_root)
    storage = optuna_storage(settings, spec.name, resume)
    # every trial asks for the memory of the base config's retrain (a sampled crop size or per_class
    # that needs more is not re-estimated)
    memory = plan.config_memory(base, "train", settings.data_root)
    started = start_ray(settings, spec.resources.cpu, spec.resources.gpu, log_to_driver=verbose,
                        memory={"hpo": memory})
    tracker, root = _begin(spec, settings, resume, [spec.seed], started)
    parent = tracker.parent_run_id
    try:
        # ASHA stops a trial whose training_iteration reaches max_t at once, and a trial reports once per
        # epoch: max_t = epochs would stop every surviving trial at its last epoch, before its test
        # evaluation (all KILLED, no test metrics). One more lets a trial that survives the rungs finish.
        max_t = base["train"]["epochs"] + 1
        ctx = {**tracker.ctx(), "runs_dir": str(root), "data_root": str(settings.data_root), "verbose": verbose}
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
        grid = tuner(hpo_trial, "hpo", root / "tune", space, tc,
                      {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu, "memory": memory}, 0, resume, progress,
                      verbose).fit()
        if len(grid) and grid.num_errors == len(grid):
            # get_best_result returns the only trial even when it errored: a search without one
            # finished trial has no best configuration
            first = str(grid.errors[0]).strip().splitlines() if grid.errors else []
            err = RunnerError(f"all {len(grid)} HPO trials failed; the first: {first[-1][:500] if first else '?'}")
            tracker.fail(parent, err)
            raise err
        best = grid.get_best_result(metric=spec.metric, mode=spec.mode, scope="all")
    finally:
        tracker.kill_dangling("stopped early by ASHA")
        if started:
            import ray

            ray.shutdown()
    params = {k.replace("__", "."): v for k, v in best.config["params"].items()}
    cfg = config_from_dict(apply_overrides(base, params))
    path = root / "best_config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tracker.log_files(parent, [path])
    tracker.log_params(parent, {"best": params})
    score = best.metrics.get(spec.metric)
    score = units.shown(spec.metric, score) if isinstance(score, (int, float)) else score  # DSC in %
    for key, value in (("best_score", str(score)), ("optuna_study", spec.name),
                       ("optuna_storage", settings.optuna_url)):
        tracker.set_tag(parent, key, value)
    tracker.finish(parent)
    return path, params


# ---------------------------------------------------------------- single runs and spec files
def run_single(spec, settings: Settings, log_model: bool = True) -> dict[str, Any]:
    """A search, train or pipeline RunSpec in this process, no Ray: a new MLflow parent and one child run
    per phase, each recorded as an ablation trial's phase is (``phases.run_phase``)."""
    import torch

    from orchestrator.phases import run_phase
    from orchestrator.specs import run_name

    torch.set_num_threads(max(1, int(spec.resources.cpu)))  # the CPUs Ray reserved for this job's driver
    tracking.check_tracking_uri(settings.tracking_uri)
    tracker, root = spec_tracker(spec, settings, resume=False)
    parent = tracker.parent_run_id
    phases = {"search": ["search"], "train": ["train"], "pipeline": ["search", "train"]}[spec.kind]
    genotype = Path(spec.genotype) if spec.genotype else None
    out: dict[str, Any] = {"parent_run_id": parent, "experiment_id": tracker.experiment_id, "phases": {}}
    try:
        for phase in phases:
            out_dir = root / run_name(phase, spec.method, spec.seed)
            cfg = build_config(spec, spec.method, spec.seed, data_root=settings.data_root,
                               genotype=genotype if phase == "train" else None)
            rid, result = run_phase(tracker, spec.method, spec.seed, phase, cfg, out_dir, log_model=log_model)
            if phase == "search":
                genotype = Path(result.genotype_path)
            out["phases"][phase] = {"run_id": rid, "out_dir": str(out_dir)}
    except Exception as exc:
        tracker.fail(parent, exc)
        raise
    tracker.finish(parent)
    return out


def run_spec_file(path: Path, settings: Optional[Settings] = None, log_model: bool = True) -> int:
    """``nas-scam run-spec``, the entrypoint of the API's Ray jobs: one spec file (JSON or YAML) of any
    kind, resumable; ``<runs>/outcome.json`` says what it made. Exit status 1 when a trial failed."""
    from orchestrator.settings import get_settings
    from orchestrator.specs import parse_spec

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {path} does not exist")
    spec = parse_spec(yaml.safe_load(path.read_text()) or {}, str(path))  # JSON is YAML
    settings = settings or get_settings()
    outcome: dict[str, Any] = {"kind": spec.kind, "experiment": spec.name}
    if spec.kind == "ablation":
        from orchestrator.progress import quiet_logging

        # the job log reads like the CLI's: progress lines, Ray's and MLflow's logging in the run's logs/
        with quiet_logging(settings.runs_root / spec.name / "logs" / "driver.log"):
            result = run_ablation(spec, settings, resume=True, log_model=log_model)
        print(result.text, flush=True)
        outcome.update(parent_run_id=result.parent_run_id, experiment_id=result.experiment_id,
                       failures=result.failures, files={k: str(v) for k, v in result.paths.items()})
    elif spec.kind == "hpo":
        best_path, params = run_hpo(spec, settings, resume=True)
        outcome.update(best_config=str(best_path), best_params=params, failures=[])
    else:
        outcome.update(run_single(spec, settings, log_model=log_model), failures=[])
    (settings.runs_root / "outcome.json").write_text(json.dumps(outcome, indent=2, default=str))
    if not outcome["failures"]:
        return 0
    print(failure_report(outcome["failures"], "resume the run (the API's POST /v1/runs/<id>/resume, or this "
                                              "command again): finished trials are kept, the failed ones run again"),
          file=sys.stderr, flush=True)
    return 1


def failure_report(failures: list[dict[str, Any]], hint: str) -> str:
    """What a run that ended with failed trials prints last: one line per trial with its cause, then
    ``hint`` (how to go on)."""
    lines = []
    for f in failures:
        who = f.get("trial") or f"{f['stage']} {f['method']} seed {f['seed']}"
        cause = next((ln.strip() for ln in str(f["error"]).splitlines() if ln.strip()), "error")
        lines.append(f"FAILED {who}: {cause}")
    n = len(failures)
    lines.append(f"{n} trial{'s' if n > 1 else ''} failed, {'their' if n > 1 else 'its'} cells marked missing in "
                 f"Table 2; {hint}")
    return "\n".join(lines)

