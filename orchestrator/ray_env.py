"""Environment for Ray, set before ``import ray`` (its constants are read at import time).

No Ray import here: this module only prepares variables and checks addresses, so the CLI can
reject an unreachable cluster before anything heavy starts.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

# AF_UNIX socket paths are limited to ~107 bytes; Ray nests session/sockets/... under this folder,
# so it stays short and outside the (possibly deep) project home.
LOCAL_TMPDIR = Path(f"/tmp/nas-scam-ray-{os.getuid()}")


class ClusterError(ValueError):
    """A Ray address or dashboard cannot be reached; the message names it."""


def resolve_address(configured: Optional[str]) -> Optional[str]:
    """The cluster to attach to: the setting, else ``RAY_ADDRESS`` (set by ``ray job submit``), else None."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def prepare(local: bool) -> None:
    """Explicit defaults, never overriding what the user exported."""
    # Ray 2.60 turns token auth on for clusters that find ~/.ray/auth_token; say the mode explicitly
    # (a cluster started with token auth needs RAY_AUTH_MODE=token exported by the user)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if local:
        # loopback is the contract of the embedded Ray, not a default (see init_local)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_TMPDIR", str(LOCAL_TMPDIR))


def local_tmpdir() -> Path:
    """Temp folder of the Rays we start: ``RAY_TMPDIR`` if exported, else ``LOCAL_TMPDIR``."""
    return Path(os.environ.get("RAY_TMPDIR") or LOCAL_TMPDIR)


def init_local(num_cpus: float, num_gpus: Optional[float] = None, log_to_driver: bool = True) -> None:
    """Start a Ray of our own on 127.0.0.1, never joining another one on the machine.

    ``address="local"`` matters: without it ``ray.init`` reads the "current cluster" file that any
    ``ray start --head`` leaves in the temp folder and joins (or fails against) that cluster.
    """
    prepare(local=True)
    import ray
    from ray._private import ray_constants

    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is imported. Imported before prepare()
    # (`from ray import tune` in the runner, an earlier test in the process), it swaps our 127.0.0.1
    # for the machine's external address, and GCS, raylet, agents and workers bind every interface
    # (measured: '::', '0.0.0.0', 192.0.2.x). services.get_node_ip_address reads this module constant
    # at call time, so it is set here for the driver; the processes Ray starts read the variable that
    # prepare() set.
    ray_constants.ENABLE_RAY_CLUSTER = False
    temp_dir = local_tmpdir()
    temp_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {} if num_gpus is None else {"num_gpus": num_gpus}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp_dir),
             _node_ip_address="127.0.0.1", log_to_driver=log_to_driver, **kwargs)


def _host_port(address: str) -> tuple[str, int]:
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise ClusterError(f"Ray address {address!r}: expected host:port, ray://host:port or auto")
    return parsed.hostname, parsed.port


def check_address(address: str, timeout: float = 3.0) -> None:
    """TCP-connect to a Ray GCS/client address; ``auto`` is left to Ray."""
    if address == "auto":
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterError(f"Ray address {address} is unreachable ({exc}); start the cluster "
                           f"(ray start --head) or unset NAS_SCAM_RAY_ADDRESS for a local Ray") from None


def check_dashboard(url: str, timeout: float = 5.0) -> None:
    """The job-submission endpoint (Ray dashboard) must answer before we submit."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/api/version", timeout=timeout) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ClusterError(f"Ray dashboard {url} is unreachable ({exc}); set NAS_SCAM_RAY_DASHBOARD "
                           f"to the head node's dashboard (default port 8265)") from None
