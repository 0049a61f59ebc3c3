"""The API's run service: run specs become Ray jobs (through ``orchestrator.jobs``); their records live
in the run store (``api.store``).

A run = one validated spec submitted as the Ray job ``nas-scam-<id>`` whose entrypoint is
``<python> -m orchestrator.cli run-spec <runs>/api/<id>/spec.json``. The job writes everything under
``<runs>/api/<id>`` (NAS_SCAM_RUNS_DIR) and into the shared MLflow store. The service asks Ray for the
live status of active runs; a job Ray no longer knows (the head was restarted) gets its status from
the MLflow parent run, else ``lost``.

The service also lists the parent runs of the tracking store that it did not launch (``nas-scam ablate``
from a shell, another API): read-only records with ``origin`` "tracking", the parent's run id as id, its
``nas_scam_kind`` tag as kind, its MLflow status as status and its spec.yaml as spec (``tracked``).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from api import results
from api.errors import ClusterUnavailable, RunConflict, RunNotFound, TooManyRuns
from api.store import RESUMABLE, RunRecord, RunStore
from orchestrator.jobs import TERMINAL as JOB_TERMINAL, JobError, JobNotFound, JobServer, job_env
from orchestrator.results import PARENT_KINDS, Run
from orchestrator.settings import Settings

# the message of a record whose Ray job is being submitted
SUBMITTING = "submitting to Ray"
_RAY_STATUS = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
               "STOPPED": "cancelled"}
_MLFLOW_STATUS = {"FINISHED": "succeeded", "FAILED": "failed", "KILLED": "cancelled"}
# a run the API did not launch has no Ray job: its status is its MLflow parent's
_TRACKED_STATUS = {**_MLFLOW_STATUS, "RUNNING": "running", "SCHEDULED": "queued"}
# the state file each kind of job writes under <run_dir>/<experiment>/ (parent run and experiment ids); a
# single run's earlier attempts are kept as run.<n>.json
STATE_FILES = ("ablation.json", "run.json")
SINGLE_KINDS = ("search", "train", "pipeline")
_MLFLOW_ID = re.compile(r"^[0-9a-f]{32}$")


class RunService:
    """Submit, list, follow, resume and stop runs: the run store plus the job server."""

    def __init__(self, settings: Settings, store: Optional[RunStore] = None, jobs: Optional[JobServer] = None):
        """``jobs``: the job server to use instead of the one at ``settings.ray_dashboard`` (tests)."""
        self.settings = settings
        self.store = store or RunStore(settings.api_home / "runs.db")
        self.jobs = jobs or JobServer(settings.ray_dashboard)
        self._submitting: set[str] = set()  # run ids between their record and Ray's answer: not lost

    @staticmethod
    def _ray(fn: Callable, *args, **kwargs):
        """A job-server call with the API's errors: unknown job -> RunNotFound, no cluster -> ClusterUnavailable."""
        try:
            return fn(*args, **kwargs)
        except JobNotFound as exc:
            raise RunNotFound(str(exc)) from None
        except JobError as exc:
            raise ClusterUnavailable(str(exc)) from None

    def ping(self) -> dict[str, Any]:
        """Dashboard reachable and the job API answering; returns the cluster's job count."""
        return {"dashboard": self.jobs.dashboard, "jobs": len(self._ray(self.jobs.list))}

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
        """The Ray job ``rec.submission_id`` running ``run-spec <run_dir>/spec.json`` over this API's stores."""
        run_dir = Path(rec.run_dir)
        # a single run trains in the job's driver: reserve its resources there; Tune drivers only coordinate
        single = rec.kind in ("search", "train", "pipeline")
        resources = rec.spec.get("resources") or {}
        self._ray(self.jobs.submit, ["run-spec", str(run_dir / "spec.json")], job_env(self.settings, run_dir),
                  python=self.settings.job_python, submission_id=rec.submission_id,
                  metadata={"nas_scam_run": rec.id, "kind": rec.kind, "experiment": rec.experiment},
                  num_cpus=resources.get("cpu", 1.0) if single else 0,
                  num_gpus=resources.get("gpu", 0.0) if single else 0)

    def resume(self, run_id: str) -> RunRecord:
        """Submit a lost, failed or cancelled run again as a new Ray job over the same run folder.

        The job resumes: an ablation or HPO reopens its MLflow parent and restores its Tuner (finished
        trials are not re-run), a single run continues from its last checkpoint under a new parent."""
        rec = self.get(run_id)
        self._launched_here(rec, "resume")
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
        """An API run by its id, else a parent run of the tracking store by its MLflow run id."""
        rec = self.store.get(run_id)
        if rec is not None:
            return self._refresh(rec) if refresh else rec
        run = results.ask(results.reader(self.settings).run, run_id) if _MLFLOW_ID.match(run_id) else None
        if run is None or run.kind not in PARENT_KINDS:
            raise RunNotFound(f"no run {run_id!r}")
        return self.tracked(run)

    def list(self, kind: Optional[str] = None, status: Optional[str] = None, experiment: Optional[str] = None,
             limit: int = 50, offset: int = 0) -> tuple[list[RunRecord], int]:
        """The API's runs and the tracking store's other parents, newest first: one page and the total."""
        # refresh the active runs first, so a status filter sees the true status
        active, _ = self.store.query(kind=kind, experiment=experiment, limit=1000)
        for rec in active:
            if not rec.terminal:
                self._refresh(rec)
        # both sources newest first: the page lies within the first offset + limit of each
        own, own_total = self.store.query(kind=kind, status=status, experiment=experiment, limit=offset + limit)
        others = [run for run in self._others(kind=kind, experiment=experiment)
                  if status is None or _TRACKED_STATUS.get(run.status, "running") == status]
        rows = sorted([(r.created_at, r.id, r) for r in own] + [(r.start_time or 0.0, r.run_id, r) for r in others],
                      key=lambda row: (-row[0], row[1]))
        page = [item if isinstance(item, RunRecord) else self.tracked(item)
                for _, _, item in rows[offset:offset + limit]]
        return page, own_total + len(others)

    def experiments(self) -> list[dict[str, Any]]:
        """Per (experiment, kind): the runs of both sources and the newest one's creation time."""
        rows = {(r["experiment"], r["kind"]): dict(r) for r in self.store.experiments()}
        for run in self._others():
            row = rows.setdefault((run.experiment, run.kind), {"experiment": run.experiment, "kind": run.kind,
                                                               "runs": 0, "last_created": 0.0})
            row["runs"] += 1
            row["last_created"] = max(row["last_created"], run.start_time or 0.0)
        return [rows[key] for key in sorted(rows)]

    # ------------------------------------------------------------ runs the API did not launch
    def _others(self, kind: Optional[str] = None, experiment: Optional[str] = None) -> list[Run]:
        """The tracking store's parent runs that no API run made."""
        runs = results.ask(results.reader(self.settings).runs, experiment=experiment, kind=kind)
        if not runs:
            return []
        ours = self._api_parents()
        return [run for run in runs if run.run_id not in ours]

    def _api_parents(self) -> set[str]:
        """The MLflow parent runs the API's jobs opened: each run's current one, and a single run's earlier
        attempts (``run.<n>.json``, kept by ``resume``)."""
        parents = set()
        for rec in self.store.query(limit=1_000_000)[0]:
            self.find_parent(rec)
            parents.add(rec.parent_run_id)
            if rec.kind in SINGLE_KINDS:
                for path in (Path(rec.run_dir) / rec.experiment).glob("run.*.json"):
                    try:
                        parents.add(json.loads(path.read_text()).get("parent_run_id"))
                    except (OSError, ValueError, AttributeError):
                        continue
        return parents

    def tracked(self, run: Run) -> RunRecord:
        """A parent run the API did not launch as a read-only record (``origin`` tracking): its MLflow run
        id as id, its kind tag, its MLflow status, its spec.yaml; no Ray job, no run folder."""
        spec = results.ask(results.reader(self.settings).spec, run.run_id) or {"kind": run.kind,
                                                                              "name": run.experiment}
        return RunRecord(id=run.run_id, kind=run.kind, experiment=run.experiment, spec=spec,
                         status=_TRACKED_STATUS.get(run.status, "running"), submission_id="", run_dir="",
                         created_at=run.start_time or 0.0, started_at=run.start_time, ended_at=run.end_time,
                         message="not launched through this API: read from the tracking store",
                         parent_run_id=run.run_id, experiment_id=run.experiment_id, extra={"origin": "tracking"})

    @staticmethod
    def _launched_here(rec: RunRecord, what: str) -> None:
        if rec.extra.get("origin") == "tracking":
            raise RunConflict(f"run {rec.id} was not launched through this API (it is read from the tracking "
                              f"store): it has no Ray job to {what}")

    def _refresh(self, rec: RunRecord) -> RunRecord:
        """Ask Ray (then MLflow) for the live status of an active run; persist what changed."""
        if rec.terminal:
            self.find_parent(rec)
            return rec
        try:
            info = self._ray(self.jobs.info, rec.submission_id)
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
        if rec.parent_run_id or not rec.run_dir:
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
                parent = results.reader(self.settings).run(rec.parent_run_id)
                status = parent.status if parent else None
                if status in _MLFLOW_STATUS:
                    return _MLFLOW_STATUS[status], f"Ray no longer knows job {rec.submission_id}; status from MLflow"
            except Exception:  # noqa: BLE001 - the store may be gone too: then the run is lost
                pass
        return "lost", f"Ray no longer knows job {rec.submission_id} (the cluster was restarted) and MLflow has no end"

    def logs(self, run_id: str, tail: int = 65536) -> str:
        rec = self.get(run_id, refresh=False)
        self._launched_here(rec, "read logs from")
        try:
            text = self._ray(self.jobs.logs, rec.submission_id)
        except RunNotFound:
            return ""
        return text[-tail:] if tail else text

    # ------------------------------------------------------------ stop
    def cancel(self, run_id: str) -> RunRecord:
        """Stop the Ray job; its MLflow runs still RUNNING are marked KILLED."""
        rec = self.get(run_id)
        self._launched_here(rec, "cancel")
        if rec.terminal:
            raise RunConflict(f"run {run_id} is already {rec.status}")
        self.store.update(rec.id, cancel_requested=1)
        rec.cancel_requested = True
        try:
            self._ray(self.jobs.stop, rec.submission_id)
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

    def abandon_active(self, reason: str, wait_s: float = 15.0) -> list[str]:
        """Stop the Ray job of every active run and mark the run lost (resumable), its MLflow runs still
        RUNNING FAILED with ``reason``: for a server about to stop the Ray head its jobs run on. Left
        alone, a driver outlives its head by minutes and its runs stay RUNNING until the API restarts.
        Runs whose job ended by itself meanwhile keep that end. Returns the ids of the runs lost."""
        active = [r for r in self.store.query(limit=1000)[0] if not r.terminal]
        for rec in active:
            try:
                self._ray(self.jobs.stop, rec.submission_id)
            except (RunNotFound, ClusterUnavailable):
                pass  # never reached Ray, or Ray is gone already: lost all the same
        deadline = time.time() + wait_s
        while time.time() < deadline and not all(self._job_ended(r) for r in active):
            time.sleep(0.5)
        lost = []
        for rec in active:
            rec = self._refresh(rec)
            if rec.status in ("succeeded", "failed"):
                continue
            message = f"lost: {reason}; POST /v1/runs/{rec.id}/resume continues it"
            self._close_mlflow(rec, "FAILED", message)
            self.store.update(rec.id, status="lost", message=message, ended_at=rec.ended_at or time.time())
            lost.append(rec.id)
        return lost

    def _job_ended(self, rec: RunRecord) -> bool:
        try:
            return self.jobs.status(rec.submission_id) in JOB_TERMINAL
        except JobError:
            return True  # unknown to Ray, or Ray unreachable: nothing left to wait for

    def _close_mlflow(self, rec: RunRecord, status: str, reason: str) -> None:
        """The run's MLflow parent and its children still RUNNING end with ``status`` and a ``stopped`` tag."""
        self.find_parent(rec)
        if not rec.parent_run_id:
            return
        try:
            from orchestrator import tracking

            tracker = tracking.Tracker.attach(self.settings.tracking_uri, rec.experiment_id, rec.parent_run_id)
            tracker.close(reason, status)
        except Exception:  # noqa: BLE001 - the Ray job is gone either way; MLflow is bookkeeping
            pass
