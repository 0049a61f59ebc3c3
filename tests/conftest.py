import os
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
