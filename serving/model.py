"""The model a replica serves, and what one request of a batch brings it."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from diffbir.pipeline import RestorationPipeline, RestoreOptions
from serving.config import ServeConfig
from training import registry


@dataclass(frozen=True)
class ServedModel:
    pipeline: RestorationPipeline
    info: dict  # registry.version_info: name, version, alias, uri (the pinned version), run_id, tags
    loaded_at: float

    @property
    def version(self) -> str:
        return self.info["version"] or "local"

    def describe(self) -> dict:
        return {**self.info, "version": self.version, "loaded_at": self.loaded_at, "parts": self.pipeline.model_info}


def load_served_model(cfg: ServeConfig, info: dict) -> ServedModel:
    """The version `info` pins (registry.version_info of cfg.model_uri), ready to restore."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = registry.resolve(info["uri"], cfg.cache_dir)
    return ServedModel(RestorationPipeline.from_pretrained(model_dir, device, cfg.dtype), info, time.time())


@dataclass(frozen=True)
class Job:
    image: np.ndarray  # RGB float32 (H, W, 3) in [0, 1]
    options: RestoreOptions  # its seed is the image's own (RestorationPipeline.restore_grouped)


@dataclass
class BatchStats:
    """What one replica has restored: the batch sizes it saw, pipeline calls and time; and how
    many requests it is restoring now."""

    batch_sizes: Counter = field(default_factory=Counter)
    pipeline_calls: int = 0
    seconds: float = 0.0
    restoring: int = 0

    def record(self, size: int, groups: int, seconds: float) -> None:
        self.batch_sizes[size] += 1
        self.pipeline_calls += groups
        self.seconds += seconds

    def summary(self) -> dict:
        requests = sum(size * n for size, n in self.batch_sizes.items())
        batches = sum(self.batch_sizes.values())
        return dict(
            requests=requests,
            batches=batches,
            pipeline_calls=self.pipeline_calls,
            mean_batch_size=requests / batches if batches else 0.0,
            batch_sizes={str(size): n for size, n in sorted(self.batch_sizes.items())},
            restore_seconds=round(self.seconds, 3),
            restoring=self.restoring,
        )
