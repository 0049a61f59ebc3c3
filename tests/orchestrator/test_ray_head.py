"""orchestrator.ray_head: a Ray head that fails to start is reported with the reason from its log."""

import subprocess

import pytest

from tests.helpers import _free_port


def test_a_failed_ray_start_quotes_the_reason_from_its_log(tmp_path):
    from orchestrator.ray_env import ClusterError
    from orchestrator.ray_head import wait_dashboard

    log = tmp_path / "ray-head.log"
    log.write_text("an earlier run's line: RuntimeError: old\n")
    start = log.stat().st_size
    with open(log, "ab") as f:
        proc = subprocess.Popen(["sh", "-c", "echo 'Local node IP: 127.0.0.1'; "
                                 "echo 'ValueError: Ray component dashboard failed to bind port 15234'; exit 1"],
                                stdout=f, stderr=subprocess.STDOUT)
    proc.wait(10)
    with pytest.raises(ClusterError) as info:
        wait_dashboard(f"http://127.0.0.1:{_free_port()}", proc, timeout=30, log=log, log_start=start)
    msg = str(info.value)
    assert "status 1: ValueError: Ray component dashboard failed to bind port 15234" in msg and str(log) in msg
    assert "old" not in msg
