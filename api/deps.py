"""Annotated dependencies: the one Settings, the run service, and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated, Optional

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from api.errors import ApiError
from api.service import RunService
from orchestrator.settings import Settings

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="one of the keys in NAS_SCAM_API_KEYS (comma-separated)")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_run_service(request: Request) -> RunService:
    return request.app.state.run_service


SettingsDep = Annotated[Settings, Depends(get_settings)]
RunServiceDep = Annotated[RunService, Depends(get_run_service)]


def key_matches(given: str, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit, no key in any message)."""
    given_b = given.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_b, key.encode())
    return ok


def require_api_key(settings: SettingsDep, key: Annotated[Optional[str], Security(api_key_header)] = None) -> None:
    if not key or not settings.api_keys or not key_matches(key, settings.api_keys):
        raise ApiError(401, "unauthorized", "missing or invalid X-API-Key header",
                       headers={"WWW-Authenticate": "APIKey"})
