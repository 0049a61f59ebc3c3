"""GET /v1/runs/{id}/logs is for machines: plain text, no ANSI colours, no tqdm carriage-return frames."""
import time

from fastapi.testclient import TestClient

from api.main import create_app
from api.service import RunService
from api.store import RunRecord
from orchestrator.settings import Settings

RAW = ("\x1b[36m(ablation_trial pid=7)\x1b[0m train 1/4:  50%|#####     | 4/8\r"
       "\x1b[36m(ablation_trial pid=7)\x1b[0m train 1/4: 100%|##########| 8/8\n"
       "finished  full__unet__seed0 in 4s: test DSC 14.72% | 1/4 full trials done\n")


class StubService(RunService):
    def get(self, run_id, refresh=True):
        return RunRecord(id=run_id, kind="ablation", experiment="smoke", spec={}, status="running",
                         submission_id=f"nas-scam-{run_id}", run_dir="/nonexistent", created_at=time.time())

    def logs(self, run_id, tail=65536):
        return RAW


def test_logs_route_serves_plain_text(tmp_path):
    settings = Settings(home=tmp_path / "home", api_keys=["k"])
    with TestClient(create_app(settings, service=StubService(settings))) as client:
        body = client.get("/v1/runs/abc123/logs", headers={"X-API-Key": "k"}).json()
    assert body["logs"] == ("(ablation_trial pid=7) train 1/4: 100%|##########| 8/8\n"
                            "finished  full__unet__seed0 in 4s: test DSC 14.72% | 1/4 full trials done\n")
