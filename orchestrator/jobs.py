"""The one door to Ray jobs: connect to the job server (the Ray dashboard), submit, status, logs, stop.

Both callers go through it: ``nas-scam ablate|hpo --submit`` (the same command line, minus
``--submit``, runs as the job's driver over an uploaded working folder) and the API's run service
(``run-spec <runs>/api/<id>/spec.json`` over the shared stores). Every job runs
``<python> -m orchestrator.cli ...`` with the environment ``job_env`` builds.

Ray is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from orchestrator import ray_env
from orchestrator.settings import Settings

# what a job inherits besides NAS_SCAM_*; never the API keys, never the submitter's Ray address
FORWARD_ENV = ("RAY_AUTH_MODE", "MLFLOW_DISABLE_TELEMETRY", "NO_ALBUMENTATIONS_UPDATE")
PRIVATE_ENV = ("NAS_SCAM_API_KEYS", "NAS_SCAM_RAY_ADDRESS")
# never uploaded with a --submit working folder
UPLOAD_EXCLUDES = [".venv", ".git", "*.pt", "runs", "mlruns", "__pycache__", ".pytest_cache"]
# Ray's JobStatus values that end a job
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(ValueError):
    """A job request that cannot be served; the message names the dashboard or the job."""


class JobServerUnavailable(JobError):
    """The dashboard does not answer, or its job API failed."""


class JobNotFound(JobError):
    """The job server does not know this job id (never submitted, or the head was restarted)."""


def job_env(stores: Optional[Settings] = None, runs_dir: Optional[Path] = None) -> dict[str, str]:
    """The environment of every job: this process's NAS_SCAM_* and Ray/MLflow switches, never the API keys.

    ``stores``: pin the job to these stores (home, data, MLflow), resolved, as the API does so that its
    jobs write where it reads; without it the job's node resolves its own (``--submit``, where the
    submitter's paths may not exist on the cluster). ``runs_dir``: the job's runs folder."""
    env = {k: v for k, v in os.environ.items()
           if (k.startswith("NAS_SCAM_") and k not in PRIVATE_ENV) or k in FORWARD_ENV}
    if stores is not None:
        env.update({"NAS_SCAM_HOME": str(stores.home.expanduser().resolve()),
                    "NAS_SCAM_DATA_DIR": str(stores.data_root.resolve()),
                    "NAS_SCAM_MLFLOW_TRACKING_URI": stores.tracking_uri,
                    "NAS_SCAM_MLFLOW_ARTIFACTS_DIR": str(stores.artifacts_root.resolve())})
    if runs_dir is not None:
        env["NAS_SCAM_RUNS_DIR"] = str(runs_dir)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    if "NAS_SCAM_GIT_COMMIT" not in env:  # the upload carries no .git: the job's MLflow runs name the commit
        from orchestrator.tracking import git_commit

        commit, _ = git_commit()
        if commit:
            env["NAS_SCAM_GIT_COMMIT"] = commit
    return env


def entrypoint(argv: list[str], python: Optional[str] = None) -> str:
    """The shell command of a job: ``<python> -m orchestrator.cli <argv>`` (``python``: the cluster's
    interpreter, NAS_SCAM_JOB_PYTHON; default this one)."""
    return shlex.join([python or sys.executable, "-m", "orchestrator.cli", *argv])


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:300] if text.strip() else type(exc).__name__


class JobServer:
    """Ray's job API at one dashboard address, through ``JobSubmissionClient``.

    Connects lazily and again after a failure (the head may have moved or restarted); safe across threads."""

    def __init__(self, dashboard: str, client: Any = None):
        """``client``: a JobSubmissionClient-like object to use instead of connecting (tests)."""
        self.dashboard = dashboard
        self._fixed_client = client
        self._client = client
        self._lock = threading.Lock()

    def _forget(self) -> None:
        with self._lock:
            self._client = self._fixed_client

    def client(self, timeout: float = 3.0):
        with self._lock:
            if self._client is None:
                ray_env.prepare(local=False)
                try:
                    ray_env.check_dashboard(self.dashboard, timeout=timeout)
                    from ray.job_submission import JobSubmissionClient

                    self._client = JobSubmissionClient(self.dashboard)
                except ray_env.ClusterError as exc:
                    raise JobServerUnavailable(str(exc)) from None
                except Exception as exc:  # noqa: BLE001 - any failure here means "no cluster"
                    raise JobServerUnavailable(f"Ray dashboard {self.dashboard} is unreachable: "
                                               f"{_first_line(exc)}") from None
            return self._client

    def _call(self, fn: str, *args, **kwargs):
        client = self.client()
        try:
            return getattr(client, fn)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "does not exist" in text or "not found" in text.lower():
                raise JobNotFound(_first_line(exc)) from None
            self._forget()
            raise JobServerUnavailable(f"Ray job API at {self.dashboard} failed on {fn}: {_first_line(exc)}") from None

    # ------------------------------------------------------------ submit
    def submit(self, argv: list[str], env: dict[str, str], *, python: Optional[str] = None,
               submission_id: Optional[str] = None, working_dir: Optional[Path] = None,
               metadata: Optional[dict[str, str]] = None, num_cpus: Optional[float] = None,
               num_gpus: Optional[float] = None) -> str:
        """Submit ``orchestrator.cli <argv>`` as a job; returns its id.

        ``working_dir``: uploaded (minus ``UPLOAD_EXCLUDES``, .gitignore, .rayignore) and the job's
        current folder; its size is checked first. ``num_cpus``/``num_gpus``: reserved for the driver
        (None: Ray's default)."""
        ray_env.prepare(local=False)  # before the upload check imports Ray
        runtime_env: dict[str, Any] = {"env_vars": env}
        if working_dir is not None:
            check_upload(working_dir, UPLOAD_EXCLUDES)
            runtime_env.update(working_dir=str(working_dir), excludes=UPLOAD_EXCLUDES)
        client = self.client(timeout=5.0)
        kwargs = {k: v for k, v in (("submission_id", submission_id), ("metadata", metadata),
                                    ("entrypoint_num_cpus", num_cpus), ("entrypoint_num_gpus", num_gpus))
                  if v is not None}
        try:
            return client.submit_job(entrypoint=entrypoint(argv, python), runtime_env=runtime_env, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if working_dir is not None and " 413" in str(exc):
                # the cluster's limit is lower than this Ray's default
                raise JobError(f"--submit: {self.dashboard} refused the upload of {working_dir} as too large "
                               f"(HTTP 413); exclude large files (list them in .rayignore) or submit from a "
                               f"smaller folder") from None
            self._forget()
            raise JobServerUnavailable(f"submitting to Ray at {self.dashboard} failed: {_first_line(exc)}") from None

    # ------------------------------------------------------------ read, stop
    def info(self, job_id: str):
        """Ray's JobDetails: ``status``, ``message``, ``start_time``/``end_time`` (ms)."""
        return self._call("get_job_info", job_id)

    def status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        status = self._call("get_job_status", job_id)
        return status.value if hasattr(status, "value") else str(status)

    def logs(self, job_id: str) -> str:
        return self._call("get_job_logs", job_id)

    def stop(self, job_id: str) -> bool:
        return self._call("stop_job", job_id)

    def list(self) -> list:
        return self._call("list_jobs")

    def follow(self, job_id: str, poll_s: float = 2.0, write: Callable[[str], Any] = None) -> str:
        """Print the job's log as it grows until it ends; returns its final status."""
        write = write or (lambda text: print(text, end="", flush=True))
        seen = 0
        while True:
            status = self.status(job_id)
            logs = self.logs(job_id)
            if len(logs) > seen:
                write(logs[seen:])
                seen = len(logs)
            if status in TERMINAL:
                return status
            time.sleep(poll_s)


# ---------------------------------------------------------------- upload size (--submit)
def upload_limit() -> int:
    """Bytes a job's zipped working_dir may have: the dashboard's HTTP body limit (413 above it) and
    the GCS's gRPC message limit, whichever is smaller."""
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    return min(ray_constants.DASHBOARD_CLIENT_MAX_SIZE, packaging.GCS_STORAGE_MAX_SIZE)


def check_upload(working_dir: Path, excludes: list[str], limit: Optional[int] = None) -> None:
    """Refuse before submitting a working_dir Ray would reject, naming its largest entries.

    Walks it with Ray's own rules (``excludes``, .gitignore, .rayignore); only when the files add up
    past the limit is the zip built, as Ray would, to measure it exactly.
    """
    from ray._private.runtime_env import packaging

    limit = upload_limit() if limit is None else limit
    root = working_dir.resolve()
    sizes: dict[str, int] = {}

    def add(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            top = path.relative_to(root).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size

    quiet = logging.getLogger("nas_scam.upload_check")
    quiet.setLevel(logging.WARNING)  # Ray's info lines ("Creating a file package") would be noise here
    packaging._dir_travel(root, [packaging._get_excludes(root, excludes)], add, include_gitignore=True, logger=quiet)
    if sum(sizes.values()) < limit:
        return
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "package.zip"
        packaging.create_package(str(root), package, include_gitignore=True, excludes=excludes, logger=quiet)
        zipped = package.stat().st_size
    if zipped < limit:
        return
    mib = 1024 ** 2
    largest = [kv for kv in sorted(sizes.items(), key=lambda kv: -kv[1])[:5] if kv[1] >= limit // 100]
    raise JobError(f"--submit would upload {root} as {zipped / mib:.1f} MiB zipped, over Ray's limit of "
                   f"{limit / mib:.0f} MiB; largest entries: "
                   f"{', '.join(f'{name} ({n / mib:.1f} MiB)' for name, n in largest)}. Exclude them "
                   f"(list them in {root / '.rayignore'}) or submit from a smaller folder")
