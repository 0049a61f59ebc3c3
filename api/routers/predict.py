"""POST /v1/predict: one uploaded image through a trained model -> GeoJSON nuclei or a PNG label mask.

The model is an API run id or MLflow run id (its train phase's logged checkpoint) or a checkpoint file
under a data root. Inference runs in the API's inference process (api.inference), one image at a time,
bounded in bytes, pixels (read from the header before decoding), requests at once and time; training
never runs here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from api import results
from api.deps import RunServiceDep, SettingsDep
from api.errors import ApiError, RunNotFound
from api.images import decode_image
from api.inference import Inference
from api.routers.runs import _errors
from api.service import RunService
from api.validation import check_path
from orchestrator.settings import Settings

router = APIRouter(tags=["predict"])
_MLFLOW_ID = re.compile(r"^[0-9a-f]{32}$")

_BODY = {"requestBody": {"required": True, "description": "the image file itself (PNG, JPEG or TIFF, RGB)",
                         "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                     for t in ("image/png", "image/jpeg", "image/tiff", "application/octet-stream")}}}


def _train_runs(settings: Settings, rec) -> list:
    return [r for r in results.children(settings, rec)
            if r.data.tags.get("phase") == "train" and r.info.status == "FINISHED"]


def resolve_checkpoint(model: Optional[str], checkpoint: Optional[str], settings: Settings,
                       service: RunService) -> Path:
    """The .pt file to load: a checkpoint under a data root, or the one an API/MLflow run logged."""
    if (model is None) == (checkpoint is None):
        raise ApiError(422, "validation_error", "give exactly one of model (run id) and checkpoint (path)",
                       [{"field": "model", "message": "exactly one of model, checkpoint"}])
    if checkpoint is not None:
        check_path("checkpoint", checkpoint, settings)
        return Path(checkpoint).resolve()
    mlflow_id = model
    if not _MLFLOW_ID.match(model):
        try:
            rec = service.get(model, refresh=False)
        except RunNotFound:
            raise ApiError(404, "model_not_found", f"model: no API run or MLflow run {model!r}") from None
        service.find_parent(rec)
        runs = _train_runs(settings, rec)
        if not runs:
            raise ApiError(409, "not_ready", f"model: run {model} has no finished train phase")
        mlflow_id = runs[0].info.run_id
    cache = settings.api_home / "models" / mlflow_id
    found = sorted(cache.rglob("*.pt")) if cache.is_dir() else []
    if not found:
        c = results._client(settings)
        try:
            c.get_run(mlflow_id)
        except Exception:  # noqa: BLE001
            raise ApiError(404, "model_not_found", f"model: no API run or MLflow run {model!r}") from None
        cache.mkdir(parents=True, exist_ok=True)
        try:
            c.download_artifacts(mlflow_id, "checkpoint", str(cache))
        except Exception:  # noqa: BLE001
            raise ApiError(404, "model_not_found", f"model: MLflow run {mlflow_id} logged no checkpoint "
                                                   f"(a train phase logs checkpoint/*.pt)") from None
        found = sorted(cache.rglob("*.pt"))
        if not found:
            raise ApiError(404, "model_not_found", f"model: MLflow run {mlflow_id} logged no checkpoint")
    return found[0]


def _respond(path: Path, image, labels, fmt: str):
    import cv2

    from nas_core.engine.predict import to_geojson

    if fmt == "png":
        ok, buf = cv2.imencode(".png", labels)
        return Response(buf.tobytes(), media_type="image/png")
    geo = to_geojson(labels)
    geo["properties"] = {"width": int(image.shape[1]), "height": int(image.shape[0]), "checkpoint": path.name}
    return JSONResponse(geo, media_type="application/geo+json")


@router.post("/predict", summary="segment one image: GeoJSON nuclei or a PNG label mask (class ids 0..4)",
             openapi_extra=_BODY,
             responses={200: {"description": "GeoJSON FeatureCollection (format=geojson) or PNG (format=png)",
                              "content": {"application/geo+json": {"schema": {"type": "object"}},
                                          "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                        **_errors(403, 404, 409, 413, 429, 503)})
async def predict(request: Request, settings: SettingsDep, service: RunServiceDep,
                  model: Annotated[Optional[str], Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                                        description="API run id or MLflow run id")] = None,
                  checkpoint: Annotated[Optional[str], Query(max_length=4096,
                                                             description="a .pt file under a data root")] = None,
                  format: Literal["geojson", "png"] = "geojson"):
    inference: Inference = request.app.state.inference
    inference.admit()  # before the body is read: at most api_max_predictions bodies in memory
    try:
        deadline = inference.deadline()
        raw = await request.body()
        path = await run_in_threadpool(resolve_checkpoint, model, checkpoint, settings, service)
        image = await run_in_threadpool(decode_image, raw, settings.api_max_image_pixels)
        if min(image.shape[:2]) < 16:
            raise ApiError(422, "bad_image", "image: both sides must be at least 16 pixels")
        labels = await run_in_threadpool(inference.labels, path, image, deadline)
        return await run_in_threadpool(_respond, path, image, labels, format)
    finally:
        inference.release()
