"""The API's only door to Ray: run specs become Ray jobs; their records live in a small SQLite table.

A run = one validated spec submitted as the Ray job ``nas-scam-<id>`` whose entrypoint is
``<python> -m orchestrator.cli run-spec <runs>/api/<id>/spec.json``. The job writes everything under
``<runs>/api/<id>`` (NAS_SCAM_RUNS_DIR) and into the shared MLflow store. The record (spec, job id,
last known status) sits in ``<home>/api/runs.db``, so a restarted API lists every run again and asks
Ray for the live status; a job Ray no longer knows (the head was restarted) gets its status from the
MLflow parent run, else ``lost``.

Ray is imported lazily here and nowhere else in the API process.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator import ray_env
from orchestrator.settings import Settings

ACTIVE = ("queued", "running", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled", "lost")
# what POST /runs/{id}/resume continues: the job's resume path picks up finished phases and checkpoints
RESUMABLE = ("lost", "failed", "cancelled")
# the message of a record whose Ray job is being submitted
SUBMITTING = "submitting to Ray"
STATUSES = ACTIVE + TERMINAL
_RAY_STATUS = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
               "STOPPED": "cancelled"}
_MLFLOW_STATUS = {"FINISHED": "succeeded", "FAILED": "failed", "KILLED": "cancelled"}
# the state file each kind of job writes under <run_dir>/<experiment>/ (parent run and experiment ids)
STATE_FILES = ("ablation.json", "run.json")
# environment a job inherits from the API besides NAS_SCAM_* (never the API keys)
_FORWARD_ENV = ("RAY_AUTH_MODE", "MLFLOW_DISABLE_TELEMETRY", "NO_ALBUMENTATIONS_UPDATE")
_PRIVATE_ENV = ("NAS_SCAM_API_KEYS", "NAS_SCAM_RAY_ADDRESS")


class LauncherError(ValueError):
    """Base of the launcher's user-facing errors; ``code`` is the API's error code."""

    code = "launcher_error"


class RunNotFound(LauncherError):
    code = "run_not_found"


class RunConflict(LauncherError):
    code = "conflict"


class TooManyRuns(LauncherError):
    code = "too_many_runs"


class ClusterUnavailable(LauncherError):
    code = "cluster_unavailable"


@dataclass
class RunRecord:
    id: str
    kind: str
    experiment: str
    spec: dict[str, Any]
    status: str
    submission_id: str
    run_dir: str
    created_at: float
    message: str = ""
    started_at: Optional[float] = None
    ended_at: Optional[float] = None
    cancel_requested: bool = False
    parent_run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


_COLUMNS = ("id", "kind", "experiment", "spec", "status", "submission_id", "run_dir", "created_at", "message",
            "started_at", "ended_at", "cancel_requested", "parent_run_id", "experiment_id")


class RunStore:
    """SQLite table of runs (one file, WAL; safe across the API's threads and restarts)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, experiment TEXT NOT NULL,"
                " spec TEXT NOT NULL, status TEXT NOT NULL, submission_id TEXT NOT NULL, run_dir TEXT NOT NULL,"
                " created_at REAL NOT NULL, message TEXT DEFAULT '', started_at REAL, ended_at REAL,"
                " cancel_requested INTEGER DEFAULT 0, parent_run_id TEXT, experiment_id TEXT)")
            self._db.execute("CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at)")

    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        d = dict(row)
        d["spec"] = json.loads(d["spec"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return RunRecord(**d)

    def _insert_sql(self, rec: RunRecord) -> tuple[str, list]:
        values = {c: getattr(rec, c) for c in _COLUMNS}
        values["spec"] = json.dumps(rec.spec)
        return (f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                [values[c] for c in _COLUMNS])

    def insert(self, rec: RunRecord) -> None:
        with self._lock, self._db:
            self._db.execute(*self._insert_sql(rec))

    def _if_room(self, limit: int, sql: str, args: list) -> bool:
        """Run ``sql`` only while fewer than ``limit`` runs are active: count and write in one IMMEDIATE
        transaction, so concurrent requests (threads here, or another API process on the same file)
        cannot all pass the count."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                active = self._db.execute(f"SELECT COUNT(*) FROM runs WHERE status IN ({', '.join('?' * len(ACTIVE))})",
                                          ACTIVE).fetchone()[0]
                if active >= limit:
                    self._db.rollback()
                    return False
                self._db.execute(sql, args)
                self._db.commit()
                return True
            except BaseException:
                self._db.rollback()
                raise

    def insert_if_room(self, rec: RunRecord, limit: int) -> bool:
        """Insert ``rec`` (an active run) unless ``limit`` runs are active already."""
        return self._if_room(limit, *self._insert_sql(rec))

    def update_if_room(self, run_id: str, limit: int, **values: Any) -> bool:
        """Update a terminal run into an active one unless ``limit`` runs are active already."""
        self._check_columns(values)
        return self._if_room(limit, f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                             [*values.values(), run_id])

    def delete(self, run_id: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    @staticmethod
    def _check_columns(values: dict[str, Any]) -> None:
        unknown = set(values) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown run columns {sorted(unknown)}")

    def update(self, run_id: str, **values: Any) -> None:
        self._check_columns(values)
        with self._lock, self._db:
            self._db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                             [*values.values(), run_id])

    def get(self, run_id: str) -> Optional[RunRecord]:
        with self._lock:
            row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return self._record(row) if row else None

    def query(self, kind: Optional[str] = None, status: Optional[str] = None, experiment: Optional[str] = None,
              limit: int = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
        where, args = [], []
        for col, value in (("kind", kind), ("status", status), ("experiment", experiment)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        sql_where = f" WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM runs{sql_where}", args).fetchone()[0]
            rows = self._db.execute(f"SELECT * FROM runs{sql_where} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                                    [*args, limit, offset]).fetchall()
        return [self._record(r) for r in rows], total

    def count_active(self) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM runs WHERE status IN ({', '.join('?' * len(ACTIVE))})",
                                    ACTIVE).fetchone()[0]

    def experiments(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT experiment, kind, COUNT(*) AS runs, MAX(created_at) AS last_created "
                                    "FROM runs GROUP BY experiment, kind ORDER BY experiment, kind").fetchall()
        return [dict(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def job_env(settings: Settings, run_dir: Path) -> dict[str, str]:
    """Variables a job gets: this API's stores (resolved), its own runs folder, never the API keys."""
    env = {k: v for k, v in os.environ.items()
           if (k.startswith("NAS_SCAM_") and k not in _PRIVATE_ENV) or k in _FORWARD_ENV}
    env.update({"NAS_SCAM_HOME": str(settings.home.expanduser().resolve()),
                "NAS_SCAM_RUNS_DIR": str(run_dir),
                "NAS_SCAM_DATA_DIR": str(settings.data_root.resolve()),
                "NAS_SCAM_MLFLOW_TRACKING_URI": settings.tracking_uri,
                "NAS_SCAM_MLFLOW_ARTIFACTS_DIR": str(settings.artifacts_root.resolve())})
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


class Launcher:
    """Submit, list, follow and stop runs; reads Ray through ``JobSubmissionClient``."""

    def __init__(self, settings: Settings, store: Optional[RunStore] = None, jobs: Any = None):
        """``jobs``: a JobSubmissionClient-like object to use instead of connecting (tests)."""
        self.settings = settings
        self.store = store or RunStore(settings.api_home / "runs.db")
        self._fixed_client = jobs
        self._client = jobs
        self._client_lock = threading.Lock()
        self._submitting: set[str] = set()  # run ids between their record and Ray's answer: not lost

    # ------------------------------------------------------------ Ray
    def _forget_client(self) -> None:
        with self._client_lock:
            self._client = self._fixed_client  # reconnect next time: the head may have moved or restarted

    def _jobs(self):
        with self._client_lock:
            if self._client is None:
                ray_env.prepare(local=False)
                try:
                    ray_env.check_dashboard(self.settings.ray_dashboard, timeout=3.0)
                    from ray.job_submission import JobSubmissionClient

                    self._client = JobSubmissionClient(self.settings.ray_dashboard)
                except Exception as exc:  # noqa: BLE001 - any failure here means "no cluster"
                    raise ClusterUnavailable(f"Ray dashboard {self.settings.ray_dashboard} is unreachable: "
                                             f"{str(exc).splitlines()[0][:300]}") from None
            return self._client

    def _call(self, fn: str, *args, **kwargs):
        try:
            return getattr(self._jobs(), fn)(*args, **kwargs)
        except ClusterUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "does not exist" in text or "not found" in text.lower():
                raise RunNotFound(text.splitlines()[0][:300]) from None
            self._forget_client()
            raise ClusterUnavailable(f"Ray job API at {self.settings.ray_dashboard} failed on {fn}: "
                                     f"{text.splitlines()[0][:300] if text else type(exc).__name__}") from None

    def ping(self) -> dict[str, Any]:
        """Dashboard reachable and the job API answering; returns the cluster's job count."""
        return {"dashboard": self.settings.ray_dashboard, "jobs": len(self._call("list_jobs"))}

    # ------------------------------------------------------------ submit
    def _too_many(self) -> TooManyRuns:
        return TooManyRuns(f"{self.settings.api_max_active_runs} runs are queued or running "
                           f"(NAS_SCAM_API_MAX_ACTIVE_RUNS); wait or cancel one")

    def submit(self, spec) -> RunRecord:
        """Write the spec under ``<runs>/api/<id>``, submit the Ray job, record it (status ``queued``).

        The record is inserted first, only if fewer than ``api_max_active_runs`` runs are active (one
        transaction), and removed again when Ray refuses the job."""
        run_id = uuid.uuid4().hex[:16]
        run_dir = (self.settings.runs_root / "api" / run_id).resolve()
        spec_dict = spec.model_dump(mode="json")
        rec = RunRecord(id=run_id, kind=spec.kind, experiment=spec.name, spec=spec_dict, status="queued",
                        submission_id=f"nas-scam-{run_id}", run_dir=str(run_dir), created_at=time.time(),
                        message=SUBMITTING)
        if not self.store.insert_if_room(rec, self.settings.api_max_active_runs):
            raise self._too_many()
        self._submitting.add(run_id)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "spec.json").write_text(json.dumps(spec_dict, indent=2))
            self._submit_job(rec)
        except BaseException:
            self.store.delete(run_id)
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        finally:
            self._submitting.discard(run_id)
        rec.message = ""
        self.store.update(run_id, message="")
        return rec

    def _submit_job(self, rec: RunRecord) -> None:
        """The Ray job ``rec.submission_id`` running ``run-spec <run_dir>/spec.json``."""
        client = self._jobs()
        run_dir = Path(rec.run_dir)
        python = self.settings.job_python or sys.executable
        entrypoint = shlex.join([python, "-m", "orchestrator.cli", "run-spec", str(run_dir / "spec.json")])
        # a single run trains in the job's driver: reserve its resources there; Tune drivers only coordinate
        single = rec.kind in ("search", "train", "pipeline")
        resources = rec.spec.get("resources") or {}
        try:
            client.submit_job(
                entrypoint=entrypoint, submission_id=rec.submission_id,
                runtime_env={"env_vars": job_env(self.settings, run_dir)},
                metadata={"nas_scam_run": rec.id, "kind": rec.kind, "experiment": rec.experiment},
                entrypoint_num_cpus=resources.get("cpu", 1.0) if single else 0,
                entrypoint_num_gpus=resources.get("gpu", 0.0) if single else 0)
        except Exception as exc:  # noqa: BLE001
            self._forget_client()
            raise ClusterUnavailable(f"submitting to Ray at {self.settings.ray_dashboard} failed: "
                                     f"{str(exc).splitlines()[0][:300]}") from None

    def resume(self, run_id: str) -> RunRecord:
        """Submit a lost, failed or cancelled run again as a new Ray job over the same run folder.

        The job resumes: an ablation or HPO reopens its MLflow parent and restores its Tuner (finished
        trials are not re-run), a single run continues from its last checkpoint under a new parent."""
        rec = self.get(run_id)
        if rec.status not in RESUMABLE:
            raise RunConflict(f"run {run_id} is {rec.status}; only {', '.join(RESUMABLE)} runs can be resumed")
        base = f"nas-scam-{rec.id}"
        attempt = int(rec.submission_id.rsplit("-r", 1)[1]) + 1 if rec.submission_id != base else 1
        before = {"status": rec.status, "message": rec.message, "submission_id": rec.submission_id,
                  "parent_run_id": rec.parent_run_id, "experiment_id": rec.experiment_id}
        values = {"status": "queued", "message": SUBMITTING, "submission_id": f"{base}-r{attempt}",
                  "cancel_requested": 0, "ended_at": None}
        single = rec.kind in ("search", "train", "pipeline")
        if single:
            values.update(parent_run_id=None, experiment_id=None)
        if not self.store.update_if_room(rec.id, self.settings.api_max_active_runs, **values):
            raise self._too_many()
        state = Path(rec.run_dir) / rec.experiment / "run.json"
        if single and state.is_file():
            # a single run opens a new MLflow parent each time: its old state file must not name the old one
            state.rename(state.with_name(f"run.{attempt - 1}.json"))
        resumed = self.store.get(rec.id)
        self._submitting.add(rec.id)
        try:
            self._submit_job(resumed)
        except BaseException:
            self.store.update(rec.id, **before)
            raise
        finally:
            self._submitting.discard(rec.id)
        self.store.update(rec.id, message="")
        resumed.message = ""
        return resumed

    # ------------------------------------------------------------ read
    def get(self, run_id: str, refresh: bool = True) -> RunRecord:
        rec = self.store.get(run_id)
        if rec is None:
            raise RunNotFound(f"no run {run_id!r}")
        return self._refresh(rec) if refresh else rec

    def list(self, kind: Optional[str] = None, status: Optional[str] = None, experiment: Optional[str] = None,
             limit: int = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
        # refresh the active runs first, so a status filter sees the true status
        active, _ = self.store.query(kind=kind, experiment=experiment, limit=1000)
        for rec in active:
            if not rec.terminal:
                self._refresh(rec)
        return self.store.query(kind=kind, status=status, experiment=experiment, limit=limit, offset=offset)

    def _refresh(self, rec: RunRecord) -> RunRecord:
        """Ask Ray (then MLflow) for the live status of an active run; persist what changed."""
        if rec.terminal:
            self.find_parent(rec)
            return rec
        try:
            info = self._call("get_job_info", rec.submission_id)
        except RunNotFound:
            if rec.id in self._submitting:
                return rec  # the submitting request has not reached Ray yet
            status, message = self._status_from_mlflow(rec)
            info = None
        except ClusterUnavailable as exc:
            rec.message = f"status unknown: {exc}"
            return rec
        if info is not None:
            status = _RAY_STATUS.get(info.status.value if hasattr(info.status, "value") else str(info.status), "queued")
            if status in ("queued", "running") and rec.cancel_requested:
                status = "cancelling"
            message = (info.message or "")[:2000]
            rec.started_at = info.start_time / 1000 if info.start_time else rec.started_at
            rec.ended_at = info.end_time / 1000 if info.end_time else rec.ended_at
        changed = (status, message) != (rec.status, rec.message)
        lost_now = status == "lost" and rec.status != "lost"
        rec.status, rec.message = status, message
        self.find_parent(rec)
        if lost_now:
            # nobody will close its MLflow runs any more: the parent and the phases in flight are FAILED
            self._close_mlflow(rec, "FAILED", "lost: the Ray job is gone (the cluster was restarted)")
        if changed or rec.terminal:
            self.store.update(rec.id, status=rec.status, message=rec.message, started_at=rec.started_at,
                              ended_at=rec.ended_at, parent_run_id=rec.parent_run_id, experiment_id=rec.experiment_id)
        return rec

    def find_parent(self, rec: RunRecord) -> None:
        if rec.parent_run_id:
            return
        for name in STATE_FILES:
            path = Path(rec.run_dir) / rec.experiment / name
            if path.is_file():
                try:
                    state = json.loads(path.read_text())
                except (OSError, ValueError):
                    return  # being written; next time
                rec.parent_run_id, rec.experiment_id = state.get("parent_run_id"), state.get("experiment_id")
                self.store.update(rec.id, parent_run_id=rec.parent_run_id, experiment_id=rec.experiment_id)
                return

    def _status_from_mlflow(self, rec: RunRecord) -> tuple[str, str]:
        self.find_parent(rec)
        if rec.parent_run_id:
            try:
                from orchestrator import tracking

                status = tracking.client(self.settings.tracking_uri).get_run(rec.parent_run_id).info.status
                if status in _MLFLOW_STATUS:
                    return _MLFLOW_STATUS[status], f"Ray no longer knows job {rec.submission_id}; status from MLflow"
            except Exception:  # noqa: BLE001 - the store may be gone too: then the run is lost
                pass
        return "lost", f"Ray no longer knows job {rec.submission_id} (the cluster was restarted) and MLflow has no end"

    def logs(self, run_id: str, tail: int = 65536) -> str:
        rec = self.get(run_id, refresh=False)
        try:
            text = self._call("get_job_logs", rec.submission_id)
        except RunNotFound:
            return ""
        return text[-tail:] if tail else text

    # ------------------------------------------------------------ stop
    def cancel(self, run_id: str) -> RunRecord:
        """Stop the Ray job; its MLflow runs still RUNNING are marked KILLED."""
        rec = self.get(run_id)
        if rec.terminal:
            raise RunConflict(f"run {run_id} is already {rec.status}")
        self.store.update(rec.id, cancel_requested=1)
        rec.cancel_requested = True
        try:
            self._call("stop_job", rec.submission_id)
        except RunNotFound:
            pass
        deadline = time.time() + 10
        while time.time() < deadline:
            rec = self._refresh(rec)
            if rec.terminal:
                break
            time.sleep(0.5)
        self._close_mlflow(rec, "KILLED", "cancelled through the API")
        return rec

    def _close_mlflow(self, rec: RunRecord, status: str, reason: str) -> None:
        """The run's MLflow parent and its children still RUNNING end with ``status`` and a ``stopped`` tag."""
        self.find_parent(rec)
        if not rec.parent_run_id:
            return
        try:
            from orchestrator import tracking

            tracker = tracking.Tracker.attach(self.settings.tracking_uri, rec.experiment_id, rec.parent_run_id)
            tracker.kill_dangling(reason, status=status)
            if tracker.client.get_run(rec.parent_run_id).info.status == "RUNNING":
                tracker.client.set_tag(rec.parent_run_id, "stopped", reason)
                tracker.finish(rec.parent_run_id, status)
        except Exception:  # noqa: BLE001 - the Ray job is gone either way; MLflow is bookkeeping
            pass


def record_dict(rec: RunRecord) -> dict[str, Any]:
    return asdict(rec)
