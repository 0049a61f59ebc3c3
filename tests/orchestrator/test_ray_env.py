"""The embedded Ray (orchestrator.ray_env): a failed start leaves nothing that blocks a retry, and an
ablation beside a foreign head on the same machine starts a Ray of its own, on loopback. Loopback only;
every process started here is stopped by its group or its id."""

import ipaddress
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.settings import get_settings
from tests.helpers import SMOKE, _cli, _descendants, _free_port, _one_line_error


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_start_leaves_nothing_that_blocks_a_retry(home, tmp_path, ray_tmp, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("NAS_SCAM_RAY_NUM_CPUS", "1")
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    get_settings.cache_clear()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SMOKE, "resources": {"cpu": 2}}))  # more than the local Ray's 1 CPU
    for _ in range(2):  # the identical command again: the same error, not "pass --resume"
        _one_line_error(capsys, main(["ablate", str(spec)]), "exceed the cluster's CPU=1.0", after_ray_logs=True)
    assert not (home / "runs" / "hardening" / "ablation.json").exists()
    c = MlflowClient(f"sqlite:///{home}/mlflow/mlflow.db")
    exp = c.get_experiment_by_name("hardening")
    assert exp is None or not c.search_runs([exp.experiment_id])
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


@pytest.fixture()
def foreign_head(ray_tmp):
    """A `ray start --head` of someone else on this machine, in the temp folder our Ray uses, so its
    "current cluster" file lies where a plain ray.init() would find and join it. Stopped by its group."""
    from orchestrator.ray_head import ray_env_vars, ray_head_command, stop_process_group

    # every port free (none in 10002-19999): no clash with other Rays on the machine
    cmd = ray_head_command(_free_port(), 1, ray_tmp)
    port = next(a.split("=", 1)[1] for a in cmd if a.startswith("--port="))
    log = open(ray_tmp / "head.log", "wb")
    proc = subprocess.Popen(cmd, env={**ray_env_vars(), "RAY_TMPDIR": str(ray_tmp)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        current = ray_tmp / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not current.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, (ray_tmp / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"tmp": ray_tmp, "address": f"127.0.0.1:{port}"}
    finally:
        stop_process_group(proc)
        log.close()


@pytest.mark.slow
@pytest.mark.ray
def test_ablation_beside_a_foreign_head_is_its_own_and_listens_on_loopback(foreign_head, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SMOKE))
    log = tmp_path / "ablate.log"
    proc = _cli(["ablate", str(spec), "--no-model"],
                {"NAS_SCAM_HOME": str(tmp_path / "home"), "NAS_SCAM_RAY_NUM_CPUS": "1",
                 "RAY_TMPDIR": str(foreign_head["tmp"])}, log)
    listeners: dict[tuple[str, int], str] = {}
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            for p in [psutil.Process(proc.pid), *_descendants(proc.pid)]:
                try:
                    seen.setdefault(p.pid, p)
                    for c in p.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            listeners[(c.laddr.ip, c.laddr.port)] = p.name()
                except psutil.Error:
                    pass  # ended between listing and asking
            time.sleep(0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    out = log.read_text(errors="replace")
    assert proc.returncode == 0, out[-5000:]
    assert "Table 2" in out and "connecting to an existing cluster" not in out
    names = set(listeners.values())
    assert {"gcs_server", "raylet"} <= names, listeners  # we did see the ablation's own Ray
    wide = {addr: name for addr, name in listeners.items() if not _loopback(addr[0])}
    assert not wide, f"listening beyond loopback: {wide}"
    # the foreign head is untouched and still the machine's "current cluster"; nothing of ours is left
    assert (foreign_head["tmp"] / "ray_current_cluster").read_text().strip() == foreign_head["address"]
    # Ray's raylet ends its workers after the driver's shutdown, asynchronously: on a loaded machine a
    # worker can outlive the driver by seconds, so give them a bounded while before calling them left over
    _, alive = psutil.wait_procs([p for p in seen.values() if p.is_running()], timeout=60)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
