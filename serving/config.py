"""The serving config: which model, how Ray Serve runs it, the request limits, and its command line.

    python -m serving.app --config serving/configs/serve.yaml --port 8080 --max-batch-size 4

Values come from the YAML file first, then from the flags (diffbir.config.parse_config); every
flag is a field. Dict and optional nested fields take JSON (`--defaults '{"steps": 25}'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffbir.config import Dtype
from diffbir.config import parse_config as _parse_config
from diffbir.pipeline import RestoreOptions

TOKEN_ENV = "DIFFBIR_SERVE_TOKEN"  # the bearer token when the config names none


class Autoscaling(BaseModel):
    """Ray Serve autoscaling on the number of requests each replica holds."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="requests per replica the autoscaler aims for")
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the model
    model_uri: str = Field(
        "models:/diffbir@champion",
        description="models:/<name>@<alias>, models:/<name>/<version> or a platform model directory",
    )
    tracking_dir: str = Field(
        "runs/mlflow", description="local MLflow store (MLFLOW_TRACKING_URI, where the app is built, wins)"
    )
    cache_dir: str | None = Field(
        None, description="downloaded versions (default $DIFFBIR_MODEL_CACHE or ~/.cache/diffbir/models)"
    )
    reload_interval_s: float = Field(
        60, ge=0, description="seconds between checks of the alias (0: only POST /v1/reload)"
    )
    device: str = Field("auto", description="torch device; auto: cuda when the replica has a GPU, else cpu")
    dtype: Dtype = "fp32"
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per replica (default: torch's choice)")
    defaults: dict[str, Any] = Field(default_factory=dict, description="RestoreOptions a request does not set (JSON)")

    # HTTP (for `python -m serving.app`; Serve's own config files say these in http_options) and Ray Serve
    host: str = Field("127.0.0.1", description="HTTP address of the Serve proxy")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy")
    app_name: str = Field("diffbir", description="Serve application name")
    route_prefix: str = Field("/", description="URL path the application answers under")
    num_replicas: int = Field(1, ge=1, description="fixed replica count (ignored when autoscaling is set)")
    autoscaling: Autoscaling | None = Field(None, description="autoscaling bounds (JSON); null: num_replicas")
    num_cpus: float = Field(1, ge=0, description="CPUs each replica reserves")
    num_gpus: float = Field(0, ge=0, description="GPUs each replica reserves (fractions share one)")
    max_ongoing_requests: int = Field(
        32, ge=1, description="requests one replica holds at once (at least max_batch_size)"
    )
    max_queued_requests: int = Field(-1, ge=-1, description="requests waiting for a replica before 503 (-1: unbounded)")
    graceful_shutdown_timeout_s: float = Field(
        120, ge=0, description="a replaced replica finishes its requests within this"
    )
    max_batch_size: int = Field(8, ge=1, description="requests restored together")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill")

    # request limits
    max_body_bytes: int = Field(32 * 2**20, ge=1, description="request body size")
    max_input_pixels: int = Field(
        4096 * 4096, ge=1, description="input width x height, checked on the header before decoding"
    )
    max_work_pixels: int = Field(
        4096 * 4096, ge=1, description="width x height the restoration works at (after upscale and min_side)"
    )
    max_steps: int = Field(100, ge=1, description="most sampling steps a request may ask for")
    auth_token: str | None = Field(None, description=f"bearer token for /v1 (default ${TOKEN_ENV}; none: no auth)")

    @field_validator("defaults")
    @classmethod
    def _defaults_are_options(cls, v: dict) -> dict:
        RestoreOptions(**v)  # the same errors a request would get, at start-up
        return v

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least max_batch_size, or batches never fill")
        if self.autoscaling and self.autoscaling.max_replicas < self.autoscaling.min_replicas:
            raise ValueError("autoscaling.max_replicas must be at least min_replicas")
        return self

    def for_replicas(self) -> ServeConfig:
        """What this process's environment and working directory say, fixed for the replicas,
        which run in other processes (on other nodes): the token from $DIFFBIR_SERVE_TOKEN when
        the config sets none, local paths made absolute."""
        absolute = lambda p: p and str(Path(p).resolve())  # noqa: E731
        local_model = not self.model_uri.startswith("models:/")
        return self.model_copy(
            update=dict(
                auth_token=self.auth_token or os.environ.get(TOKEN_ENV) or None,
                model_uri=absolute(self.model_uri) if local_model else self.model_uri,
                tracking_dir=absolute(self.tracking_dir),
                cache_dir=absolute(self.cache_dir),
            )
        )

    def deployment_options(self) -> dict:
        """Ray Serve deployment options."""
        scale = (
            {"autoscaling_config": self.autoscaling.model_dump()}
            if self.autoscaling
            else {"num_replicas": self.num_replicas}
        )
        return dict(
            **scale,
            ray_actor_options={"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            max_ongoing_requests=self.max_ongoing_requests,
            max_queued_requests=self.max_queued_requests,
            graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
        )


def parse_config(argv: list[str] | None = None) -> ServeConfig:
    return _parse_config(ServeConfig, argv, "DiffBIR restoration API on Ray Serve", prog="python -m serving.app")
