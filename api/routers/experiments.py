"""GET /v1/experiments: the experiments (MLflow experiment = spec name) of the API's runs and of every other
parent run in its tracking store, per kind, with their run counts."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter

from api.deps import RunServiceDep
from api.schemas import ExperimentList, ExperimentOut

router = APIRouter(tags=["experiments"])


@router.get("/experiments", response_model=ExperimentList, summary="experiments with their run counts")
def list_experiments(service: RunServiceDep) -> ExperimentList:
    items = [ExperimentOut(name=row["experiment"], kind=row["kind"], runs=row["runs"],
                           last_created=datetime.fromtimestamp(row["last_created"], tz=timezone.utc))
             for row in service.experiments()]
    return ExperimentList(items=items)
