"""A run's folder: what may be written there, resume from it, and the JSON files a run leaves.

Everything a run writes lives in ``out_dir``: ``last.pt`` is the resumable state after each epoch,
``best.pt`` the best-validation checkpoint, ``result.json`` marks a finished run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from nas_core.config import ConfigError, RunConfig


def guard_out_dir(out_dir: Path, resume: bool, phase: str) -> None:
    """A fresh (non-resuming) run never overwrites another run's results; the folder must take files."""
    if not resume and ((out_dir / "result.json").exists() or (out_dir / "last.pt").exists()):
        raise ConfigError(f"{out_dir} already holds a {phase} run; pass --resume to continue it or choose another --out")
    ensure_writable_dir(out_dir)


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` and prove it takes files, so a read-only or non-folder output fails at once with
    an OSError naming it (not after an epoch, where torch.save reports a RuntimeError)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    os.unlink(probe)
    return path


def resume_from_last(out_dir: Path, cfg: RunConfig, model: nn.Module, optimizers: dict,
                     state: dict) -> tuple[dict, int]:
    """Restore weights, optimisers, RNG and loop state from ``out_dir/last.pt`` if it exists.

    Returns (state, first epoch to run). A last.pt written with another config is refused; where the
    files lie (``LOCATION_PATHS``: data root, source folder, genotype file) may differ, so a run folder
    copied to another machine resumes there.
    """
    from nas_core.config import config_from_dict
    from nas_core.engine.checkpoint import load_weights, read_checkpoint
    from nas_core.engine.device import set_rng_state

    last = out_dir / "last.pt"
    if not last.exists():
        return state, 0
    payload = read_checkpoint(last)
    differences = config_from_dict(payload["config"]).run_differences(cfg)
    if differences:
        raise ConfigError(f"{last} was written with a different config ({', '.join(differences[:5])} differ); "
                          f"resume with the same config or another --out")
    load_weights(model, payload, last)
    for key, opt in optimizers.items():
        opt.load_state_dict(payload["optimizers"][key])
    set_rng_state(payload["rng"])
    return payload["state"], payload["epoch"] + 1


def read_result(out_dir: Path, path_keys: tuple[str, ...]) -> dict:
    """A finished run's ``result.json``, its files (``path_keys``) pointed into ``out_dir`` as it lies
    now: the folder may have been copied from another folder or machine."""
    data = json.loads((out_dir / "result.json").read_text())
    for key in path_keys:
        if data.get(key):
            data[key] = str(out_dir / Path(data[key]).name)
    return data


def write_json(path: Path, data: Any) -> Path:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
