"""Helpers that several test files share: a free loopback port, a CLI error that must be one line, a
smoke ablation spec, `nas-scam` started as a process whose every child is stopped by its id, waiting for
a URL, and the error-shape check of the API fuzzers."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

SMOKE = {"name": "hardening", "methods": ["unet"], "seeds": 1, "preset": "smoke",
         "epochs": {"search": 1, "warmup": 0, "train": 1, "search_iters": 1, "train_iters": 1},
         "data": {"synthetic_images": 4, "synthetic_size": 64, "crop_size": 32, "stride": 32},
         "resources": {"cpu": 1}}


def _free_port() -> int:
    # the kernel's ephemeral range (32768+ on Linux) lies outside Ray's worker ports 10002-19999
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(capsys, rc: int, *words: str, after_ray_logs: bool = False) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    if after_ray_logs:  # Ray's own INFO lines ("Started a local Ray instance") come first
        err = err.splitlines()[-1]
        assert err.startswith("nas-scam "), err
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_http(url: str, proc: subprocess.Popen | None, log: Path | None, timeout: float) -> None:
    """Wait until ``url`` answers; with ``proc`` (and its ``log``), fail at once if the process ended."""
    import urllib.request

    def tail() -> str:
        return log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc is None or proc.poll() is None, tail()
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s: {tail()}")


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a command and every process it started (a test that failed half-way leaves nothing running)."""
    for p in _descendants(proc.pid):
        p.kill()
    proc.kill()


def error_shape_problems(label: str, path: str, resp) -> list[str]:
    """What a fuzzed response did wrong: a 5xx other than 503, or an error body not shaped
    ``{"error": {"code", "message", ...}}`` (``/readyz`` answers 503 with its own body)."""
    where = f"{label} -> {resp.status_code}: {resp.text[:300]}"
    problems = []
    if resp.status_code >= 500 and resp.status_code != 503:
        problems.append(where)
    if resp.status_code >= 400 and path != "/readyz":
        body = resp.json()
        if set(body) != {"error"} or not {"code", "message"} <= set(body["error"]):
            problems.append("error shape: " + where)
    return problems


def _eventually(condition, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    """Wait for ``condition()`` until a deadline: a loaded machine is late, never a moment to assert."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _stop_and_check(proc: subprocess.Popen, sig: int, children: list[psutil.Process]) -> None:
    """Send ``sig`` to the command alone (as `kill` or a terminal's Ctrl-C would reach it), then every
    process it started must be gone; whatever survives is killed by its id and fails the test."""
    try:
        proc.send_signal(sig)
        proc.wait(60)
        _, alive = psutil.wait_procs(children, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        leftovers = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in leftovers:
            p.kill()
    assert not alive, f"left running after {signal.Signals(sig).name}: {[(p.pid, p.name()) for p in alive]}"


def _cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "NAS_SCAM_PROGRESS": "0", "RAY_AUTH_MODE": "disabled", **env}
    for var in ("NAS_SCAM_RAY_ADDRESS", "NAS_SCAM_MLFLOW_TRACKING_URI"):  # a cluster the shell may name
        env.pop(var, None)
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "nas_scam.cli", *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
