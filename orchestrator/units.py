"""One unit per number on every surface a person reads.

The engine's files (result.json, metrics.json, Tune's reports) keep DSC, PQ (and its SQ, RQ parts) and
pixel accuracy as fractions and epochs 0-based, as the code computes them. Every surface shows DSC and PQ
in % with 2 decimals and epochs 1-based: the console (epoch lines, the JSON of ``search``/``train``/
``evaluate``/``rescore``), MLflow metrics and registry tags, tables and the report.
"""

from __future__ import annotations

import re
from typing import Any

_FRACTION_PARTS = frozenset({"dsc", "pq", "sq", "rq", "accuracy"})


def is_fraction(key: str) -> bool:
    """A key the engine stores as a fraction: one with a ``dsc``/``pq``/``sq``/``rq``/``accuracy`` part
    (``val_dsc``, ``test_dsc_per_image_Average``, ``dsc/Epithelial``, ``pixel_accuracy``)."""
    return any(part in _FRACTION_PARTS for part in re.split(r"[_/.]", key))


def shown(key: str, value: Any) -> float:
    """A metric as every surface shows it: fractions (``is_fraction``) in % with 2 decimals."""
    v = float(value)
    return round(100.0 * v, 2) if is_fraction(key) and v == v else v


def epoch1(epoch: Any) -> Any:
    """A 0-based engine epoch as surfaces show it (1-based); -1 (never validated) and None stay as they are."""
    return epoch + 1 if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else epoch


def percent_tree(obj: Any, path: str = "") -> Any:
    """A nested result (``evaluate``'s dict, a result's ``test``) with every number under a fraction key
    (any key on its path, ``is_fraction``) in % with 2 decimals; ``best_epoch`` 1-based; the rest as is."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = f"{path}/{k}" if path else str(k)
            out[k] = epoch1(v) if k == "best_epoch" else percent_tree(v, key)
        return out
    if isinstance(obj, list):
        return [percent_tree(v, path) for v in obj]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool) and is_fraction(path):
        return shown(path, obj)
    return obj
