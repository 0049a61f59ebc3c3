"""/v1/runs: launch a spec as a Ray job, list and follow runs, read what they produced.

A spec is validated by api.validation (the orchestrator's pydantic models, then every trial config it
expands into): its paths must lie under the data roots (403 otherwise) and its sizes within the server's
bounds (422), before anything reaches Ray. A lost, failed or cancelled run can be resumed.

The list and the reading routes also cover the parent runs the tracking store holds that this API did not
launch (``origin: tracking``, the MLflow parent run id as their id; ``api.service``): they can be read,
not followed in Ray, cancelled or resumed.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Path as PathParam, Query, Request, Response
from fastapi.responses import PlainTextResponse

from api import results
from api.deps import RunServiceDep, SettingsDep
from api.errors import ApiError
from api.schemas import (GenotypeOut, LogsOut, MetricsOut, RunCreated, RunKind, RunList, RunOut, RunStatus,
                         TableOut, error_responses, links, run_out)
from api.validation import parse_body
from orchestrator.progress import strip_ansi

router = APIRouter(prefix="/runs", tags=["runs"])

RunId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                 description="the run id POST /runs returned, or the MLflow parent run id GET /runs "
                                             "lists for a run the API did not launch",
                                 examples=["3f2c9a1b7e4d5c60"])]


_SPEC_BODY = {"requestBody": {"required": True, "description": "a run spec (orchestrator.specs): kind "
                              "search | train | pipeline | ablation | hpo; unknown keys are errors",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Spec"},
                                                               "examples": "__SPEC_EXAMPLES__"}}}}


@router.post("", status_code=202, response_model=RunCreated, summary="launch a run spec as a Ray job",
             openapi_extra=_SPEC_BODY, responses=error_responses(403, 413, 429, 503))
async def create_run(request: Request, response: Response, settings: SettingsDep, service: RunServiceDep) -> RunCreated:
    from starlette.concurrency import run_in_threadpool

    # off the event loop: building a spec's configs takes a while (HPO spaces, many methods), and
    # /healthz and the other requests must keep answering meanwhile
    spec = await run_in_threadpool(parse_body, await request.body(), settings)
    rec = await run_in_threadpool(service.submit, spec)
    response.headers["Location"] = f"/v1/runs/{rec.id}"
    return RunCreated(id=rec.id, status=rec.status, ray_job_id=rec.submission_id, links=links(rec.id))


@router.get("", response_model=RunList, summary="runs, newest first (filter by kind, status, experiment)",
            responses=error_responses())
def list_runs(settings: SettingsDep, service: RunServiceDep, kind: Optional[RunKind] = None,
              status: Optional[RunStatus] = None,
              experiment: Annotated[Optional[str], Query(max_length=200)] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> RunList:
    recs, total = service.list(kind=kind, status=status, experiment=experiment, limit=limit, offset=offset)
    items = [run_out(r, settings.tracking_uri) for r in recs]
    nxt = None
    if offset + len(items) < total:
        query = {"limit": limit, "offset": offset + limit,
                 **{k: v for k, v in (("kind", kind), ("status", status), ("experiment", experiment)) if v}}
        nxt = f"/v1/runs?{urlencode(query)}"
    return RunList(items=items, total=total, limit=limit, offset=offset, next=nxt)


@router.get("/{run_id}", response_model=RunOut, summary="status, progress, Ray job id and MLflow run ids",
            responses=error_responses(404))
def get_run(run_id: RunId, settings: SettingsDep, service: RunServiceDep) -> RunOut:
    rec = service.get(run_id)
    runs = results.children(settings, rec)
    return run_out(rec, settings.tracking_uri, [r.run_id for r in runs], results.progress(rec, runs))


@router.get("/{run_id}/logs", response_model=LogsOut, summary="the Ray job's driver log (tail)",
            responses=error_responses(404, 503))
def get_logs(run_id: RunId, service: RunServiceDep,
             tail: Annotated[int, Query(ge=1, le=10 * 2**20, description="last characters")] = 65536) -> LogsOut:
    rec = service.get(run_id)
    # served for machines and scripts: no ANSI colours, tqdm's \r-rewritten lines reduced to their last state
    text = strip_ansi(service.logs(run_id, tail=0))
    return LogsOut(id=rec.id, status=rec.status, logs=text[-tail:], truncated=len(text) > tail)


@router.post("/{run_id}/cancel", response_model=RunOut, summary="stop the run's Ray job",
             responses=error_responses(404, 409, 503))
def cancel_run(run_id: RunId, settings: SettingsDep, service: RunServiceDep) -> RunOut:
    rec = service.cancel(run_id)
    return run_out(rec, settings.tracking_uri)


@router.post("/{run_id}/resume", status_code=202, response_model=RunOut,
             summary="submit a lost, failed or cancelled run again; finished phases are not re-run",
             responses=error_responses(404, 409, 429, 503))
def resume_run(run_id: RunId, settings: SettingsDep, service: RunServiceDep) -> RunOut:
    rec = service.resume(run_id)
    return run_out(rec, settings.tracking_uri)


@router.get("/{run_id}/metrics", response_model=MetricsOut, summary="latest metrics of the parent and each phase run",
            responses=error_responses(404, 503))
def get_metrics(run_id: RunId, settings: SettingsDep, service: RunServiceDep) -> MetricsOut:
    rec = service.get(run_id)
    parent, runs = results.metrics(settings, rec)
    return MetricsOut(id=rec.id, status=rec.status, parent=parent, runs=runs)


@router.get("/{run_id}/genotype", response_model=GenotypeOut, summary="genotypes of the finished searches",
            responses=error_responses(404, 409, 503))
def get_genotype(run_id: RunId, settings: SettingsDep, service: RunServiceDep) -> GenotypeOut:
    rec = service.get(run_id)
    items = results.genotypes(settings, rec)
    if not items:
        if not rec.terminal:
            raise ApiError(409, "not_ready", f"run {run_id} is {rec.status}: no search has finished yet")
        raise ApiError(404, "no_genotype", f"run {run_id} ({rec.status}) has no finished search phase")
    return GenotypeOut(id=rec.id, status=rec.status, genotypes=items)


@router.get("/{run_id}/table", summary="Table 2 of the finished train runs (json, csv or markdown)",
            responses={200: {"model": TableOut, "content": {"text/csv": {"schema": {"type": "string"}},
                                                            "text/markdown": {"schema": {"type": "string"}}}},
                       **error_responses(404, 409, 503)})
def get_table(run_id: RunId, settings: SettingsDep, service: RunServiceDep,
              format: Literal["json", "csv", "md"] = "json"):
    from orchestrator import tables
    from orchestrator.results import std_of

    rec = service.get(run_id)
    df = results.table(settings, rec)
    if df is None:
        if not rec.terminal:
            raise ApiError(409, "not_ready", f"run {run_id} is {rec.status}: no train run has finished yet")
        raise ApiError(404, "no_table", f"run {run_id} ({rec.status}) has no finished train run")
    title = f"Table 2 ({rec.experiment}, run {rec.id})"
    # what the "+-" is: the std the spec asked for (specs from before the option printed the sample std)
    std, repeat = std_of(rec.spec), rec.spec.get("repeat")
    if format == "csv":
        return PlainTextResponse(df.to_csv(index=False, float_format="%.4f"), media_type="text/csv")
    if format == "md":
        return PlainTextResponse(tables.to_markdown(df, title, std, repeat), media_type="text/markdown")
    rows = json.loads(df.to_json(orient="records"))  # NaN (std of one seed) -> null, numpy -> JSON
    return TableOut(id=rec.id, status=rec.status, note=tables.note(std, repeat), columns=list(df.columns), rows=rows)
