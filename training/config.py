"""The typed training config both scripts extend, and its command line: one flag per field.

    python training/train_rm.py --config training/configs/rm_tiny.yaml --steps 200 --lr 2e-4

Values come from the YAML file first, then from the flags (diffbir.config.parse_config). Flags of
list fields take several values, dict fields JSON (`--lr-drops '{"50000": 1e-5}'`), nested sections
JSON or one flag per field (`--diffusion.parameterization v`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field

from diffbir.config import Dtype
from diffbir.metrics import MetricsConfig
from pipelines.config import Location
from pipelines.feed import FeedConfig, index_samples

ROOT = Path(__file__).resolve().parents[1]


class TrainConfig(FeedConfig):
    """What every training run sets. Batch sizes are per rank (per GPU)."""

    name: str = Field(description="run name: checkpoints go to <storage>/<name>; rerunning a name resumes it")
    storage: Location = Field(
        "runs/train", description="checkpoint storage: local directory or fsspec URL (shared by all nodes)"
    )
    experiment: str = Field("diffbir", description="MLflow experiment")
    tracking_dir: Location = Field(
        "runs/mlflow", description="local MLflow store (sqlite + artifacts); MLFLOW_TRACKING_URI wins when set"
    )
    tracking_outage_s: float = Field(
        3600.0,
        gt=0,
        description="how long rank 0 waits for an MLflow server that does not answer, at the end of the run; "
        "training goes on meanwhile, its metrics kept until the server is back",
    )
    register_as: str | None = Field(
        None, description="registered model name for the final model (empty or null: do not register)"
    )

    steps: int = Field(ge=1, description="optimizer steps in the whole run")
    batch_size: int = Field(ge=1, description="samples per rank per micro step")
    grad_accum: int = Field(1, ge=1, description="micro steps per optimizer step")
    lr: float = Field(1e-4, gt=0, description="learning rate")
    lr_drops: dict[int, float] = Field(
        default_factory=dict, description="piecewise-constant schedule: {step: lr from that step on}"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from 0 to lr")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    precision: Dtype = Field("bf16", description="training precision (CPU: fp32 or bf16; ZeRO 3 on CPU: fp32)")
    deepspeed_config: Location = Field(
        str(ROOT / "training/configs/ds_zero2.json"),
        description="base DeepSpeed JSON; the fields above override its batch, lr, clipping, ZeRO stage and precision",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an EMA of the trained weights (validated and exported instead of the raw weights)",
    )

    num_workers: int = Field(1, ge=1, description="training ranks (Ray Train workers)")
    use_gpu: bool = Field(False, description="one GPU per rank")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved by each rank")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how ranks are placed on nodes"
    )
    max_failures: int = Field(
        3, ge=-1, description="restarts from the last checkpoint after a worker failure (-1: unlimited)"
    )

    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints (and at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept in storage")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    val_every: int = Field(1000, ge=1, description="steps between validations (and at the end)")
    image_every: int = Field(5000, ge=1, description="steps between sample grids (and at the end)")
    val_data: Location | None = Field(None, description="held-out shards or images for validation (default: data)")
    val_samples: int = Field(4, ge=1, description="size of the fixed validation batch")
    val_metrics: MetricsConfig = Field(
        default_factory=MetricsConfig,
        description="metrics logged as val/<name>, computed as promotion computes them (learned ones: list "
        "them in names, their weight files in weights)",
    )

    def feed(self) -> FeedConfig:
        return FeedConfig(**self.model_dump(include=set(FeedConfig.model_fields)))

    def index(self) -> pa.Table:
        """The training samples (index_samples of data, paired with lq_data when given)."""
        return index_samples(self.data, self.lq_data, self.lq_scale)

    def val_index(self) -> pa.Table:
        """The validation samples: val_data's (paired when it has hq/ and lq/, or hq.*/lq.* members),
        else the training samples."""
        return index_samples(self.val_data, scale=self.lq_scale) if self.val_data else self.index()
