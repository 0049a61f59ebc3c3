"""`nas-scam serve`: the REST API, with a local Ray head and MLflow store when none is configured.

The API's own command: the top-level CLI (nas_scam/cli.py) adds it to the orchestrator's commands.
``serve`` attaches to the Ray dashboard in NAS_SCAM_RAY_DASHBOARD when it answers; otherwise it starts
``ray start --head --block`` on loopback as its own child (orchestrator.ray_head; stopped when the server
stops, after the jobs of its active runs, which are marked lost and can be resumed) and then uvicorn.
"""

from __future__ import annotations

import argparse
import signal
import sys


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


def cmd_serve(args: argparse.Namespace) -> int:
    # here, not at the top: `nas-scam --help` stays fast
    import uvicorn

    from api.main import create_app
    from orchestrator import ray_env, tracking
    from orchestrator.ray_head import start_local_ray, stop_local_ray
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
    app = None
    try:
        tracking.init_store(settings.tracking_uri, settings.artifacts_root)
        app = create_app(settings)
        print(f"MLflow store {settings.tracking_uri}; API on http://{host}:{port} (docs: /docs)", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=args.log_level,
                    timeout_graceful_shutdown=5, server_header=False)
    finally:
        if head is not None:
            try:
                if app is not None:
                    abandon_runs(app.state.run_service)
            finally:
                print("stopping the local Ray head", flush=True)
                stop_local_ray(head)
    return 0


def abandon_runs(service) -> None:
    """The runs on the head this server is about to stop: their jobs stopped now (a driver would outlive
    its head by minutes), their MLflow runs closed, each marked lost, which ``POST /resume`` continues."""
    try:
        lost = service.abandon_active("the server stopped, and the local Ray head its job ran on with it")
    except Exception as exc:  # noqa: BLE001 - the head must still stop; the next start marks them lost
        print(f"nas-scam serve: warning: could not stop the active runs: {exc}", file=sys.stderr)
        return
    if lost:
        print(f"stopped {len(lost)} active run(s), now lost (resumable): {', '.join(lost)}", flush=True)
