"""What a run produced, read from MLflow (through orchestrator.tracking) and rendered by orchestrator.tables."""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from api.errors import ApiError
from api.schemas import GenotypeItem, Progress, RunMetrics
from api.store import RunRecord
from orchestrator import tracking
from orchestrator.settings import Settings
from orchestrator.specs import METHODS, PAPER_METHODS


def _client(settings: Settings):
    try:
        return tracking.client(settings.tracking_uri)
    except Exception as exc:  # noqa: BLE001
        raise ApiError(503, "mlflow_unavailable", f"MLflow store unavailable: {str(exc)[:300]}") from None


# children of finished runs change no more: a short-lived cache spares the store a search per GET
_FINISHED_TTL_S = 10.0
_finished: dict[str, tuple[float, list]] = {}


def children(settings: Settings, rec: RunRecord) -> list:
    """The MLflow child runs (one per phase of a method and seed) of the run's parent; [] before it exists."""
    if not rec.parent_run_id or not rec.experiment_id:
        return []
    hit = _finished.get(rec.parent_run_id) if rec.terminal else None
    if hit is not None and time.monotonic() - hit[0] < _FINISHED_TTL_S:
        return hit[1]
    try:
        runs = tracking.Tracker(_client(settings), rec.experiment_id, rec.parent_run_id).children()
        if rec.terminal:
            if len(_finished) > 1000:
                _finished.clear()
            _finished[rec.parent_run_id] = (time.monotonic(), runs)
        return runs
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ApiError(503, "mlflow_unavailable", f"MLflow query failed: {str(exc)[:300]}") from None


@functools.lru_cache(maxsize=64)
def _planned_runs(spec_json: str) -> int:
    from orchestrator import plan
    from orchestrator.specs import parse_spec

    return sum(len(t.runs) for t in plan.expand(parse_spec(json.loads(spec_json)), Path(".")))


def expected_phases(spec: dict[str, Any]) -> int:
    """Engine runs (phases) the spec makes: an ablation's from its plan (searches shared between axes
    variants counted once, folds and random draws included); the count below only for a stored spec
    that no longer parses."""
    kind = spec.get("kind")
    if kind == "ablation":
        try:
            return _planned_runs(json.dumps(spec, sort_keys=True))
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


def progress(rec: RunRecord, runs: list) -> Progress:
    statuses = [r.info.status for r in runs]
    total = max(expected_phases(rec.spec), len(runs))
    finished = statuses.count("FINISHED")
    if rec.status == "succeeded":
        finished = total if not runs else finished
    return Progress(total=total, finished=finished, failed=statuses.count("FAILED"),
                    running=statuses.count("RUNNING"), fraction=min(1.0, finished / total) if total else 0.0)


def _metrics_of(run) -> RunMetrics:
    tags = run.data.tags
    seed = tags.get(tracking.T_SEED)
    return RunMetrics(run_id=run.info.run_id, name=run.info.run_name, phase=tags.get(tracking.T_PHASE),
                      method=tags.get(tracking.T_METHOD), seed=int(seed) if seed and seed.isdigit() else None,
                      status=run.info.status, metrics={k: float(v) for k, v in run.data.metrics.items()})


def metrics(settings: Settings, rec: RunRecord) -> tuple[Optional[RunMetrics], list[RunMetrics]]:
    runs = children(settings, rec)
    parent = None
    if rec.parent_run_id:
        try:
            parent = _metrics_of(_client(settings).get_run(rec.parent_run_id))
        except ApiError:
            raise
        except Exception:  # noqa: BLE001 - a parent deleted by hand: children still answer
            parent = None
    return parent, [_metrics_of(r) for r in runs]


def genotypes(settings: Settings, rec: RunRecord) -> list[GenotypeItem]:
    c = _client(settings)
    items = []
    for run in children(settings, rec):
        if run.data.tags.get(tracking.T_PHASE) != "search" or run.info.status != "FINISHED":
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = c.download_artifacts(run.info.run_id, "genotype.json", tmp)
                geno = json.loads(Path(path).read_text())
            except Exception:  # noqa: BLE001 - fall back to the param the search logged
                raw = run.data.params.get("genotype")
                if not raw:
                    continue
                geno = json.loads(raw)
        items.append(GenotypeItem(method=run.data.tags.get(tracking.T_METHOD, "?"),
                                  seed=int(run.data.tags.get(tracking.T_SEED, 0)), run_id=run.info.run_id,
                                  genotype=geno))
    return items


def table(settings: Settings, rec: RunRecord):
    """Table 2 (pandas, long form, DSC %) from the parent's FINISHED train runs; None when there are none."""
    from orchestrator import tables

    if not rec.parent_run_id:
        return None
    try:
        records = tracking.Tracker(_client(settings), rec.experiment_id, rec.parent_run_id).collect_records()
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ApiError(503, "mlflow_unavailable", f"MLflow query failed: {str(exc)[:300]}") from None
    if not records:
        return None
    # a spec stored before the std field existed was summarised with the sample std
    return tables.compare(tables.summarize(records, rec.spec.get("std", "sample")))
