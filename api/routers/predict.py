"""POST /v1/predict: one uploaded image through a trained model -> GeoJSON nuclei or a PNG label mask.

The model is a run id as GET /v1/runs lists it (an API run, or a parent run found in the tracking store:
its first finished retrain's logged checkpoint), the MLflow run id of a retrain, or a checkpoint file
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
from api.schemas import error_responses
from api.service import RunService
from api.validation import check_path
from orchestrator.settings import Settings

router = APIRouter(tags=["predict"])
_MLFLOW_ID = re.compile(r"^[0-9a-f]{32}$")

_BODY = {"requestBody": {"required": True, "description": "the image file itself (PNG, JPEG or TIFF, RGB)",
                         "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                     for t in ("image/png", "image/jpeg", "image/tiff", "application/octet-stream")}}}


def resolve_checkpoint(model: Optional[str], checkpoint: Optional[str], settings: Settings,
                       service: RunService) -> Path:
    """The .pt file to load: a checkpoint under a data root, or the one a run's retrain logged."""
    if (model is None) == (checkpoint is None):
        raise ApiError(422, "validation_error", "give exactly one of model (run id) and checkpoint (path)",
                       [{"field": "model", "message": "exactly one of model, checkpoint"}])
    if checkpoint is not None:
        check_path("checkpoint", checkpoint, settings)
        return Path(checkpoint).resolve()
    try:
        rec = service.get(model, refresh=False)
    except RunNotFound:
        rec = None
    if rec is not None:
        service.find_parent(rec)
        runs = results.trained(settings, rec)
        if not runs:
            raise ApiError(409, "not_ready", f"model: run {model} has no finished train phase")
        run_id = runs[0].run_id
    elif _MLFLOW_ID.match(model):
        run_id = model  # a retrain's own run
    else:
        raise ApiError(404, "model_not_found", f"model: no API run or MLflow run {model!r}")
    return results.checkpoint(settings, run_id, settings.api_home / "models" / run_id)


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
                        **error_responses(403, 404, 409, 413, 429, 503)})
async def predict(request: Request, settings: SettingsDep, service: RunServiceDep,
                  model: Annotated[Optional[str], Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                                        description="run id (as GET /v1/runs lists it) or a "
                                                                    "retrain's MLflow run id")] = None,
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
