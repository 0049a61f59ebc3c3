"""Callbacks: the engine's only seam to the outside (MLflow, Ray reporting, progress)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class Callback:
    """No-op base class; subclass and override what you need.

    Phases are ``"search"`` and ``"train"``. ``on_epoch_end`` is called after the epoch's resumable
    state ``out_dir / "last.pt"`` has been written, so a reporter may copy or point at it.
    """

    def on_run_start(self, phase: str, cfg: Any, out_dir: Path) -> None:
        pass

    def on_epoch_end(self, phase: str, epoch: int, metrics: dict[str, float], out_dir: Path) -> None:
        pass

    def on_artifact(self, phase: str, path: Path, kind: str) -> None:
        pass

    def on_run_end(self, phase: str, result: Any) -> None:
        pass


class CallbackList(Callback):
    """Fans every event out to several callbacks, in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def on_run_start(self, phase, cfg, out_dir):
        for cb in self.callbacks:
            cb.on_run_start(phase, cfg, out_dir)

    def on_epoch_end(self, phase, epoch, metrics, out_dir):
        for cb in self.callbacks:
            cb.on_epoch_end(phase, epoch, metrics, out_dir)

    def on_artifact(self, phase, path, kind):
        for cb in self.callbacks:
            cb.on_artifact(phase, path, kind)

    def on_run_end(self, phase, result):
        for cb in self.callbacks:
            cb.on_run_end(phase, result)
