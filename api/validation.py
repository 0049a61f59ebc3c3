"""A POST /v1/runs body -> a spec the server accepts, or ApiError 403/422 naming the field.

Order: JSON (finite numbers, bounded nesting, valid Unicode), ``kind`` present, the orchestrator's spec
models (strict types, identifier names, the config limits of ``nas_core.config.LIMITS``), then every
config the spec's validation built (``spec.configs``: one per method, from which ``orchestrator.plan``
derives every trial's config, and each HPO choice and range end) is checked for paths outside the data
roots and sizes over the server's bounds. The check reads the built RunConfig, so a path or size is
caught whichever spec key, override or search-space value set it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from api.errors import ApiError
from orchestrator.settings import Settings
from orchestrator.specs import PATH_KEYS, SpecError, parse_spec
from orchestrator.tracking import flatten_dotted

# a spec is a few levels deep (overrides.data.source); deeper is an attack on the parser, not a spec
MAX_JSON_DEPTH = 32
# Linux PATH_MAX and NAME_MAX: longer paths cannot name a file, and resolving them raises
MAX_PATH_CHARS, MAX_PATH_PART = 4096, 255
# paths a job reads (must exist) rather than creates
_MUST_EXIST = ("data.source", "model.genotype")
# RunConfig key -> the Settings field bounding it
SIZE_LIMITS = {
    "search.epochs": "api_max_epochs", "train.epochs": "api_max_epochs",
    "search.iters_per_epoch": "api_max_iters_per_epoch", "train.iters_per_epoch": "api_max_iters_per_epoch",
    "data.synthetic_images": "api_max_synthetic_images", "data.synthetic_size": "api_max_synthetic_size",
    "data.crop_size": "api_max_crop_size", "search.per_class": "api_max_per_class",
    "train.per_class": "api_max_per_class", "data.workers": "api_max_workers",
}


def invalid(field: str, message: str, status: int = 422, code: str = "validation_error") -> ApiError:
    return ApiError(status, code, f"{field}: {message}", [{"field": field, "message": message}])


def env_name(setting: str) -> str:
    return f"NAS_SCAM_{setting.upper()}"


# JSON may spell a lone UTF-16 surrogate ("\\ud800"): a Python string that no file name, log line or
# database can hold (Path.resolve raises UnicodeEncodeError)
_UNENCODABLE = "not valid Unicode text (a lone surrogate such as \\ud800)"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unencodable_at(data: Any) -> Optional[str]:
    """The dotted place (``overrides.out_dir``, ``space.data.values.0``) of a key or string of parsed
    JSON that is not valid Unicode; None when all are."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, at = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            place = f"{at}.{key}" if at else str(key)
            if isinstance(key, str) and not _encodable(key):
                return at or "(top level)"
            if isinstance(value, str) and not _encodable(value):
                return place
            stack.append((value, place))
    return None


def check_path(field: str, value: Any, settings: Settings, must_exist: bool = True, where: str = "") -> Path:
    """Absolute and inside one of ``settings.allowed_data_roots`` after resolving links and ``..``; the
    resolved path. 403 outside the roots, 422 for what cannot be a path (too long, NUL, a link loop)."""
    suffix = f" ({where})" if where else ""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise invalid(field, f"expected a path string{suffix}")
    if not _encodable(value):
        raise invalid(field, f"{_UNENCODABLE}{suffix}")
    if len(value) > MAX_PATH_CHARS or any(len(part) > MAX_PATH_PART for part in value.split("/")):
        raise invalid(field, f"path of {len(value)} characters is too long (at most {MAX_PATH_CHARS}, "
                             f"{MAX_PATH_PART} per folder or file name){suffix}")
    roots = settings.allowed_data_roots
    p = Path(value)
    try:
        resolved = p.resolve()
    except (OSError, RuntimeError) as exc:  # a link loop, a component the OS refuses
        raise invalid(field, f"{value[:200]} cannot be resolved ({type(exc).__name__}){suffix}") from None
    if not p.is_absolute() or not any(resolved.is_relative_to(r) for r in roots):
        raise ApiError(403, "path_forbidden", f"{field}: {value[:200]} is not an absolute path under a data root "
                                              f"({', '.join(str(r) for r in roots)}; NAS_SCAM_DATA_ROOTS){suffix}",
                       [{"field": field, "message": "outside the data roots"}])
    if must_exist and not resolved.exists():
        raise invalid(field, f"{value} does not exist{suffix}")
    return resolved


def _finite_only(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_JSON_DEPTH:
            break
        if isinstance(node, dict):
            stack += [(v, level + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, level + 1) for v in node]
    return deepest


def load_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object of finite numbers nested at most MAX_JSON_DEPTH deep."""
    try:
        data = json.loads(raw, parse_constant=_finite_only)
    except RecursionError:
        raise invalid("(body)", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid("(body)", f"not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise invalid("(body)", "expected a JSON object (a run spec)")
    if _depth(data) > MAX_JSON_DEPTH:
        raise invalid("(body)", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    bad = _unencodable_at(data)
    if bad is not None:
        raise invalid(bad, _UNENCODABLE)
    return data


def _over(field: str, value: Any, setting: str, settings: Settings, where: str = "") -> None:
    limit = getattr(settings, setting)
    if value is not None and value > limit:
        suffix = f" ({where})" if where else ""
        raise invalid(field, f"{value} exceeds the server's limit {limit} ({env_name(setting)}){suffix}")


def check_configs(spec, settings: Settings) -> None:
    """Paths and sizes of every trial config the spec expands into."""
    for where, cfg in spec.configs:
        flat = flatten_dotted(cfg.to_dict())
        for key in PATH_KEYS:
            if flat.get(key) is not None:
                check_path(key, flat[key], settings, must_exist=key in _MUST_EXIST, where=f"config for {where}")
        for key, setting in SIZE_LIMITS.items():
            _over(key, flat.get(key), setting, settings, f"config for {where}")


def check_spec(spec, settings: Settings) -> None:
    """Spec-level counts and resources, then the expanded configs."""
    if spec.kind == "ablation":
        _over("seeds", len(spec.seed_list), "api_max_seeds", settings, "seed count")
        _over("axes", spec.trial_count, "api_max_trials", settings,
              "runs of the grid: methods x seeds x random draws x axes variants x folds, searches included")
    if spec.kind == "hpo":
        _over("num_samples", spec.num_samples, "api_max_samples", settings)
        _over("grace_period", spec.grace_period, "api_max_epochs", settings)
    _over("resources.cpu", spec.resources.cpu, "api_max_cpu", settings)
    _over("resources.gpu", spec.resources.gpu, "api_max_gpu", settings)
    check_configs(spec, settings)


def parse_body(raw: bytes, settings: Settings):
    """Raw JSON -> validated spec, or ApiError 403/422 naming the field."""
    data = load_json(raw)
    if "kind" not in data:
        raise invalid("kind", "required: one of search, train, pipeline, ablation, hpo")
    try:
        spec = parse_spec(data, "spec")
    except SpecError as exc:
        message = str(exc).removeprefix("spec: ")
        details = [{"field": part.split(":", 1)[0], "message": part.split(":", 1)[-1].strip()}
                   for part in message.split("; ")]
        raise ApiError(422, "validation_error", message, details) from None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError) as exc:
        raise ApiError(422, "validation_error", f"spec: {type(exc).__name__}: {str(exc)[:500]}") from None
    check_spec(spec, settings)
    return spec
