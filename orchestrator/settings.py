"""The one settings object: paths, URIs and addresses (env vars ``NAS_SCAM_*``, or a ``.env`` file).

Nothing writes into the current directory unless a setting says so; everything lives under ``home``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NAS_SCAM_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".nas-scam",
                       description="root of every output: data cache, runs, MLflow store")
    # None -> derived from home (see the properties below)
    data_dir: Optional[Path] = None
    runs_dir: Optional[Path] = None
    mlflow_tracking_uri: Optional[str] = None
    mlflow_artifacts_dir: Optional[Path] = None
    # Optuna studies of `nas-scam hpo` (one per HPO spec name); None -> sqlite under home. A server URL
    # (postgresql://..., mysql://...) shares them between machines; optuna-dashboard <url> shows them
    optuna_storage: Optional[str] = None
    # None -> start a local Ray on loopback; "auto" or "ray://host:10001" or "host:6379" -> attach
    ray_address: Optional[str] = None
    ray_dashboard: str = "http://127.0.0.1:8265"
    # CPUs of the local Ray head that `nas-scam serve` starts (None -> min(2, cores))
    ray_num_cpus: Optional[int] = Field(None, ge=1)
    # the interpreter Ray jobs run (`<python> -m orchestrator.cli run-spec ...`); None -> this one
    job_python: Optional[str] = None

    # ---- REST API (`nas-scam serve`) ----
    # NAS_SCAM_API_KEYS=key1,key2; empty -> every /v1 request is refused (401)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    # NAS_SCAM_DATA_ROOTS=/data/a,/data/b: folders a spec's data.source / genotype may point into
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_max_body_bytes: int = Field(16 * 2**20, ge=1024)  # request bodies, uploads included
    api_max_image_pixels: int = Field(4096 * 4096, ge=256)  # POST /predict
    api_max_cpu: float = Field(8.0, gt=0)  # per-trial resources a spec may ask for
    api_max_gpu: float = Field(8.0, ge=0)
    api_max_active_runs: int = Field(16, ge=1)  # queued + running runs at once
    # upper bounds on what one spec may ask of the cluster, checked on every trial config it expands
    # into (overrides and HPO spaces included); the CLI has no such bounds (a user's own machine)
    api_max_seeds: int = Field(100, ge=1)  # seeds per ablation
    # runs one ablation may expand into: methods x seeds x random draws x axes variants x folds
    api_max_trials: int = Field(1000, ge=1)
    api_max_samples: int = Field(1000, ge=1)  # HPO num_samples
    api_max_epochs: int = Field(1000, ge=1)  # search.epochs, train.epochs, HPO grace_period
    api_max_iters_per_epoch: int = Field(100_000, ge=1)
    api_max_synthetic_images: int = Field(1000, ge=3)
    api_max_synthetic_size: int = Field(4096, ge=16)  # pixels per side
    api_max_crop_size: int = Field(1024, ge=16)
    api_max_per_class: int = Field(64, ge=1)  # crops per class bucket in a batch
    api_max_workers: int = Field(16, ge=0)  # data.workers (loader processes per trial)
    # POST /predict: admitted at once (one runs, the rest wait; more -> 429) and the wall-clock limit of
    # one request, waiting included (the inference process is stopped when it passes)
    api_max_predictions: int = Field(4, ge=1)
    api_predict_timeout_s: float = Field(120.0, gt=0)

    @field_validator("api_keys", "data_roots", mode="before")
    @classmethod
    def _comma_list(cls, v):
        if isinstance(v, str):
            return [item.strip() for item in v.split(",") if item.strip()]
        return v

    @property
    def data_root(self) -> Path:
        return (self.data_dir or self.home / "data").expanduser()

    @property
    def runs_root(self) -> Path:
        return (self.runs_dir or self.home / "runs").expanduser()

    @property
    def synthetic_root(self) -> Path:
        return self.data_root / "synthetic"

    @property
    def cache_root(self) -> Path:
        return self.data_root / "cache"

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        db = (self.home / "mlflow" / "mlflow.db").expanduser()
        return f"sqlite:///{db}"

    @property
    def optuna_url(self) -> str:
        if self.optuna_storage:
            return self.optuna_storage
        return f"sqlite:///{(self.home / 'optuna' / 'optuna.db').expanduser()}"

    @property
    def allowed_data_roots(self) -> list[Path]:
        """Resolved folders that specs may read from: the configured roots, else ``data_root`` and ``runs_root``."""
        roots = self.data_roots or [self.data_root, self.runs_root]
        return [Path(r).expanduser().resolve() for r in roots]

    @property
    def api_home(self) -> Path:
        return self.home.expanduser() / "api"

    @property
    def artifacts_root(self) -> Path:
        return (self.mlflow_artifacts_dir or self.home / "mlflow" / "artifacts").expanduser()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
