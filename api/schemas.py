"""Typed responses of the API (requests are the orchestrator's specs, shared through orchestrator.specs)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from api.store import STATUSES, RunRecord

RunStatus = Literal[STATUSES]  # type: ignore[valid-type]
RunKind = Literal["search", "train", "pipeline", "ablation", "hpo"]
# "api": launched through this API (a Ray job, logs, cancel, resume); "tracking": a parent run found in the
# tracking store that the API did not launch (the CLI's, another API's): read-only
RunOrigin = Literal["api", "tracking"]

SMOKE_SPEC = {"kind": "ablation", "name": "smoke", "preset": "smoke", "methods": ["unet"], "seeds": 1,
              "resources": {"cpu": 1, "gpu": 0}}
SPEC_EXAMPLES = {
    "smoke": {"summary": "smoke ablation (CPU minutes, synthetic data)", "value": SMOKE_SPEC},
    "table2": {"summary": "Table 2: 8 methods x 3 seeds, paper protocol, MoNuSAC",
               "value": {"kind": "ablation", "name": "table2", "protocol": "paper", "seeds": 3,
                         "data": {"source": "/data/monusac"}, "resources": {"cpu": 4, "gpu": 0.5}}},
    "search": {"summary": "one NAS-SCAM-P synchronous search",
               "value": {"kind": "search", "name": "search-p", "method": "nas-scam-p-sync", "seed": 0,
                         "preset": "smoke"}},
    "hpo": {"summary": "Optuna + ASHA over the U-Net's learning rate",
            "value": {"kind": "hpo", "name": "hpo-unet", "method": "unet", "preset": "smoke", "num_samples": 4,
                      "space": {"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2}}}},
}


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    field: Optional[str] = None
    message: str


class ErrorBody(_Out):
    code: str = Field(examples=["validation_error"])
    message: str = Field(examples=["methods.0: unknown method 'unet2'; valid methods: unet, ..."])
    details: list[dict[str, Any]] = Field(default_factory=list)


class ErrorOut(_Out):
    error: ErrorBody


_ERROR_TEXT = {401: "missing or invalid X-API-Key", 403: "a path outside the data roots",
               404: "unknown run or nothing there", 409: "the run is not in a state for this",
               413: "request body too large", 422: "invalid spec or parameter (the message names the field)",
               429: "too many active runs", 503: "Ray or MLflow unreachable"}


def error_responses(*codes: int) -> dict[int, dict[str, Any]]:
    """A route's documented error answers: 401 and 422 always, and ``codes``."""
    return {c: {"model": ErrorOut, "description": _ERROR_TEXT[c]} for c in (401, 422, *codes)}


class Links(_Out):
    self: str
    logs: str
    cancel: str
    resume: str
    metrics: str
    genotype: str
    table: str


class MlflowIds(_Out):
    tracking_uri: str
    experiment_id: Optional[str] = None
    parent_run_id: Optional[str] = None
    child_run_ids: list[str] = Field(default_factory=list)


class Progress(_Out):
    """Phases (search or train runs) of the spec: finished / expected."""

    total: int
    finished: int
    failed: int
    running: int
    fraction: float = Field(ge=0, le=1)


class RunCreated(_Out):
    id: str = Field(examples=["3f2c9a1b7e4d5c60"])
    status: RunStatus
    ray_job_id: str = Field(examples=["nas-scam-3f2c9a1b7e4d5c60"])
    links: Links


class RunOut(_Out):
    id: str = Field(description="the API's run id, or the MLflow parent run id of a run it did not launch")
    origin: RunOrigin = "api"
    kind: RunKind
    experiment: str
    status: RunStatus
    message: str = ""
    created_at: datetime
    started_at: Optional[datetime] = None
    ended_at: Optional[datetime] = None
    ray_job_id: Optional[str] = Field(None, description="null for a run the API did not launch")
    mlflow: MlflowIds
    progress: Optional[Progress] = None
    spec: dict[str, Any]
    links: Links


class RunList(_Out):
    items: list[RunOut]
    total: int
    limit: int
    offset: int
    next: Optional[str] = None


class LogsOut(_Out):
    id: str
    status: RunStatus
    logs: str
    truncated: bool


class RunMetrics(_Out):
    run_id: str
    name: Optional[str] = None
    phase: Optional[str] = None
    method: Optional[str] = None
    seed: Optional[int] = None
    status: str
    metrics: dict[str, float]


class MetricsOut(_Out):
    id: str
    status: RunStatus
    parent: Optional[RunMetrics] = None
    runs: list[RunMetrics]


class GenotypeItem(_Out):
    method: str
    seed: int
    run_id: str
    genotype: dict[str, Any]
    fold: Optional[int] = Field(None, description="the patient fold the search ran on (a grid with data.folds)")
    variant: str = Field("", description="the axes variant label (a grid with axes), empty without axes")


class GenotypeOut(_Out):
    id: str
    status: RunStatus
    genotypes: list[GenotypeItem]


class TableOut(_Out):
    id: str
    status: RunStatus
    note: str
    columns: list[str]
    rows: list[dict[str, Any]]


class ExperimentOut(_Out):
    name: str
    kind: RunKind
    runs: int
    last_created: datetime


class ExperimentList(_Out):
    items: list[ExperimentOut]


class HealthOut(_Out):
    status: Literal["ok"]


class ReadyOut(_Out):
    status: Literal["ready", "unavailable"]
    checks: Optional[dict[str, str]] = Field(None, description="each check's result; only with a valid X-API-Key")


def _ts(value: Optional[float]) -> Optional[datetime]:
    return datetime.fromtimestamp(value, tz=timezone.utc) if value else None


def links(run_id: str) -> Links:
    base = f"/v1/runs/{run_id}"
    return Links(self=base, logs=f"{base}/logs", cancel=f"{base}/cancel", resume=f"{base}/resume", metrics=f"{base}/metrics",
                 genotype=f"{base}/genotype", table=f"{base}/table?format=json")


def run_out(rec: RunRecord, tracking_uri: str, children: list[str] = (), progress: Optional[Progress] = None) -> RunOut:
    return RunOut(id=rec.id, origin=rec.extra.get("origin", "api"), kind=rec.kind, experiment=rec.experiment,
                  status=rec.status, message=rec.message,
                  created_at=_ts(rec.created_at), started_at=_ts(rec.started_at), ended_at=_ts(rec.ended_at),
                  ray_job_id=rec.submission_id or None,
                  mlflow=MlflowIds(tracking_uri=_redact(tracking_uri), experiment_id=rec.experiment_id,
                                   parent_run_id=rec.parent_run_id, child_run_ids=list(children)),
                  progress=progress, spec=rec.spec, links=links(rec.id))


def _redact(uri: str) -> str:
    # a database URI may carry a password (postgresql://user:pw@host/db)
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri
