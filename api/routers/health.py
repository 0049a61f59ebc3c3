"""Unversioned probes, no API key: /healthz (process up) and /readyz (Ray job API and MLflow answer).

Without a key /readyz says only ready or unavailable; a valid X-API-Key adds each check's reason
(addresses and error text are for operators, not for whoever can reach the port).
"""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import APIRouter, Security
from fastapi.responses import JSONResponse

from api.deps import RunServiceDep, SettingsDep, api_key_header, key_matches
from api.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="the process is up")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, summary="Ray and MLflow are reachable",
            responses={503: {"model": ReadyOut, "description": "Ray or MLflow unreachable"}})
def readyz(settings: SettingsDep, service: RunServiceDep,
           key: Annotated[Optional[str], Security(api_key_header)] = None):
    from api.results import reader

    checks: dict[str, str] = {}
    try:
        service.ping()
        checks["ray"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the probe reports, never raises
        checks["ray"] = f"unavailable: {str(exc)[:200]}"
    try:
        reader(settings).ping()
        checks["mlflow"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["mlflow"] = f"unavailable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    trusted = bool(key and settings.api_keys and key_matches(key, settings.api_keys))
    body = ReadyOut(status="ready" if ready else "unavailable", checks=checks if trusted else None)
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump(exclude_none=True))
