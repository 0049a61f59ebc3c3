"""The suite's own conftest: what one test exports to os.environ does not reach the next."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_what_one_test_exports_does_not_reach_the_next(tmp_path):
    """The suite's conftest restores os.environ after each test: a shuffled full suite once gave the
    two-node cluster fixture the RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 that an earlier in-process
    ray_env.prepare(local=True) had exported, and the worker node's `ray start` refused to join."""
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_pair.py").write_text(
        "import os\n"
        "from orchestrator import ray_env\n"
        "def test_1_prepares_the_embedded_ray():\n"
        "    ray_env.prepare(local=True)\n"
        "    assert os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] == '0' and 'RAY_TMPDIR' in os.environ\n"
        "def test_2_starts_from_the_shell_environment():\n"
        "    assert 'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER' not in os.environ and 'RAY_TMPDIR' not in os.environ\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_TMPDIR")}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                          "test_pair.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "2 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
