"""Inference for POST /predict in a process of its own, so that a request past its deadline can be stopped.

One worker process (spawned, so no threads or CUDA state are forked) loads checkpoints (the last two
stay cached) and segments one image at a time; the API admits at most ``api_max_predictions`` requests
at once (the rest get 429), and each has ``api_predict_timeout_s`` in all, waiting for the worker
included. A request that passes its deadline gets 503 and the worker is killed and started afresh on
the next request: a huge image cannot hold inference for minutes, and a thread cannot be killed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from pathlib import Path
from typing import Any

from api.errors import ApiError

log = logging.getLogger("nas_scam.api")
_MODELS_CACHED = 2


def _serve(conn) -> None:
    """The worker's loop: ``(path, image)`` in, ``("ok", labels)`` or ``("error", status, code, message)`` out."""
    from collections import OrderedDict

    from nas_core.data.stain import StainNormalizer
    from nas_core.engine.checkpoint import load_checkpoint
    from nas_core.engine.evaluate import predict_probs
    from nas_core.engine.predict import label_map

    models: OrderedDict = OrderedDict()
    while True:
        try:
            path, image = conn.recv()
        except EOFError:
            return
        try:
            if path not in models:
                try:
                    models[path] = load_checkpoint(path)
                except ValueError as exc:
                    conn.send(("error", 422, "bad_checkpoint", f"checkpoint {Path(path).name}: {exc}"))
                    continue
                while len(models) > _MODELS_CACHED:
                    models.popitem(last=False)
            models.move_to_end(path)
            model, meta = models[path]
            data = meta["config"]["data"]
            # the model sees what it was trained on: the checkpoint's stain normalisation first
            model_input, _ = StainNormalizer(data.get("stain", "none")).apply_or_keep(image)
            probs = predict_probs(model, model_input, tile=int(data["crop_size"]), stride=int(data["stride"]),
                                  device="cpu", binary=False)
            conn.send(("ok", label_map(probs)))
        except Exception as exc:  # noqa: BLE001 - the API logs it; the worker lives on
            conn.send(("error", 500, "internal_error", f"{type(exc).__name__}: {str(exc)[:300]}"))


class Inference:
    """The admission bound, the deadline and the worker process of POST /predict."""

    def __init__(self, max_requests: int, timeout_s: float):
        self.timeout_s = timeout_s
        self._admitted = threading.BoundedSemaphore(max_requests)
        self._max = max_requests
        self._lock = threading.Lock()  # one image in the worker at a time
        self._proc = None
        self._conn = None

    def admit(self) -> None:
        """Take a slot (429 when all are taken); ``release`` gives it back."""
        if not self._admitted.acquire(blocking=False):
            raise ApiError(429, "too_many_predictions", f"{self._max} predictions are running or waiting "
                                                        f"(NAS_SCAM_API_MAX_PREDICTIONS); retry later",
                           headers={"Retry-After": "5"})

    def release(self) -> None:
        self._admitted.release()

    def deadline(self) -> float:
        return time.monotonic() + self.timeout_s

    def _timeout(self) -> ApiError:
        return ApiError(503, "predict_timeout", f"prediction did not finish within {self.timeout_s:g} s "
                                                f"(NAS_SCAM_API_PREDICT_TIMEOUT_S); send a smaller image or retry",
                        headers={"Retry-After": "5"})

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="nas-scam-predict", daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def stop(self) -> None:
        """Kill the worker (the next request starts another)."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)

    @property
    def worker_pid(self) -> Any:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def labels(self, path: Path, image, deadline: float):
        """uint8 (H, W) class ids of ``image`` under the checkpoint ``path``, or ApiError by ``deadline``."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise self._timeout()
        try:
            if self._proc is None or not self._proc.is_alive():
                self.stop()
                self._start()
            try:
                # the worker is idle in recv() here (one image at a time), so the send waits at most for
                # a fresh worker's start-up
                self._conn.send((str(path), image))
                if not self._conn.poll(max(0.0, deadline - time.monotonic())):
                    self.stop()
                    raise self._timeout()
                reply = self._conn.recv()
            except (EOFError, OSError):  # the worker died under us (killed, out of memory)
                proc = self._proc
                if proc is not None:
                    proc.join(2)
                    log.error("the inference worker (pid %s) ended with exit code %s", proc.pid, proc.exitcode)
                self.stop()
                raise ApiError(503, "predict_failed", "the inference process ended unexpectedly; retry") from None
        finally:
            self._lock.release()
        if reply[0] == "error":
            _, status, code, message = reply
            if status >= 500:
                log.error("prediction with %s failed: %s", path, message)
                raise ApiError(500, "internal_error", "internal server error; the server log has the details")
            raise ApiError(status, code, message)
        return reply[1]
