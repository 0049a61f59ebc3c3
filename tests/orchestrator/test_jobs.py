"""orchestrator.jobs, the one door to Ray jobs: the job environment, what a submission sends, following a job.

A double stands in for Ray's JobSubmissionClient; the real one is exercised by test_cluster (--submit)
and tests/api/test_live.py (the API's jobs).
"""

import numpy as np
import pytest
import yaml

from orchestrator import jobs
from orchestrator.cli import main
from orchestrator.settings import Settings, get_settings
from tests.helpers import SMOKE, _free_port, _one_line_error


class FakeClient:
    """JobSubmissionClient as far as JobServer uses it: one job whose log grows each poll."""

    def __init__(self, statuses=("PENDING", "RUNNING", "SUCCEEDED"), fail: str = ""):
        self.submitted, self.statuses, self.fail, self.polls = [], list(statuses), fail, 0

    def submit_job(self, **kwargs):
        if self.fail:
            raise RuntimeError(self.fail)
        self.submitted.append(kwargs)
        return "raysubmit_1"

    def get_job_status(self, job_id):
        self.polls += 1
        return self.statuses[min(self.polls, len(self.statuses)) - 1]

    def get_job_logs(self, job_id):
        return "".join(f"line {i}\n" for i in range(self.polls))

    def get_job_info(self, job_id):
        raise RuntimeError(f"Job {job_id} does not exist")


@pytest.fixture
def env(monkeypatch):
    for var in ("NAS_SCAM_HOME", "NAS_SCAM_RUNS_DIR", "NAS_SCAM_DATA_DIR", "NAS_SCAM_MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NAS_SCAM_API_KEYS", "secret")
    monkeypatch.setenv("NAS_SCAM_RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("NAS_SCAM_PROGRESS", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("UNRELATED", "x")


def test_job_env_forwards_settings_but_never_the_api_keys_or_the_ray_address(env, tmp_path):
    plain = jobs.job_env()
    assert plain["NAS_SCAM_PROGRESS"] == "0" and plain["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert plain["RAY_AUTH_MODE"]  # explicit, whatever the cluster's default
    assert not {"NAS_SCAM_API_KEYS", "NAS_SCAM_RAY_ADDRESS", "UNRELATED", "NAS_SCAM_HOME"} & set(plain)
    # the API pins its jobs to its own stores, resolved, and to the run's folder
    settings = Settings(home=tmp_path / "home")
    pinned = jobs.job_env(settings, tmp_path / "run1")
    assert pinned["NAS_SCAM_HOME"] == str((tmp_path / "home").resolve())
    assert pinned["NAS_SCAM_RUNS_DIR"] == str(tmp_path / "run1")
    assert pinned["NAS_SCAM_MLFLOW_TRACKING_URI"] == settings.tracking_uri
    assert pinned["NAS_SCAM_DATA_DIR"] == str(settings.data_root.resolve())
    assert "NAS_SCAM_API_KEYS" not in pinned


def test_submit_sends_the_entrypoint_environment_and_resources(env):
    client = FakeClient()
    server = jobs.JobServer("http://127.0.0.1:1", client=client)
    job_id = server.submit(["run-spec", "/runs/api/x/spec.json"], {"A": "1"}, python="/opt/venv/bin/python",
                           submission_id="nas-scam-x", num_cpus=2, num_gpus=0)
    (sent,) = client.submitted
    assert job_id == "raysubmit_1"
    assert sent["entrypoint"] == "/opt/venv/bin/python -m orchestrator.cli run-spec /runs/api/x/spec.json"
    assert sent["runtime_env"] == {"env_vars": {"A": "1"}}
    assert (sent["submission_id"], sent["entrypoint_num_cpus"], sent["entrypoint_num_gpus"]) == ("nas-scam-x", 2, 0)
    assert "metadata" not in sent  # what is not given is left to Ray


def test_submit_uploads_a_working_folder_with_the_excludes(env, tmp_path):
    (tmp_path / "spec.yaml").write_text("name: x\n")
    client = FakeClient()
    jobs.JobServer("http://127.0.0.1:1", client=client).submit(["ablate", "spec.yaml"], {}, working_dir=tmp_path)
    (sent,) = client.submitted
    assert sent["runtime_env"]["working_dir"] == str(tmp_path)
    assert sent["runtime_env"]["excludes"] == jobs.UPLOAD_EXCLUDES and ".venv" in jobs.UPLOAD_EXCLUDES
    assert "submission_id" not in sent and "entrypoint_num_cpus" not in sent


def test_refusals_become_one_line_errors_that_name_the_dashboard(env, tmp_path):
    url = "http://127.0.0.1:1"
    too_big = jobs.JobServer(url, client=FakeClient(fail="Request failed with status code 413: too large"))
    with pytest.raises(jobs.JobError, match=r"refused the upload .* \(HTTP 413\); .*\.rayignore"):
        too_big.submit(["ablate", "spec.yaml"], {}, working_dir=tmp_path)
    broken = jobs.JobServer(url, client=FakeClient(fail="connection reset\ntraceback lines"))
    with pytest.raises(jobs.JobServerUnavailable, match=f"submitting to Ray at {url} failed: connection reset$"):
        broken.submit(["run-spec", "s.json"], {})
    with pytest.raises(jobs.JobNotFound, match="nas-scam-gone"):
        broken.info("nas-scam-gone")


def test_an_unreachable_dashboard_is_named(env, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = jobs.JobServer(f"http://127.0.0.1:{port}")
    with pytest.raises(jobs.JobServerUnavailable, match=f"Ray dashboard http://127.0.0.1:{port} is unreachable"):
        server.list()


def test_follow_prints_the_log_once_and_returns_the_final_status():
    client = FakeClient(statuses=("RUNNING", "RUNNING", "FAILED"))
    written = []
    status = jobs.JobServer("http://127.0.0.1:1", client=client).follow("raysubmit_1", poll_s=0, write=written.append)
    assert status == "FAILED"
    assert "".join(written) == "line 0\nline 1\nline 2\n"  # each line once, in order


# ---------------------------------------------------------------- --submit: the upload's size
def test_submit_checks_the_upload_size_and_names_what_to_exclude(home, tmp_path, monkeypatch, capsys):
    from orchestrator import jobs

    work = tmp_path / "work"
    (work / "scans").mkdir(parents=True)
    (work / "scans" / "slide.bin").write_bytes(np.random.default_rng(0).bytes(3 * 2**20))  # incompressible
    (work / "spec.yaml").write_text(yaml.safe_dump(SMOKE))
    monkeypatch.chdir(work)
    monkeypatch.setattr(jobs, "upload_limit", lambda: 2**20)
    monkeypatch.setenv("NAS_SCAM_RAY_DASHBOARD", f"http://127.0.0.1:{_free_port()}")
    get_settings.cache_clear()
    rc = main(["ablate", "spec.yaml", "--submit"])
    _one_line_error(capsys, rc, "over Ray's limit of 1 MiB", "scans (3.0 MiB)", ".rayignore")
    # excluded through .rayignore, the folder passes the check (and the unreachable dashboard is next)
    (work / ".rayignore").write_text("scans/\n")
    rc = main(["ablate", "spec.yaml", "--submit"])
    _one_line_error(capsys, rc, "is unreachable")
