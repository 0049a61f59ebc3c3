"""POST /v1/predict: one uploaded image through a trained model -> GeoJSON nuclei or a PNG label mask.

The model is an API run id or MLflow run id (its train phase's logged checkpoint) or a checkpoint file
under a data root. Inference runs in this process, one image at a time, bounded in bytes and pixels;
training never does.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from api import results
from api.deps import LauncherDep, SettingsDep
from api.errors import ApiError
from api.routers.runs import _errors
from api.validation import check_path
from orchestrator.launcher import Launcher, RunNotFound
from orchestrator.settings import Settings

router = APIRouter(tags=["predict"])
_MLFLOW_ID = re.compile(r"^[0-9a-f]{32}$")
_LOCK = threading.Lock()  # one inference at a time: the API shares its cores with Ray
_MODELS: "OrderedDict[str, tuple]" = OrderedDict()

_BODY = {"requestBody": {"required": True, "description": "the image file itself (PNG, JPEG or TIFF, RGB)",
                         "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                     for t in ("image/png", "image/jpeg", "image/tiff", "application/octet-stream")}}}


def _train_runs(settings: Settings, rec) -> list:
    return [r for r in results.children(settings, rec)
            if r.data.tags.get("phase") == "train" and r.info.status == "FINISHED"]


def resolve_checkpoint(model: Optional[str], checkpoint: Optional[str], settings: Settings,
                       launcher: Launcher) -> Path:
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
            rec = launcher.get(model, refresh=False)
        except RunNotFound:
            raise ApiError(404, "model_not_found", f"model: no API run or MLflow run {model!r}") from None
        launcher.find_parent(rec)
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


def _load(path: Path):
    from nas_core.engine.checkpoint import load_checkpoint

    key = str(path)
    if key not in _MODELS:
        try:
            _MODELS[key] = load_checkpoint(path)
        except ValueError as exc:
            raise ApiError(422, "bad_checkpoint", f"checkpoint {path.name}: {exc}") from None
        while len(_MODELS) > 2:
            _MODELS.popitem(last=False)
    _MODELS.move_to_end(key)
    return _MODELS[key]


def decode_image(raw: bytes, max_pixels: int):
    """Encoded PNG/JPEG/TIFF bytes -> uint8 (H, W, 3) RGB."""
    import cv2
    import numpy as np

    if not raw:
        raise ApiError(422, "validation_error", "body: empty; send the image file", [{"field": "(body)", "message": "empty"}])
    img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ApiError(422, "bad_image", "body: not a PNG, JPEG or TIFF image")
    h, w = img.shape[:2]
    if h * w > max_pixels:
        raise ApiError(413, "image_too_large", f"image {w}x{h} has more than {max_pixels} pixels "
                                               f"(NAS_SCAM_API_MAX_IMAGE_PIXELS)")
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1, int(img.max())))
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def _predict(path: Path, image, fmt: str):
    import cv2

    from nas_core.engine.evaluate import predict_probs
    from nas_core.engine.predict import label_map, to_geojson

    with _LOCK:
        model, meta = _load(path)
        data = meta["config"]["data"]
        tile, stride = int(data["crop_size"]), int(data["stride"])
        if min(image.shape[:2]) < 16:
            raise ApiError(422, "bad_image", "image: both sides must be at least 16 pixels")
        labels = label_map(predict_probs(model, image, tile=tile, stride=stride, device="cpu", binary=False))
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
                        **_errors(403, 404, 409, 413, 503)})
async def predict(request: Request, settings: SettingsDep, launcher: LauncherDep,
                  model: Annotated[Optional[str], Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$",
                                                        description="API run id or MLflow run id")] = None,
                  checkpoint: Annotated[Optional[str], Query(max_length=4096,
                                                             description="a .pt file under a data root")] = None,
                  format: Literal["geojson", "png"] = "geojson"):
    raw = await request.body()
    path = await run_in_threadpool(resolve_checkpoint, model, checkpoint, settings, launcher)
    image = await run_in_threadpool(decode_image, raw, settings.api_max_image_pixels)
    return await run_in_threadpool(_predict, path, image, format)
