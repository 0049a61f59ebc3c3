"""The read model: what the tracking store holds, as plain dataclasses.

Every reader asks this module: the CLI's ``table``, the runner's published Table 2, ``rescore`` and
``report`` (for ``table2``), and every API route. MLflow's objects (the client, its ``Run`` with
``info``/``data``, artifact downloads) are handled here and in the recorder (``orchestrator.tracking``)
only; what leaves is ``Experiment``, ``Run``, ``Record``, ``Genotype``, paths, dicts and numbers.

What the store holds, as the recorder writes it: one experiment per spec name; per invocation a parent
run tagged ``nas_scam_kind`` = ablation | hpo | search | train | pipeline, holding the spec (params and
``spec.yaml``); under it a child run per (method, seed, phase) tagged ``nas_scam_kind`` = trial, with a
finished retrain's test DSC per class as ``test_dsc_<class>``, a search's ``genotype.json`` and a
retrain's ``checkpoint/*.pt``.

``table2`` is the one Table 2 pipeline, whatever the records were read from (this store, or the run
folders in ``rescore`` and ``report``). A second tracking backend is a second ``Results`` (these reading
methods) beside a second ``tracking.Tracker`` (the recording ones).
"""

from __future__ import annotations

import functools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from orchestrator import tables, tracking, units

# the spread of a parent logged before the ``std`` field existed: it printed the sample std
LEGACY_STD = "sample"
# the parents' kinds (tag nas_scam_kind); children are "trial", the benchmarks' parents "bench"
PARENT_KINDS = ("ablation", "hpo", "search", "train", "pipeline")


class StoreUnavailable(RuntimeError):
    """The tracking store did not answer; the message says what failed."""


class NotFound(LookupError):
    """No such run or artifact in the tracking store; the message names it."""


def std_of(spec: Mapping[str, Any]) -> str:
    """The std a spec (or a parent's params, the same keys flattened) asked Table 2 for."""
    return spec.get("std") or LEGACY_STD


# ---------------------------------------------------------------- the values
@dataclass(frozen=True)
class Experiment:
    id: str
    name: str


@dataclass(frozen=True)
class Run:
    """A parent run (one invocation of a spec) or a child run (one phase of a method and seed).

    ``status`` is MLflow's: RUNNING, SCHEDULED, FINISHED, FAILED or KILLED; times in seconds since the epoch.
    """

    run_id: str
    experiment_id: str
    name: str
    status: str
    experiment: str = ""  # the experiment's name (the spec's), where the reader looked it up
    start_time: Optional[float] = None
    end_time: Optional[float] = None
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def kind(self) -> Optional[str]:
        return self.tags.get(tracking.T_KIND)

    @property
    def parent_run_id(self) -> Optional[str]:
        return self.tags.get(tracking.T_PARENT)

    @property
    def method(self) -> Optional[str]:
        return self.tags.get(tracking.T_METHOD)

    @property
    def seed(self) -> Optional[int]:
        seed = self.tags.get(tracking.T_SEED)
        return int(seed) if seed and seed.isdigit() else None

    @property
    def phase(self) -> Optional[str]:
        return self.tags.get(tracking.T_PHASE)

    @property
    def std(self) -> str:
        """A parent's Table 2 spread (its spec's ``std``; the legacy sample std before the field existed)."""
        return std_of(self.params)

    @property
    def repeat(self) -> Optional[str]:
        return self.params.get("repeat")


@dataclass(frozen=True)
class Record:
    """One finished retrain's test scores: the input of ``table2``. ``dsc``: class -> DSC fraction."""

    method: str
    seed: int
    dsc: dict[str, float]
    draw: Optional[int] = None
    fold: Optional[int] = None
    variant: str = ""
    no_learning: bool = False
    run_id: str = ""

    def row(self) -> dict[str, Any]:
        """The flat mapping ``tables`` reads: method, seed, draw, fold, variant, one key per class, no_learning."""
        return {"method": self.method, "seed": self.seed, "draw": self.draw, "fold": self.fold,
                "variant": self.variant, **self.dsc, "no_learning": self.no_learning}


@dataclass(frozen=True)
class Genotype:
    """A finished search's genotype; ``fold``/``variant``: its place in a grid (None/"" where it has none)."""

    method: str
    seed: int
    run_id: str
    genotype: dict[str, Any]
    fold: Optional[int] = None
    variant: str = ""


# ---------------------------------------------------------------- Table 2
def rows(records: Iterable[Union[Record, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Records (``Record`` or already flat mappings, as ``rescore`` and ``report`` build them) as flat dicts."""
    return [r.row() if isinstance(r, Record) else dict(r) for r in records]


def table2(records: Iterable[Union[Record, Mapping[str, Any]]], std: str = "population"):
    """THE Table 2 pipeline: per-seed records -> mean +- ``std`` per method and class, beside the paper,
    with the "no learning k/n" flags (``tables.summarize``, ``compare``, ``with_flags``; pandas, long form,
    DSC in %)."""
    flat = rows(records)
    return tables.with_flags(tables.compare(tables.summarize(flat, std)), flat)


# ---------------------------------------------------------------- expected phases
@functools.lru_cache(maxsize=64)
def _planned_runs(spec_json: str) -> int:
    from orchestrator import plan
    from orchestrator.specs import parse_spec

    return sum(len(t.runs) for t in plan.expand(parse_spec(json.loads(spec_json)), Path(".")))


def expected_phases(spec: Mapping[str, Any]) -> int:
    """Engine runs (phases) a stored spec makes: an ablation's from its plan (``plan.expand``: searches
    shared between axes variants counted once, folds and random draws included); the count below only for
    a stored spec that no longer parses."""
    from orchestrator.specs import METHODS, PAPER_METHODS

    kind = spec.get("kind")
    if kind == "ablation":
        try:
            return _planned_runs(json.dumps(dict(spec), sort_keys=True))
        except Exception:  # noqa: BLE001 - a spec stored by an older version: count as it was counted
            pass
        methods = spec.get("methods") or list(PAPER_METHODS)
        seeds = spec.get("seeds", 3)
        n = seeds if isinstance(seeds, int) else len(seeds)
        searching = sum(METHODS[m].needs_search for m in methods if m in METHODS)
        if spec.get("repeat") == "retrain":
            return searching + len(methods) * n
        return (len(methods) + searching) * n
    if kind == "hpo":
        return int(spec.get("num_samples", 8))
    return 2 if kind == "pipeline" else 1


# ---------------------------------------------------------------- the reader
def _run(run, experiment: str = "") -> Run:
    """MLflow's Run -> ours, its metrics in the surfaces' units (DSC/PQ in %, 1-based ``best_epoch``): a
    child run recorded before ``dsc_unit = percent`` held fractions and a 0-based best epoch."""
    info, data = run.info, run.data
    metrics = {k: float(v) for k, v in data.metrics.items()}
    if data.tags.get(tracking.T_KIND) == "trial" and data.tags.get(tracking.T_UNIT) != tracking.UNIT:
        metrics = {k: v + 1 if k == "best_epoch" and v >= 0 else units.shown(k, v) for k, v in metrics.items()}
    return Run(run_id=info.run_id, experiment_id=info.experiment_id, name=info.run_name or "", status=info.status,
               experiment=experiment,
               start_time=info.start_time / 1000 if info.start_time else None,
               end_time=info.end_time / 1000 if info.end_time else None,
               tags=dict(data.tags), params=dict(data.params), metrics=metrics)


def _missing(exc: Exception) -> bool:
    """An MLflow error that says the run or experiment does not exist (or the id cannot be one)."""
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class Results:
    """The runs of one tracking store (an MLflow tracking URI), read.

    A local SQLite store that does not exist yet holds nothing: reading never creates one. Every MLflow
    failure other than "no such run" is a ``StoreUnavailable``.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self._client = None
        self._specs: dict[str, dict[str, Any]] = {}  # a parent's spec.yaml never changes

    # ------------------------------------------------------------ plumbing
    def _mlflow(self):
        """The client, or None while a local SQLite store has not been created."""
        if self._client is None:
            if self.uri.startswith("sqlite:///") and not Path(self.uri.removeprefix("sqlite:///")).is_file():
                return None
            self._client = tracking.client(self.uri)
        return self._client

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MLflow's errors do not leave this module
            if _missing(exc):
                raise NotFound(f"{what}: {str(exc)[:300]}") from None
            # not the URI: a database URI may carry a password, and the API passes this message on
            raise StoreUnavailable(f"MLflow store unavailable: {what} failed: {str(exc)[:300]}") from None

    def _search(self, experiment_ids: list[str], flt: str = "", order_by: Optional[list[str]] = None,
                max_results: Optional[int] = None, names: Optional[Mapping[str, str]] = None) -> list[Run]:
        """Runs of the experiments ``experiment_ids`` (``names``: id -> name, to fill ``Run.experiment``), page
        after page (``tracking.search_all``): all of them, or the first ``max_results``."""
        c = self._mlflow()
        if c is None or not experiment_ids:
            return []
        found = self._call("search_runs", tracking.search_all, c, experiment_ids, flt, order_by, max_results)
        return [_run(r, (names or {}).get(r.info.experiment_id, "")) for r in found]

    def ping(self) -> None:
        """The store answers (a local one is created): ``StoreUnavailable`` otherwise."""
        try:
            tracking.check_tracking_uri(self.uri)
        except tracking.TrackingError as exc:
            raise StoreUnavailable(str(exc)) from None
        self._client = self._client or tracking.client(self.uri)
        self._call("search_experiments", self._client.search_experiments, max_results=1)

    # ------------------------------------------------------------ experiments and parents
    def experiments(self) -> list[Experiment]:
        c = self._mlflow()
        if c is None:
            return []
        return [Experiment(e.experiment_id, e.name) for e in self._call("search_experiments", c.search_experiments)]

    def experiment(self, name: str) -> Optional[Experiment]:
        c = self._mlflow()
        exp = self._call(f"experiment {name!r}", c.get_experiment_by_name, name) if c is not None else None
        if exp is None or exp.lifecycle_stage == "deleted":
            return None
        return Experiment(exp.experiment_id, exp.name)

    def runs(self, experiment: Optional[str] = None, kind: Optional[str] = None) -> list[Run]:
        """Parent runs, newest first: of every experiment or of the one named ``experiment``, of every
        parent kind or of ``kind``."""
        if experiment is not None:
            exp = self.experiment(experiment)
            names = {exp.id: exp.name} if exp else {}
        else:
            names = {e.id: e.name for e in self.experiments()}
        flt = f"tags.{tracking.T_KIND} = '{kind}'" if kind else f"tags.{tracking.T_KIND} != 'trial'"
        runs = self._search(list(names), flt, order_by=["attributes.start_time DESC"], names=names)
        return [r for r in runs if r.kind in PARENT_KINDS]

    def latest_run(self, experiment_id: str, kind: str = "ablation") -> Optional[Run]:
        found = self._search([experiment_id], f"tags.{tracking.T_KIND} = '{kind}'",
                             order_by=["attributes.start_time DESC"], max_results=1)
        return found[0] if found else None

    def run(self, run_id: str) -> Optional[Run]:
        """Any run by id (parent or child); None when the store has no such run."""
        c = self._mlflow()
        if c is None:
            return None
        try:
            run = self._call(f"run {run_id}", c.get_run, run_id)
            exp = self._call(f"experiment {run.info.experiment_id}", c.get_experiment, run.info.experiment_id)
        except NotFound:
            return None
        return _run(run, exp.name)

    def spec(self, run_id: str) -> dict[str, Any]:
        """A parent's spec (its ``spec.yaml``), {} when it has none."""
        if run_id not in self._specs:
            import yaml

            text = self._text(run_id, "spec.yaml")
            spec = yaml.safe_load(text) if text else None
            self._specs[run_id] = spec if isinstance(spec, dict) else {}
        return dict(self._specs[run_id])

    # ------------------------------------------------------------ children and what they hold
    def children(self, parent_run_id: str, experiment_id: str, phase: Optional[str] = None,
                 status: Optional[str] = None) -> list[Run]:
        """The phases (child runs) of a parent; ``phase``/``status``: only those."""
        flt = f"tags.`{tracking.T_PARENT}` = '{parent_run_id}'"
        if phase:
            flt += f" and tags.{tracking.T_PHASE} = '{phase}'"
        if status:
            flt += f" and attributes.status = '{status}'"
        return self._search([experiment_id], flt)

    def records(self, parent_run_id: str, experiment_id: str) -> list[Record]:
        """Per finished retrain (FINISHED train child with a test DSC for every class): its ``Record``; the
        grid's place from the tags draw, fold and variant, ``no_learning`` from the curve's tag."""
        out = []
        for run in self.children(parent_run_id, experiment_id, phase="train", status="FINISHED"):
            m, tags = run.metrics, run.tags
            if not all(f"test_dsc_{cls}" in m for cls in tables.CLASSES):
                continue
            out.append(Record(method=tags[tracking.T_METHOD], seed=int(tags[tracking.T_SEED]),
                              dsc={cls: m[f"test_dsc_{cls}"] / 100.0 for cls in tables.CLASSES},  # % -> fraction
                              draw=int(tags[tracking.T_DRAW]) if tags.get(tracking.T_DRAW) else None,
                              fold=int(tags[tracking.T_FOLD]) if tags.get(tracking.T_FOLD) else None,
                              variant=tags.get(tracking.T_VARIANT, ""),
                              no_learning=tags.get("no_learning") == "true", run_id=run.run_id))
        return out

    def genotypes(self, parent_run_id: str, experiment_id: str) -> list[Genotype]:
        """The genotype of every finished search under a parent (its genotype.json, else its param)."""
        items = []
        for run in self.children(parent_run_id, experiment_id, phase="search", status="FINISHED"):
            text = self._text(run.run_id, "genotype.json") or run.params.get("genotype")
            if not text:
                continue
            fold = run.tags.get(tracking.T_FOLD)
            items.append(Genotype(method=run.method or "?", seed=run.seed or 0, run_id=run.run_id,
                                  genotype=json.loads(text), fold=int(fold) if fold else None,
                                  variant=run.tags.get(tracking.T_VARIANT, "")))
        return items

    def model_run(self, run_id: str) -> Optional[Run]:
        """The run whose checkpoint a model id means: a parent's first finished retrain, or the run itself."""
        run = self.run(run_id)
        if run is None or run.kind not in PARENT_KINDS:
            return run
        trained = self.children(run.run_id, run.experiment_id, phase="train", status="FINISHED")
        return trained[0] if trained else None

    def checkpoint(self, run_id: str, dest: Path) -> Path:
        """The checkpoint a retrain logged (``checkpoint/*.pt``) downloaded under ``dest``; ``NotFound``
        when the run does not exist or logged none."""
        c = self._mlflow()
        if c is None or self.run(run_id) is None:
            raise NotFound(f"no MLflow run {run_id}")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            c.download_artifacts(run_id, "checkpoint", str(dest))
        except Exception:  # noqa: BLE001 - no such artifact folder
            pass
        found = sorted(dest.rglob("*.pt"))
        if not found:
            raise NotFound(f"MLflow run {run_id} logged no checkpoint (a train phase logs checkpoint/*.pt)")
        return found[0]

    def download(self, run_id: str, path: str, dest: Path) -> Path:
        """One artifact (file or folder) of a run into ``dest``."""
        c = self._mlflow()
        if c is None:
            raise NotFound(f"no MLflow run {run_id}")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            return Path(c.download_artifacts(run_id, path, str(dest)))
        except Exception as exc:  # noqa: BLE001
            raise NotFound(f"MLflow run {run_id} has no artifact {path!r} ({str(exc)[:200]})") from None

    def _text(self, run_id: str, path: str) -> Optional[str]:
        """A small text artifact's content, None when it is missing or unreadable."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return self.download(run_id, path, Path(tmp)).read_text()
            except (NotFound, OSError, UnicodeDecodeError):
                return None
