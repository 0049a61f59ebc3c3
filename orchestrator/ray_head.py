"""A Ray head as a child process: the local cluster ``nas-scam serve`` starts when none answers.

Every listener on loopback and on free ports; the head runs in a process group of its own, so that
stopping it stops everything it started (``stop_process_group``, also used for the MLflow UI).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from orchestrator import ray_env

if TYPE_CHECKING:
    from orchestrator.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_head_command(dashboard_port: int, num_cpus: int, temp_dir: Path, ray_bin: Path | None = None) -> list[str]:
    """``ray start --head --block`` with every listener on loopback and free ports (no clash with other Rays)."""
    ray_bin = ray_bin or Path(sys.executable).parent / "ray"
    return [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}", f"--metrics-export-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
            f"--temp-dir={temp_dir}"]


def ray_env_vars() -> dict[str, str]:
    """Environment of a local head: auth explicit, loopback only, the venv first on PATH."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# Ray's default worker ports (ray start --min-worker-port/--max-worker-port): a dashboard there can
# collide with a worker and make `ray start` exit 1
RAY_WORKER_PORTS = range(10002, 20000)


def log_reason(log: Path, since: int = 0, limit: int = 600) -> str:
    """The error lines `ray start` wrote to ``log`` after byte ``since`` (else its last lines), as one line."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if "error" in ln.lower() or "exception" in ln.lower()]
    text = " | ".join((errors or lines)[-3:])
    return text if len(text) <= limit else "..." + text[-limit:]


def wait_dashboard(url: str, proc: subprocess.Popen | None = None, timeout: float = 90.0,
                   log: Path | None = None, log_start: int = 0) -> None:
    """Until the dashboard at ``url`` answers; a ClusterError naming the reason (from ``log``) when
    ``proc`` exits first or ``timeout`` passes."""
    deadline = time.time() + timeout
    while True:
        try:
            ray_env.check_dashboard(url, timeout=2.0)
            return
        except ray_env.ClusterError:
            if proc is not None and proc.poll() is not None:
                reason = log_reason(log, log_start) if log is not None else ""
                where = f" (log {log})" if log is not None else "; see its log"
                raise ray_env.ClusterError(f"ray start exited with status {proc.returncode}"
                                   f"{f': {reason}' if reason else ''}{where}") from None
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM then SIGKILL the process group we started (``start_new_session``), by its id."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_local_ray(settings: Settings, num_cpus: int | None) -> subprocess.Popen:
    """``ray start --head --block`` for the dashboard ``settings.ray_dashboard`` (loopback only) as our
    child in a session of its own, logging to ``<home>/api/ray-head.log``; returns once the dashboard answers."""
    parsed = urlparse(settings.ray_dashboard)
    if parsed.hostname not in ("127.0.0.1", "localhost") or not parsed.port:
        raise ValueError(f"NAS_SCAM_RAY_DASHBOARD={settings.ray_dashboard} does not answer, and a local Ray head "
                         f"can only be started for http://127.0.0.1:PORT")
    if parsed.port in RAY_WORKER_PORTS:
        raise ValueError(f"NAS_SCAM_RAY_DASHBOARD={settings.ray_dashboard}: port {parsed.port} lies in Ray's worker "
                         f"port range {RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}; choose another "
                         f"(the default is 8265)")
    cpus = num_cpus or settings.ray_num_cpus or min(2, os.cpu_count() or 1)
    temp_dir = ray_env.local_tmpdir()  # short: AF_UNIX path limit
    temp_dir.mkdir(parents=True, exist_ok=True)
    home = settings.home.expanduser()
    log_dir = home / "api"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "ray-head.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    # cwd: jobs inherit it, and nothing may land in the user's current folder
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(ray_head_command(parsed.port, cpus, temp_dir), env=ray_env_vars(),
                                cwd=str(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_dashboard(settings.ray_dashboard, proc, log=log_path, log_start=log_start)
    except BaseException:
        stop_local_ray(proc)
        raise
    return proc


def stop_local_ray(proc: subprocess.Popen) -> None:
    """Stop the head's process group, then remove the "current cluster" file it wrote if it still names
    this head: a later ``ray.init()`` must not mistake a stopped head for a cluster."""
    stop_process_group(proc)
    args = [str(a) for a in proc.args]
    port = next((a.split("=", 1)[1] for a in args if a.startswith("--port=")), None)
    temp = next((a.split("=", 1)[1] for a in args if a.startswith("--temp-dir=")), None)
    if port and temp:
        current = Path(temp) / "ray_current_cluster"
        try:
            if current.read_text().strip() == f"127.0.0.1:{port}":
                current.unlink()
        except OSError:
            pass
