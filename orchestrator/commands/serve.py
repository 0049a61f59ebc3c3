"""`nas-scam serve | run-spec`: the REST API (with a local Ray head and MLflow store when none is configured)
and the entrypoint of the Ray jobs it submits.

``serve`` attaches to the Ray dashboard in NAS_SCAM_RAY_DASHBOARD when it answers; otherwise it starts
``ray start --head --block`` on loopback as its own child (stopped when the server stops) and then
uvicorn. ``run-spec SPEC.json`` runs one spec of any kind inside the job (``runner.run_spec_file``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the REST API (and a local Ray head + MLflow store if none is configured)",
                       description="Serve the REST API on 127.0.0.1 (X-API-Key from NAS_SCAM_API_KEYS). Attaches to "
                                   "the Ray dashboard NAS_SCAM_RAY_DASHBOARD when it answers; otherwise starts a "
                                   "local Ray head on loopback for the server's lifetime.")
    p.add_argument("--host", help="bind address (default NAS_SCAM_API_HOST = 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default NAS_SCAM_API_PORT = 8000)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray head (default NAS_SCAM_RAY_NUM_CPUS or min(2, cores))")
    p.add_argument("--no-local-ray", action="store_true",
                   help="never start a Ray head: serve even while NAS_SCAM_RAY_DASHBOARD does not answer "
                        "(GET /readyz says so; the cluster may come up later)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run-spec", help="run a spec JSON/YAML of any kind here (the entrypoint of API jobs)")
    p.add_argument("spec", help="spec file (JSON or YAML): kind search|train|pipeline|ablation|hpo")
    p.add_argument("--no-model", action="store_true", help="skip mlflow.pytorch.log_model (checkpoints are still logged)")
    p.set_defaults(func=cmd_run_spec)


# ---------------------------------------------------------------- serve
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
    from orchestrator.ray_env import ClusterError, check_dashboard

    deadline = time.time() + timeout
    while True:
        try:
            check_dashboard(url, timeout=2.0)
            return
        except ClusterError:
            if proc is not None and proc.poll() is not None:
                reason = log_reason(log, log_start) if log is not None else ""
                where = f" (log {log})" if log is not None else "; see its log"
                raise ClusterError(f"ray start exited with status {proc.returncode}"
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


def start_local_ray(settings, num_cpus: int | None) -> subprocess.Popen:
    from orchestrator import ray_env

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


def init_mlflow_store(settings) -> None:
    """Create the local store (schema migrations) once, before jobs race to do it."""
    from orchestrator import tracking

    tracking.check_tracking_uri(settings.tracking_uri)
    settings.artifacts_root.mkdir(parents=True, exist_ok=True)
    tracking.client(settings.tracking_uri).search_experiments(max_results=1)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app
    from orchestrator import ray_env
    from orchestrator.settings import get_settings

    settings = get_settings()
    host, port = args.host or settings.api_host, args.port or settings.api_port
    ray_env.prepare(local=False)
    if not settings.api_keys:
        print("nas-scam serve: warning: NAS_SCAM_API_KEYS is empty, every /v1 request will be refused (401)",
              file=sys.stderr)
    # SIGTERM (uvicorn re-raises it after its graceful shutdown, `kill` sends it) becomes SystemExit so
    # that the `finally` below stops the Ray head, which lives in a session of its own; installed before
    # the head starts, as a SIGTERM may come while it does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    head = None
    try:
        ray_env.check_dashboard(settings.ray_dashboard, timeout=2.0)
        print(f"attached to the Ray cluster at {settings.ray_dashboard}", flush=True)
    except ray_env.ClusterError as exc:
        if args.no_local_ray:
            print(f"nas-scam serve: warning: {exc}; serving anyway (GET /readyz reports it)", file=sys.stderr)
        else:
            print(f"starting a local Ray head (dashboard {settings.ray_dashboard}) ...", flush=True)
            head = start_local_ray(settings, args.num_cpus)
    try:
        init_mlflow_store(settings)
        print(f"MLflow store {settings.tracking_uri}; API on http://{host}:{port} (docs: /docs)", flush=True)
        uvicorn.run(create_app(settings), host=host, port=port, log_level=args.log_level,
                    timeout_graceful_shutdown=5, server_header=False)
    finally:
        if head is not None:
            print("stopping the local Ray head", flush=True)
            stop_local_ray(head)
    return 0


# ---------------------------------------------------------------- run-spec (inside a Ray job)
def cmd_run_spec(args: argparse.Namespace) -> int:
    from orchestrator.runner import run_spec_file

    return run_spec_file(Path(args.spec), log_model=not args.no_model)
