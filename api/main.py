"""App factory: ``create_app(settings)`` -> the FastAPI app (``nas-scam serve`` runs it with uvicorn).

Routes: unversioned /healthz and /readyz; everything else under /v1 behind the X-API-Key check.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import TypeAdapter

from api.deps import require_api_key
from api.errors import BodyLimitMiddleware, install_handlers
from api.inference import Inference
from api.routers import experiments, health, predict, runs
from api.schemas import SPEC_EXAMPLES
from api.service import RunService
from orchestrator.cli import version as package_version
from orchestrator.settings import Settings, get_settings
from orchestrator.specs import AnySpec

DESCRIPTION = """Launch NAS-SCAM searches, retrains, Table 2 ablations and HPO as Ray jobs; follow them;
read their metrics, genotypes and Table 2; segment images with a trained model.

Every `/v1` route needs the `X-API-Key` header (keys from `NAS_SCAM_API_KEYS`). Errors always have the
shape `{"error": {"code", "message", "details"}}`: 401 bad key, 403 a path outside the data roots,
404 unknown, 409 wrong state, 413 too large, 422 invalid (the message names the field), 429 too many
active runs or predictions, 503 Ray or MLflow unreachable or a prediction past its time limit."""


DOCS_STATIC = "/docs-static"


def _offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from files shipped in the fastapi-offline wheel, never a CDN."""
    import fastapi_offline

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOCS_STATIC, StaticFiles(directory=static), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        # with_google_fonts=False: the page must not reach out for fonts either
        return get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png", with_google_fonts=False)


def create_app(settings: Optional[Settings] = None, service: Optional[RunService] = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        app.state.inference.stop()

    app = FastAPI(title="nas-scam API", version=package_version(), description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  openapi_tags=[{"name": "runs", "description": "run specs as Ray jobs"},
                                {"name": "experiments"}, {"name": "predict"}, {"name": "health"}])
    _offline_docs(app)
    app.state.settings = settings
    app.state.run_service = service or RunService(settings)
    app.state.inference = Inference(settings.api_max_predictions, settings.api_predict_timeout_s)
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api_max_body_bytes)
    app.include_router(health.router)
    secured = [Depends(require_api_key)]
    for module in (runs, experiments, predict):
        app.include_router(module.router, prefix="/v1", dependencies=secured)

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                             tags=app.openapi_tags)
        # POST /runs reads the raw body (to answer every malformed spec with 422, never 500); its schema
        # is the orchestrator's spec union, added here with its examples
        spec_schema = TypeAdapter(AnySpec).json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec_schema.pop("$defs", {}))
        components["Spec"] = spec_schema
        body = schema["paths"]["/v1/runs"]["post"]["requestBody"]["content"]["application/json"]
        body["examples"] = SPEC_EXAMPLES
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app
