"""One JSON error shape for every failure: ``{"error": {"code", "message", "details"}}``; never a stack trace.

Status codes: 401 missing/wrong API key, 403 a path outside the data roots, 404 unknown run/resource,
409 wrong state (cancel a finished run, a table before any train run finished), 413 body or image too
large, 422 invalid spec or parameter (the message names the field), 429 too many active runs or
predictions, 503 Ray or MLflow unreachable or a prediction past its time limit, 500 anything else
(details only in the server log).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("nas_scam.api")


class RunError(ValueError):
    """Base of the run service's user-facing errors; ``code`` is the error code, the class picks the status."""

    code = "run_error"


class RunNotFound(RunError):
    code = "run_not_found"


class RunConflict(RunError):
    code = "conflict"


class TooManyRuns(RunError):
    code = "too_many_runs"


class ClusterUnavailable(RunError):
    code = "cluster_unavailable"


_RUN_STATUS = {RunNotFound: 404, RunConflict: 409, TooManyRuns: 429, ClusterUnavailable: 503}
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 429: "too_many_runs",
               503: "unavailable"}


class ApiError(Exception):
    """Raised by routes and services; rendered as the error shape with ``status``."""

    def __init__(self, status: int, code: str, message: str, details: Optional[list[dict[str, Any]]] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def error_body(code: str, message: str, details: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or []}}


def field_name(loc: tuple | list) -> str:
    """``("body", "ablation", "methods", 0)`` -> ``methods.0`` (no transport prefix, no union tag)."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "(body)"


def _json(status: int, body: dict, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=body, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _json(exc.status, error_body(exc.code, exc.message, exc.details), exc.headers)


async def _run_error(request: Request, exc: RunError) -> JSONResponse:
    status = next((s for cls, s in _RUN_STATUS.items() if isinstance(exc, cls)), 400)
    return _json(status, error_body(exc.code, str(exc)))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = [{"field": field_name(e.get("loc", ())), "message": e.get("msg", "invalid")} for e in exc.errors()]
    message = "; ".join(f"{d['field']}: {d['message']}" for d in details) or "invalid request"
    return _json(422, error_body("validation_error", message, details))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    return _json(exc.status_code, error_body(code, message), getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _json(500, error_body("internal_error", "internal server error; the server log has the details"))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RunError, _run_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (413): by Content-Length up front, else while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = error_body("payload_too_large", f"request body over the limit of {self.max_bytes} bytes "
                                                  f"(NAS_SCAM_API_MAX_BODY_BYTES)")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0 or declared > self.max_bytes:
                status, body = (413, too_big) if declared > 0 else (
                    400, error_body("bad_request", "invalid Content-Length header"))
                return await JSONResponse(status_code=status, content=body)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, "payload_too_large", too_big["error"]["message"])
            return message

        return await self.app(scope, limited, send)
