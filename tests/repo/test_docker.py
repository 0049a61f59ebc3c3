"""docker/: the images and compose file read as text and YAML (no Docker engine on this machine).

Checks that what they reference exists, that their commands parse with the real CLIs (`nas-scam`,
`mlflow server`, `ray start`), that ports agree between commands, health checks, environment and
published ports, and that only loopback is published.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile.ray", "Dockerfile.api"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.startswith("[") else shlex.split(args)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def click_options(command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def flags(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


def check_command(argv: list[str]) -> None:
    """The command line parses with the CLI it names."""
    if argv[0] == "nas-scam":
        from nas_scam.cli import build_parser

        args = build_parser().parse_args(argv[1:])  # SystemExit on an unknown flag
        assert args.command == argv[1]
    elif argv[:2] == ["mlflow", "server"]:
        from mlflow.cli import server

        unknown = set(flags(argv)) - click_options(server)
        assert not unknown, f"mlflow server has no {unknown}"
    elif argv[:2] == ["ray", "start"]:
        from ray.scripts.scripts import start

        unknown = set(flags(argv)) - click_options(start)
        assert not unknown, f"ray start has no {unknown}"
    elif argv[:2] == ["ray", "status"]:
        pass
    else:
        raise AssertionError(f"unexpected command {argv}")


def opt(argv: list[str], name: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name:
            return argv[i + 1]
    raise KeyError(f"{name} not in {argv}")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_existing_paths_and_runs_the_cli(name):
    ins = instructions(DOCKER / name)
    assert ins[0][0] == "FROM"
    copies = [exec_form(a)[:-1] for op, a in ins if op == "COPY"]
    assert copies
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist in the build context"
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    for sources in copies:  # the per-Dockerfile ignore file must let every copied path through
        for src in sources:
            assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{name}.dockerignore hides {src}"
    (cmd,) = [exec_form(a) for op, a in ins if op == "CMD"]
    check_command(cmd)
    run = " ".join(a for op, a in ins if op == "RUN")
    assert "pip install ." in run and re.search(r"torch==\$\{TORCH_VERSION\}", run)
    env = " ".join(a for op, a in ins if op == "ENV")
    assert "RAY_AUTH_MODE=" in env  # explicit, never Ray's default


def test_ray_image_is_cuda_torch_and_api_image_cpu():
    ray_args = dict(a.split("=", 1) for op, a in instructions(DOCKER / "Dockerfile.ray") if op == "ARG" and "=" in a)
    api_args = dict(a.split("=", 1) for op, a in instructions(DOCKER / "Dockerfile.api") if op == "ARG" and "=" in a)
    assert "whl/cpu" not in ray_args["TORCH_INDEX"]  # PyPI's Linux wheels are the CUDA build
    assert api_args["TORCH_INDEX"].endswith("/whl/cpu")
    assert ray_args["TORCH_VERSION"] == api_args["TORCH_VERSION"]


def test_compose_commands_parse_with_the_real_clis(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "api"}
    for name, svc in services.items():
        if "command" in svc:
            check_command([str(a) for a in svc["command"]])
        test = svc.get("healthcheck", {}).get("test")
        assert test, f"{name} has no health check"
        if test[0] == "CMD" and test[1] in ("ray", "nas-scam", "mlflow"):
            check_command(test[1:])


def test_compose_ports_agree(compose):
    s = compose["services"]
    env = compose["x-nas-scam-env"]

    def published(svc: str) -> dict[int, str]:
        out = {}
        for p in s[svc].get("ports", []):
            host, hport, cport = p.split(":")
            out[int(cport)] = host
        return out

    def health_port(svc: str) -> int:
        return urlparse(re.search(r"http://[^']+", " ".join(s[svc]["healthcheck"]["test"])).group(0)).port

    api = [str(a) for a in s["api"]["command"]]
    assert int(opt(api, "--port")) == health_port("api") and int(opt(api, "--port")) in published("api")
    mlflow = [str(a) for a in s["mlflow"]["command"]]
    mlflow_port = int(opt(mlflow, "--port"))
    assert mlflow_port == health_port("mlflow") == urlparse(env["NAS_SCAM_MLFLOW_TRACKING_URI"]).port
    assert urlparse(env["NAS_SCAM_MLFLOW_TRACKING_URI"]).hostname == "mlflow"
    assert f"mlflow:{mlflow_port}" in opt(mlflow, "--allowed-hosts").split(",")
    head = [str(a) for a in s["ray-head"]["command"]]
    dash = int(opt(head, "--dashboard-port"))
    assert dash == health_port("ray-head") == urlparse(env["NAS_SCAM_RAY_DASHBOARD"]).port
    assert urlparse(env["NAS_SCAM_RAY_DASHBOARD"]).hostname == "ray-head"
    worker = [str(a) for a in s["ray-worker"]["command"]]
    assert opt(worker, "--address") == f"ray-head:{opt(head, '--port')}"
    pg = opt(mlflow, "--backend-store-uri")
    assert urlparse(pg).scheme == "postgresql" and urlparse(pg).hostname == "postgres" and urlparse(pg).port == 5432
    for svc in s:
        for cport, host in published(svc).items():
            assert host == "127.0.0.1", f"{svc} publishes {cport} beyond loopback"


def test_compose_wiring(compose):
    s = compose["services"]
    for name, svc in s.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in s and "healthcheck" in s[dep] and cond["condition"] == "service_healthy", (name, dep)
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if not src.startswith(("$", ".", "/")):
                assert src in compose["volumes"], f"{name} mounts undeclared volume {src}"
    devices = s["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert devices["driver"] == "nvidia" and "gpu" in devices["capabilities"]
    assert "ports" not in s["ray-worker"]  # scalable: no fixed host port
    home = "nas-scam-home:/var/lib/nas-scam"  # the API reads what the jobs write
    assert home in s["api"]["volumes"] and home in s["ray-head"]["volumes"] and home in s["ray-worker"]["volumes"]
    fields = set(Settings.model_fields)
    env = {**compose["x-nas-scam-env"], **s["api"]["environment"]}
    for key in env:
        if key.startswith("NAS_SCAM_"):
            assert key.removeprefix("NAS_SCAM_").lower() in fields, f"{key} is not a setting"
    assert "NAS_SCAM_API_KEYS:?" in (DOCKER / "compose.yaml").read_text()  # no default key


def test_docker_compose_config_when_available(monkeypatch):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed here (no engine either); the YAML tests above cover it")
    monkeypatch.setenv("NAS_SCAM_API_KEYS", "k")
    out = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
