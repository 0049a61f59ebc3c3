"""`nas-scam ui` stops the MLflow server it started, on SIGTERM and on SIGINT. Loopback only; every
process started here is stopped by its id."""

import signal

import pytest

from tests.helpers import _cli, _descendants, _free_port, _kill_tree, _stop_and_check, _wait_http


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_its_mlflow_server(tmp_path, sig):
    port = _free_port()
    log = tmp_path / "ui.log"
    proc = _cli(["ui", "--port", str(port)], {"NAS_SCAM_HOME": str(tmp_path / "home")}, log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, log, 120)
        children = _descendants(proc.pid)
        assert any("mlflow" in " ".join(p.cmdline()) for p in children), [p.cmdline() for p in children]
    except BaseException:
        _kill_tree(proc)
        raise
    _stop_and_check(proc, sig, children)
