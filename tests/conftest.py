import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("NAS_SCAM_PROGRESS", "0")  # no progress bars in test logs

import torch  # noqa: E402

# 2-core machine: one intra-op thread keeps parallel test processes from oversubscribing
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _environ_as_the_test_found_it():
    """Each test ends with os.environ as it began: in-process code such as ray_env.prepare(local=True)
    exports variables (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, RAY_TMPDIR) that would otherwise reach the
    subprocesses of whichever test runs next, and make the suite depend on its order."""
    saved = dict(os.environ)
    yield
    # variable by variable, never clearing the whole environment (threads of a live server may read it)
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip with the reason when this machine does not have it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent on this machine")
    return SHARED_DATA


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """A fresh NAS_SCAM_HOME with no other NAS_SCAM_* location or cluster inherited from the shell."""
    from orchestrator.settings import get_settings

    monkeypatch.setenv("NAS_SCAM_HOME", str(tmp_path / "home"))
    for var in ("NAS_SCAM_MLFLOW_TRACKING_URI", "NAS_SCAM_RAY_ADDRESS", "NAS_SCAM_RUNS_DIR", "NAS_SCAM_DATA_DIR",
                "NAS_SCAM_RAY_DASHBOARD", "NAS_SCAM_RAY_NUM_CPUS"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


@pytest.fixture()
def ray_tmp():
    """A short temp folder for a Ray (AF_UNIX socket paths are limited to ~107 bytes), removed after."""
    path = Path(tempfile.mkdtemp(prefix="nsh-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
