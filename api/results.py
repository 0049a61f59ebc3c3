"""What a run produced, for the routes: the read model (``orchestrator.results``) in the API's schemas and
errors. A store that does not answer is a 503; MLflow itself is never named here."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from api.errors import ApiError
from api.schemas import GenotypeItem, Progress, RunMetrics
from api.store import RunRecord
from orchestrator import results
from orchestrator.settings import Settings

T = TypeVar("T")


@functools.lru_cache(maxsize=8)
def _reader(uri: str) -> results.Results:
    return results.Results(uri)


def reader(settings: Settings) -> results.Results:
    """The read model of the API's tracking store."""
    return _reader(settings.tracking_uri)


def ask(fn: Callable[..., T], *args, **kwargs) -> T:
    """A read-model call with the API's errors: a store that does not answer is 503."""
    try:
        return fn(*args, **kwargs)
    except results.StoreUnavailable as exc:
        raise ApiError(503, "mlflow_unavailable", str(exc)[:400]) from None


# children of finished runs change no more: a short-lived cache spares the store a search per GET
_FINISHED_TTL_S = 10.0
_finished: dict[str, tuple[float, list[results.Run]]] = {}


def children(settings: Settings, rec: RunRecord) -> list[results.Run]:
    """The child runs (one per phase of a method and seed) of the run's parent; [] before it exists."""
    if not rec.parent_run_id or not rec.experiment_id:
        return []
    hit = _finished.get(rec.parent_run_id) if rec.terminal else None
    if hit is not None and time.monotonic() - hit[0] < _FINISHED_TTL_S:
        return hit[1]
    runs = ask(reader(settings).children, rec.parent_run_id, rec.experiment_id)
    if rec.terminal:
        if len(_finished) > 1000:
            _finished.clear()
        _finished[rec.parent_run_id] = (time.monotonic(), runs)
    return runs


def progress(rec: RunRecord, runs: list[results.Run]) -> Progress:
    statuses = [r.status for r in runs]
    total = max(results.expected_phases(rec.spec), len(runs))
    finished = statuses.count("FINISHED")
    if rec.status == "succeeded":
        finished = total if not runs else finished
    return Progress(total=total, finished=finished, failed=statuses.count("FAILED"),
                    running=statuses.count("RUNNING"), fraction=min(1.0, finished / total) if total else 0.0)


def _metrics_of(run: results.Run) -> RunMetrics:
    return RunMetrics(run_id=run.run_id, name=run.name, phase=run.phase, method=run.method, seed=run.seed,
                      status=run.status, metrics=dict(run.metrics))


def metrics(settings: Settings, rec: RunRecord) -> tuple[Optional[RunMetrics], list[RunMetrics]]:
    runs = children(settings, rec)
    # a parent deleted by hand: its children still answer
    parent = ask(reader(settings).run, rec.parent_run_id) if rec.parent_run_id else None
    return (_metrics_of(parent) if parent else None), [_metrics_of(r) for r in runs]


def genotypes(settings: Settings, rec: RunRecord) -> list[GenotypeItem]:
    if not rec.parent_run_id or not rec.experiment_id:
        return []
    found = ask(reader(settings).genotypes, rec.parent_run_id, rec.experiment_id)
    return [GenotypeItem(method=g.method, seed=g.seed, run_id=g.run_id, genotype=g.genotype, fold=g.fold,
                         variant=g.variant) for g in found]


def table(settings: Settings, rec: RunRecord):
    """Table 2 (``results.table2``: pandas, long form, DSC %) of the parent's finished retrains; None when
    there are none."""
    if not rec.parent_run_id or not rec.experiment_id:
        return None
    records = ask(reader(settings).records, rec.parent_run_id, rec.experiment_id)
    if not records:
        return None
    return results.table2(records, results.std_of(rec.spec))


def trained(settings: Settings, rec: RunRecord) -> list[results.Run]:
    """The run's finished retrains (whose checkpoints a prediction can use)."""
    return [r for r in children(settings, rec) if r.phase == "train" and r.status == "FINISHED"]


def checkpoint(settings: Settings, run_id: str, cache: Path) -> Path:
    """The .pt file a retrain logged, downloaded once into ``cache``: 404 when there is none."""
    found = sorted(cache.rglob("*.pt")) if cache.is_dir() else []
    if found:
        return found[0]
    try:
        return ask(reader(settings).checkpoint, run_id, cache)
    except results.NotFound as exc:
        raise ApiError(404, "model_not_found", f"model: {exc}") from None
