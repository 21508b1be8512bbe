"""The serving config: which model, how Ray Serve runs it, the request limits, and its command line.

    python -m serving.app --config serving/configs/serve.yaml --port 8080 --max-batch-size 4

Values come from the YAML file first, then from the flags (diffbir.config.parse_config); every
flag is a field. Dict and optional nested fields take JSON (`--defaults '{"steps": 25}'`).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffbir.captioning import CaptionerSettings
from diffbir.config import MATMUL_PRECISION_HELP, Dtype, MatmulPrecision
from diffbir.config import parse_config as _parse_config
from diffbir.faces import FaceConfig
from diffbir.pipeline import MAX_FACES, RestoreOptions

TOKEN_ENV = "DIFFBIR_SERVE_TOKEN"  # the bearer token when the config names none


class Autoscaling(BaseModel):
    """Ray Serve autoscaling on the number of requests each replica holds."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="requests per replica the autoscaler aims for")
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(300, ge=0)


class ServeConfig(CaptionerSettings):  # the captioner fields: a replica captions its batches with it
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
    matmul_precision: MatmulPrecision = Field("highest", description=MATMUL_PRECISION_HELP)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per replica (default: torch's choice)")
    defaults: dict[str, Any] = Field(default_factory=dict, description="RestoreOptions a request does not set (JSON)")
    faces: FaceConfig = Field(default_factory=FaceConfig, description="unaligned_face: detector, parser, face model")

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
    max_queued_requests: int = Field(
        64, ge=-1, description="requests waiting for a replica; beyond it 503 with Retry-After (-1: unbounded)"
    )
    retry_after_s: float = Field(5, ge=0, description="the Retry-After of a 503 for a full queue")
    graceful_shutdown_timeout_s: float = Field(
        120, ge=0, description="a replaced replica finishes its requests within this"
    )
    health_check_period_s: float = Field(10, gt=0, description="how often Serve asks a replica whether it is healthy")
    max_batch_size: int = Field(8, ge=1, description="requests restored together")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill")
    request_timeout_s: float = Field(
        300,
        gt=0,
        description="a request still unanswered after this gets 504 and its restoration stops; a replica whose "
        "model call outlives its deadline by this much again is unhealthy (Serve replaces it)",
    )
    text_context_cache_size: int = Field(64, ge=1, description="prompts whose text context a replica keeps (LRU)")
    max_held_pixels: int = Field(
        2**27,
        ge=1,
        description="decoded input + output pixels one replica holds at once (12 bytes each); beyond it 503",
    )

    # request limits: a refused request is a JSON 4xx before any restoration work
    max_body_bytes: int = Field(32 * 2**20, ge=1, description="request body size")
    max_input_pixels: int = Field(
        4096 * 4096, ge=1, description="input width x height, checked on the header before decoding"
    )
    max_output_pixels: int = Field(4096 * 4096, ge=1, description="output width x height (input x upscale)")
    max_work_pixels: int = Field(
        4096 * 4096, ge=1, description="width x height the restoration works at (the output raised to min_side)"
    )
    max_upscale: float = Field(8, gt=0, description="largest upscale a request may ask for")
    max_steps: int = Field(100, ge=1, description="most sampling steps a request may ask for")
    max_guidance_repeat: int = Field(5, ge=1, description="most guidance_repeat (decoder passes per guided step)")
    max_tile_size: int = Field(
        1024, ge=64, description="largest tile_size, and the largest working side restored untiled (tiled=false)"
    )
    max_tiles: int = Field(
        400, ge=1, description="most tiles over the working canvas (tile_size, tile_stride: each tile is a model call)"
    )
    max_prompt_chars: int = Field(1000, ge=0, description="longest prompt and negative_prompt")
    max_faces: int = Field(
        16, ge=0, le=MAX_FACES, description="most faces one unaligned_face request restores (max_faces)"
    )

    # access
    auth_token_file: str | None = Field(
        None, description=f"file holding the bearer token for /v1 (a mounted Secret); none: ${TOKEN_ENV}, else no auth"
    )
    insecure: bool = Field(False, description="serve on a non-loopback host without a token")
    api_docs: bool = Field(False, description="serve the interactive docs at /docs (Swagger UI, from a CDN)")

    @field_validator("defaults")
    @classmethod
    def _defaults_are_options(cls, v: dict) -> dict:
        RestoreOptions(**v)  # the same errors a request would get, at start-up
        return v

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least max_batch_size, or batches never fill")
        if self.max_held_pixels < self.max_input_pixels + self.max_output_pixels:
            raise ValueError("max_held_pixels must hold at least one request: max_input_pixels + max_output_pixels")
        if RestoreOptions(**self.defaults).max_faces > self.max_faces:
            raise ValueError("max_faces is below the requests' default: set defaults.max_faces to at most it")
        if self.autoscaling and self.autoscaling.max_replicas < self.autoscaling.min_replicas:
            raise ValueError("autoscaling.max_replicas must be at least min_replicas")
        return self

    def auth_token(self) -> str | None:
        """The bearer token: the first line of auth_token_file, else $DIFFBIR_SERVE_TOKEN, else none.
        Read where it is needed (each replica, on its node), so it never travels in a deployment's
        arguments or shows on a command line."""
        if self.auth_token_file:
            token = Path(self.auth_token_file).read_text().strip()
            if not token:
                raise ValueError(f"auth_token_file {self.auth_token_file} is empty")
            return token
        return os.environ.get(TOKEN_ENV) or None

    def check_exposure(self) -> None:
        """Refuse to serve on a non-loopback host without a token, unless `insecure` says so."""
        if self.insecure or _is_loopback(self.host) or self.auth_token():
            return
        raise ValueError(
            f"refusing to serve on {self.host} without a token: set auth_token_file or ${TOKEN_ENV}, or pass --insecure"
        )

    def for_replicas(self) -> ServeConfig:
        """Local paths made absolute for the replicas, which run in other processes (on other
        nodes, where these paths must exist too)."""
        absolute = lambda p: p and str(Path(p).resolve())  # noqa: E731
        local_model = not self.model_uri.startswith("models:/")
        return self.model_copy(
            update=dict(
                auth_token_file=absolute(self.auth_token_file),
                model_uri=absolute(self.model_uri) if local_model else self.model_uri,
                tracking_dir=absolute(self.tracking_dir),
                cache_dir=absolute(self.cache_dir),
                captioner=absolute(self.captioner),
                faces=self.faces.absolute(),
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
            backpressure_config={"status_code": 503, "retry_after_s": self.retry_after_s},
            graceful_shutdown_timeout_s=self.graceful_shutdown_timeout_s,
            health_check_period_s=self.health_check_period_s,
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def parse_config(argv: list[str] | None = None) -> ServeConfig:
    return _parse_config(ServeConfig, argv, "DiffBIR restoration API on Ray Serve", prog="python -m serving.app")
