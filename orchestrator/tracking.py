"""The recorder: MLflow written. One experiment per ablation, a parent run per invocation, a child run per
(method, seed, phase).

``Tracker`` owns the client, the experiment and the parent run; ``PhaseRecorder`` is the one MLflow
callback of an engine phase (params, epochs, results, the model, and the figures it is handed); it only
records: which engine runs, and whether, is ``orchestrator.phases.run_phase``. Everything goes through
``MlflowClient`` with explicit run ids (no fluent "active run" state, except around MLflow's
``log_model``), so the same code runs in the driver and inside Ray trials. Child runs are found again by
their tags, which makes every call idempotent: a resumed trial continues its run instead of opening a
second one.

Reading what was recorded is ``orchestrator.results`` (the read model); MLflow's objects are handled in
these two modules only (tests/orchestrator/test_results.py reads the code to keep it so).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from nas_core.engine.callbacks import Callback
from orchestrator.units import epoch1 as _epoch1
from orchestrator.units import shown

# tag keys without dots: MLflow's filter syntax needs backticks around dotted keys
T_KIND, T_ABLATION, T_METHOD, T_SEED, T_PHASE = "nas_scam_kind", "ablation", "method", "seed", "phase"
T_PARENT = "mlflow.parentRunId"
# tags of how a run ended (``kill_dangling``, the API's lost/cancelled runs, ``fail``); a resume clears them
END_TAGS = ("stopped", "error")
# a run's place in a larger grid (absent where the grid has no such dimension): random draw, patient
# fold, axes variant label; each axis value also as tag ``axis.<dotted key>``
T_DRAW, T_FOLD, T_VARIANT, T_AXIS = "draw", "fold", "variant", "axis."
# MLflow 3's UI opens an experiment in the view this tag names; untagged ones open in the GenAI (traces)
# view. "custom_model_development" is the model-training view: the runs table and charts.
T_EXPERIMENT_KIND, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# DSC, PQ (and its SQ, RQ parts) and pixel accuracy are fractions in the engine's files (result.json,
# metrics.json, Tune's reports) and % with 2 decimals on every surface: MLflow metrics and registry tags
# (runs tagged ``dsc_unit = percent``; older runs hold fractions, the read model converts), console,
# tables, report. Epochs are 1-based on every surface (MLflow steps, best_epoch).
T_UNIT, UNIT = "dsc_unit", "percent"
# runs per MLflow search call, page after page (a server answers at most 50,000; 1,000 keeps answers small)
SEARCH_PAGE = 1000
# where a run came from (MLflow's own source tags, shown on the run page and on the logged model)
T_SOURCE_NAME, T_SOURCE_TYPE, T_GIT_COMMIT = "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"
T_VERSION, T_GIT_DIRTY = "nas_scam.version", "nas_scam.git_dirty"
SOURCE_TAGS = (T_SOURCE_NAME, T_SOURCE_TYPE, T_GIT_COMMIT, T_VERSION, T_GIT_DIRTY)
# seconds between two samples of MLflow's system metrics (CPU, memory, disk, network, GPU) of a phase
SYSTEM_METRICS_INTERVAL = 10.0


def git_commit(root: Optional[Path] = None) -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the checkout the code runs from; ``NAS_SCAM_GIT_COMMIT`` where it is not one (a
    ``ray job submit`` upload carries no .git); (None, None) when neither tells."""
    root = Path(root or Path(__file__).resolve().parents[1])
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return commit, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        pass
    env = os.environ.get("NAS_SCAM_GIT_COMMIT", "")
    return (env, None) if re.fullmatch(r"[0-9a-f]{7,40}", env) else (None, None)


def source_tags(entry: Optional[str] = None) -> dict[str, str]:
    """MLflow's source tags of a run started by this process: the command (``nas-scam ablate``; the API's
    own name for its runs), the package version, the git commit and whether the checkout had changes."""
    from orchestrator.cli import version

    if entry is None:
        prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
        sub = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        entry = f"nas-scam {sub}".strip() if prog in ("nas-scam", "cli.py", "__main__.py") else prog
    tags = {T_SOURCE_NAME: entry, T_SOURCE_TYPE: "PROJECT", T_VERSION: version()}
    commit, dirty = git_commit()
    if commit:
        tags[T_GIT_COMMIT] = commit
    if dirty is not None:
        tags[T_GIT_DIRTY] = str(dirty).lower()
    return tags


class TrackingError(ValueError):
    """The tracking URI cannot be used; the message names it."""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (before any trial) when the store cannot be reached or created."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking URI {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(f"MLflow tracking URI {uri} is unreachable ({exc}); start the server "
                                f"or set NAS_SCAM_MLFLOW_TRACKING_URI") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"MLflow store {uri}: cannot create {db.parent} ({exc})") from None
    elif "://" in uri and not uri.startswith(("file://", "databricks")):
        raise TrackingError(f"MLflow tracking URI {uri!r}: expected http(s)://, sqlite:/// or file://")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def search_all(c, experiment_ids: list[str], flt: str = "", order_by: Optional[list[str]] = None,
               max_results: Optional[int] = None) -> list:
    """MLflow runs matching ``flt``, page after page (``SEARCH_PAGE`` a call): all of them, or the first
    ``max_results``; the recorder's and the read model's one search loop."""
    found, token = [], None
    while max_results is None or len(found) < max_results:
        want = SEARCH_PAGE if max_results is None else min(SEARCH_PAGE, max_results - len(found))
        page = c.search_runs(experiment_ids, filter_string=flt, order_by=order_by, max_results=want,
                             page_token=token)
        found.extend(page)
        token = getattr(page, "token", None)
        if not token or not len(page):
            break
    return found


def init_store(uri: str, artifacts_root: Path) -> None:
    """Create a local store (its schema migrations) and the artifacts folder once, before jobs race to do it."""
    check_tracking_uri(uri)
    Path(artifacts_root).mkdir(parents=True, exist_ok=True)
    client(uri).search_experiments(max_results=1)


def ensure_experiment(c, name: str, artifacts_root: Optional[Path]) -> str:
    """Experiment id for ``name``; a new one stores artifacts under ``artifacts_root/name`` (local stores)."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if exp.tags.get(T_EXPERIMENT_KIND) != EXPERIMENT_KIND:  # experiments made before the tag existed
            c.set_experiment_tag(exp.experiment_id, T_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return exp.experiment_id
    # a tracking server proxies artifacts itself; only a local store needs an explicit location
    location = None
    if artifacts_root is not None and not c.tracking_uri.startswith(("http://", "https://")):
        location = (Path(artifacts_root) / name).resolve().as_uri()
    return c.create_experiment(name, artifact_location=location, tags={T_EXPERIMENT_KIND: EXPERIMENT_KIND})


def flatten_dotted(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value} (MLflow params, spec overrides)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_dotted(v, key + "."))
        else:
            out[key] = v
    return out


def registered_name(method: str) -> str:
    """Model Registry name of a method: ``nas-scam-<method>`` (NAS-SCAM ids already start with it)."""
    return method if method.startswith("nas-scam-") else f"nas-scam-{method}"


class Tracker:
    """One experiment's MLflow: the client, the experiment id and (once opened) the parent run.

    The driver opens the parent; a trial rebuilds the same tracker from ``ctx()`` (three strings that
    travel in Tune's config) and records each phase with ``run_phase``. Methods that log take the run id
    explicitly, the parent's included.
    """

    def __init__(self, c, experiment_id: str, parent_run_id: Optional[str] = None):
        self.client, self.experiment_id, self.parent_run_id = c, experiment_id, parent_run_id

    @classmethod
    def connect(cls, uri: str, experiment: str, artifacts_root: Optional[Path] = None) -> "Tracker":
        """The tracker of experiment ``experiment`` (created if new; see ``ensure_experiment``), no parent yet."""
        c = client(uri)
        return cls(c, ensure_experiment(c, experiment, artifacts_root))

    @classmethod
    def attach(cls, uri: str, experiment_id: str, parent_run_id: Optional[str]) -> "Tracker":
        """The tracker of an existing parent run (in a trial, in the API)."""
        return cls(client(uri), experiment_id, parent_run_id)

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def ctx(self) -> dict[str, Any]:
        """What a trial needs to ``attach`` to this tracker (plain strings for Tune's config)."""
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id}

    # ------------------------------------------------------------ the parent run
    def open_parent(self, run_name: str, kind: str, params: Mapping[str, Any], spec_yaml: str) -> str:
        """A new parent run tagged with ``kind``: the spec as params and as spec.yaml. Becomes this tracker's."""
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={T_KIND: kind, T_ABLATION: run_name, T_UNIT: UNIT, **source_tags()})
        self.parent_run_id = run.info.run_id
        self.log_params(self.parent_run_id, params)
        self.client.log_text(self.parent_run_id, spec_yaml, "spec.yaml")
        return self.parent_run_id

    def reopen(self, run_id: str) -> None:
        """RUNNING again (a resume). The tags that said how the last attempt ended ("stopped", "error")
        would outlive it and contradict the new end: they become ``resumed_after``."""
        tags = self.client.get_run(run_id).data.tags
        ended = [f"{key}={tags[key]}" for key in END_TAGS if key in tags]
        for key in END_TAGS:
            if key in tags:
                self.client.delete_tag(run_id, key)
        if ended:
            self.client.set_tag(run_id, "resumed_after", "; ".join(ended)[:5000])
        self.client.update_run(run_id, status="RUNNING")

    # ------------------------------------------------------------ child runs
    def child(self, method: str, seed: int, phase: str, run_name: str) -> tuple[str, str]:
        """Get or create the child run of (method, seed, phase) under the parent: (run_id, status)."""
        runs = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`{T_PARENT}` = '{self.parent_run_id}' and tags.{T_METHOD} = '{method}' and "
            f"tags.{T_SEED} = '{seed}' and tags.{T_PHASE} = '{phase}' and attributes.run_name = '{run_name}'"),
            max_results=5)
        if runs:
            return runs[0].info.run_id, runs[0].info.status
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            T_PARENT: self.parent_run_id, T_METHOD: method, T_SEED: str(seed), T_PHASE: phase, T_KIND: "trial",
            T_UNIT: UNIT, **self.source()})
        return run.info.run_id, run.info.status

    def source(self) -> dict[str, str]:
        """The parent's source tags (command, version, git commit): a trial's worker process is Ray's
        ``default_worker.py`` and may run where the checkout is not; the driver's tags say what ran."""
        if getattr(self, "_source", None) is None:
            tags = self.client.get_run(self.parent_run_id).data.tags if self.parent_run_id else {}
            self._source = {k: tags[k] for k in SOURCE_TAGS if k in tags} or source_tags()
        return dict(self._source)

    def children(self, phase: Optional[str] = None, status: Optional[str] = None) -> list:
        flt = f"tags.`{T_PARENT}` = '{self.parent_run_id}'"
        if phase:
            flt += f" and tags.{T_PHASE} = '{phase}'"
        if status:
            flt += f" and attributes.status = '{status}'"
        return search_all(self.client, [self.experiment_id], flt)

    def kill_dangling(self, reason: str, status: str = "KILLED") -> int:
        """Child runs still RUNNING after the Tuner returned (e.g. stopped by ASHA) -> KILLED (or ``status``)
        with a reason."""
        n = 0
        for run in self.children(status="RUNNING"):
            self.client.set_tag(run.info.run_id, "stopped", reason)
            self.client.set_terminated(run.info.run_id, status=status)
            n += 1
        return n

    def close_failed(self, causes: Mapping[str, str]) -> None:
        """The children still RUNNING whose run name ``causes`` names (run name -> cause: their trial finally
        failed, its worker died in the middle of a phase) end FAILED with the cause as their ``error`` tag;
        a resume reopens them."""
        if not causes:
            return
        for run in self.children(status="RUNNING"):
            cause = causes.get(run.info.run_name)
            if cause is not None:
                self.client.set_tag(run.info.run_id, "error", cause[:5000])
                self.client.set_terminated(run.info.run_id, status="FAILED")

    def close(self, reason: str, status: str = "KILLED") -> None:
        """The parent and its children still RUNNING end with ``status`` and ``reason`` as their
        ``stopped`` tag (a run whose driver is gone: lost or cancelled through the API)."""
        self.kill_dangling(reason, status=status)
        if self.client.get_run(self.parent_run_id).info.status == "RUNNING":
            self.client.set_tag(self.parent_run_id, "stopped", reason)
            self.finish(self.parent_run_id, status)

    def system_metrics(self, run_id: str):
        """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network, GPU where
        there is one) of a phase, sampled every ``SYSTEM_METRICS_INTERVAL`` s in a thread; None where MLflow
        cannot start it (its failure must not fail the phase)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, resume_logging=True,
                                           tracking_uri=self.tracking_uri)
            monitor.start()
            return monitor
        except Exception:  # noqa: BLE001 - a missing psutil or a store error: the phase runs unmonitored
            return None

    @staticmethod
    def stop_system_metrics(monitor) -> None:
        """Stop the sampling thread and log a last sample, so a phase shorter than one interval has one."""
        if monitor is None:
            return
        try:
            monitor.finish()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception:  # noqa: BLE001 - system metrics are a courtesy, never the phase's failure
            pass

    # ------------------------------------------------------------ logging into a run
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_dotted(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        existing = self.client.get_run(run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are write-once; a resumed run has them
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_epoch(self, run_id: str, epoch: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        # step = the 1-based epoch the console and the report name; DSC/PQ in % (``shown``)
        items = [Metric(k, shown(k, v), ts, int(epoch) + 1) for k, v in metrics.items()
                 if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def log_search_result(self, run_id: str, result: Any) -> None:
        """Genotype JSON (and as a param), alpha's history and the best validation metrics."""
        c = self.client
        geno = result.genotype.to_dict()
        c.log_dict(run_id, geno, "genotype.json")
        self.log_params(run_id, {"genotype": json.dumps(geno)})
        if result.alpha_history_path and Path(result.alpha_history_path).exists():
            c.log_artifact(run_id, str(result.alpha_history_path))
        # the best validation's DSC per class, its PQ and pixel accuracy; not PQ's parts per class (SQ and
        # RQ per class read 0 on every search this budget runs: a metric that never moves tells nothing)
        best = {k: v for k, v in flatten_dotted(result.best_val).items()
                if k.startswith(("dsc/", "dsc_per_image/")) or k in ("pq/Average", "pixel_accuracy")}
        self._log_flat(run_id, {"best_epoch": _epoch1(result.best_epoch), **{f"best_{k}": v for k, v in best.items()}})

    def log_train_result(self, run_id: str, result: Any, log_model: bool = True) -> None:
        """Test DSC per class (as test_dsc_<class>), PQ, per-image DSC, metrics.json, genotype figure, the model."""
        test = result.test
        flat = {"best_epoch": _epoch1(result.best_epoch), "test_pixel_accuracy": test.get("pixel_accuracy"),
                "test_n_images": test.get("n_images")}
        for key in ("dsc", "dsc_per_image", "pq"):
            for cls, v in (test.get(key) or {}).items():
                flat[f"test_{key}_{cls}"] = v
        self._log_flat(run_id, flat)
        if result.metrics_path and Path(result.metrics_path).exists():
            self.client.log_artifact(run_id, str(result.metrics_path))
        if log_model and Path(result.checkpoint_path).exists():
            self.log_model(run_id, Path(result.checkpoint_path))

    def _log_flat(self, run_id: str, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k.replace("/", "_"), shown(k, v), ts, 0) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])

    def log_model(self, run_id: str, checkpoint: Path, register: bool = True) -> None:
        """``mlflow.pytorch.log_model`` of the best checkpoint, registered as ``registered_name(method)``.

        Pickle serialisation: torch.export (MLflow's default pt2) does not take the attention cells' Python
        control flow. Signature: (B, 3, H, W) float32 in, (B, 4, H, W) class probabilities out, any B and
        any H, W divisible by 16 (the nets are fully convolutional). The input example is a small (2, 3,
        32, 32) batch: batch >= 2, as an example of one would read as a fixed batch size; a crop-sized
        example would store megabytes of JSON per model version.
        """
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from nas_core.engine.checkpoint import load_checkpoint

        c = self.client
        model, _ = load_checkpoint(checkpoint)
        example = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "image")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 4, -1, -1), "probabilities")]))
        tags = c.get_run(run_id).data.tags
        method, seed = tags.get(T_METHOD), tags.get(T_SEED)
        c.log_artifact(run_id, str(checkpoint), "checkpoint")
        mlflow.set_tracking_uri(c.tracking_uri)
        registered = registered_name(method) if register and method else None
        # the fluent API needs an active run. Leaving it with end_run(RUNNING), not FINISHED: the caller's
        # finish() is the run's one FINISHED transition (a reader polling for FINISHED runs, such as a
        # resume, then never sees an end time that changes afterwards)
        mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pytorch.log_model(
                model, name=f"{registered_name(method)}-seed{seed}" if method else "nas-scam-model",
                serialization_format="pickle", tags=self.source(),
                signature=signature, input_example=example, registered_model_name=registered,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "nas-scam"],
                code_paths=[str(Path(__import__("nas_core").__file__).parent)])
            if registered and info.registered_model_version is not None:
                version = str(info.registered_model_version)
                score = c.get_run(run_id).data.metrics.get("test_dsc_Average")
                for key, value in ((T_METHOD, method), (T_SEED, seed), ("run_id", run_id),
                                   ("test_dsc_Average", score), (T_UNIT, UNIT)):
                    if value is not None:
                        c.set_model_version_tag(registered, version, key, str(value))
                c.update_registered_model(registered, description=f"NAS-SCAM project: best checkpoint (highest "
                                                                  f"validation DSC) of method {method}, one "
                                                                  f"version per (seed, ablation run)")
        finally:
            mlflow.end_run(status="RUNNING")

    def log_table_metrics(self, run_id: str, table: Any) -> None:
        """Table 2 on the parent run, in %: ``avg_dsc/<method>``, ``dsc/<class>/<method>``, ``std_dsc/...``.

        ``table`` is ``tables.compare``'s frame; the runs table of the MLflow UI then compares ablations.
        """
        from mlflow.entities import Metric

        ts, items = int(time.time() * 1000), []
        for row in table.to_dict("records"):
            cls, method = row["class"], row["method"]
            key = f"avg_dsc/{method}" if cls == "Average" else f"dsc/{cls}/{method}"
            for prefix, value in (("", row["mean"]), ("std_", row["std"])):
                if value is not None and value == value:  # NaN std (a single seed) is not logged
                    items.append(Metric(prefix + key, round(float(value), 2), ts, 0))
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i:i + 500])
        # the whole table as an MLflow table artifact (the run page's Artifacts tab shows it as a grid)
        cols = [c for c in ("variant", "method", "class", "mean", "std", "n", "folds", "folds_max", "paper_mean",
                            "paper_std", "diff") if c in table.columns]
        self.client.log_table(run_id, data=table[cols].round(2), artifact_file="table2/table2_table.json")

    def set_best_aliases(self, ablation: str, records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
        """Per method, the registered model version of its retrain with the highest test Average DSC in this
        ablation gets the alias ``best-<ablation>``: {method: version}. Methods whose model was not
        registered (``--no-model``) are left out."""
        best: dict[str, tuple[float, str]] = {}
        for r in records:
            score, rid = r.get("Average"), r.get("run_id")
            if rid and score is not None and score == score and score > best.get(r["method"], (-1.0, ""))[0]:
                best[r["method"]] = (float(score), rid)
        alias = "best-" + re.sub(r"[^A-Za-z0-9_-]", "-", ablation)[:200]
        out = {}
        for method, (_, rid) in sorted(best.items()):
            name = registered_name(method)
            versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{rid}'")
            if versions:
                version = str(max(int(v.version) for v in versions))
                self.client.set_registered_model_alias(name, alias, version)
                out[method] = version
        return out

    def log_files(self, run_id: str, paths: Iterable[Path], artifact_path: Optional[str] = None) -> None:
        for p in paths:
            self.client.log_artifact(run_id, str(p), artifact_path)

    def log_artifact(self, run_id: str, path: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self.client.set_tag(run_id, key, value)

    # ------------------------------------------------------------ ending a run
    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def fail(self, run_id: str, exc: BaseException) -> None:
        """The run shows FAILED with the error as a tag and the traceback as an artifact."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.client.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        self.client.log_text(run_id, text, "error.txt")
        self.client.set_terminated(run_id, status="FAILED")


@dataclass
class PhaseFigures:
    """What a finished phase hands the recorder to log: figure files (under the run's ``figures/``) and
    tags (the learning curve's ``no_learning``). Made by ``phases.phase_figures``: the recorder draws nothing."""

    paths: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


class PhaseRecorder(Callback):
    """The one MLflow callback: one engine phase into its child run; it only records.

    Run start: the RunConfig as params. Each epoch: its metrics (step = the 1-based epoch, DSC in %).
    Run end: the result (a search's genotype, alpha history and best validation metrics; a retrain's
    test metrics, metrics.json and the model unless ``log_model`` is off), then what ``figures(phase,
    cfg, result, out_dir)`` hands in (``PhaseFigures``: files and tags).
    """

    def __init__(self, tracker: Tracker, run_id: str, cfg, out_dir: Path, log_model: bool = True,
                 figures: Optional[Callable[..., PhaseFigures]] = None):
        self.tracker, self.run_id, self.cfg, self.out_dir, self.log_model = tracker, run_id, cfg, out_dir, log_model
        self.figures = figures
        self.result = None

    def on_run_start(self, phase, cfg, out_dir):
        self.tracker.log_params(self.run_id, cfg.to_dict())

    def on_epoch_end(self, phase, epoch, metrics, out_dir):
        self.tracker.log_epoch(self.run_id, epoch, metrics)

    def on_run_end(self, phase, result):
        if phase == "search":
            self.tracker.log_search_result(self.run_id, result)
        else:
            self.tracker.log_train_result(self.run_id, result, log_model=self.log_model)
        if self.figures is not None:
            made = self.figures(phase, self.cfg, result, self.out_dir)
            self.tracker.log_files(self.run_id, made.paths, "figures")
            for key, value in made.tags.items():
                self.tracker.set_tag(self.run_id, key, value)
        self.result = result
