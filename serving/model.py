"""The model a replica serves, what one request of a batch brings it, the watchdog that
stops its restorations at their deadline, and the board its requests' progress is read from."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffbir.captioning import Caption, Captioner
from diffbir.pipeline import RestorationPipeline, RestoreOptions
from serving.config import ServeConfig
from training import registry


class DeadlineError(TimeoutError):
    """A restoration ran past the deadline of every request it was restoring."""


class Watchdog:
    """The deadline of the pipeline call running now. Every block of the model checks it before
    running, so a call past it stops within one block; a call still running `grace_s` after it
    is stuck inside one (a hung kernel) and makes the replica unhealthy."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.deadline = math.inf  # time.monotonic(); inf while no call runs

    def watch(self, pipeline: RestorationPipeline) -> None:
        for part in {pipeline.cldm, pipeline.stage1, pipeline.face_pipeline.stage1}:  # the face model's own stage 1
            for block in _blocks(part):
                block.register_forward_pre_hook(self._check)

    def _check(self, module: torch.nn.Module, args: tuple) -> None:
        if time.monotonic() > self.deadline:
            raise DeadlineError("the restoration ran past request_timeout_s")

    def hung(self) -> bool:
        return time.monotonic() > self.deadline + self.grace_s


def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """A model's parts and their direct blocks: fine enough to stop within a fraction of a step,
    coarse enough that the checks cost nothing next to the layers."""
    return [block for child in module.children() for block in (child, *child.children())]


@dataclass(frozen=True)
class ServedModel:
    pipeline: RestorationPipeline
    info: dict  # registry.version_info: name, version, alias, uri (the pinned version), run_id, tags
    loaded_at: float

    @property
    def version(self) -> str:
        return self.info["version"] or "local"

    @property
    def public_uri(self) -> str:
        return public_uri(self.info["uri"])

    def describe(self) -> dict:
        """What clients may know: no storage locations (the artifact source, the parts' files)."""
        info = {k: v for k, v in self.info.items() if k != "source"}
        parts = {name: {"config": part["config"]} for name, part in self.pipeline.model_info.items()}
        return {**info, "uri": self.public_uri, "version": self.version, "loaded_at": self.loaded_at, "parts": parts}


def public_uri(uri: str) -> str:
    """A registry URI as it is; a local directory by its name only (no server paths to clients)."""
    return uri if uri.startswith("models:/") else f"local:{Path(uri).name}"


def load_served_model(
    cfg: ServeConfig, info: dict, watchdog: Watchdog, captioner: Captioner | None = None
) -> ServedModel:
    """The version `info` pins (registry.version_info of cfg.model_uri), ready to restore under `watchdog`,
    with `captioner` (a reload keeps the one loaded: it does not change with the version) or cfg's."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = registry.resolve(info["uri"], cfg.cache_dir)
    pipeline = RestorationPipeline.from_pretrained(model_dir, device, cfg.dtype, cfg.matmul_precision)
    pipeline.context_cache_size = cfg.text_context_cache_size
    pipeline.captioner = captioner if captioner is not None else cfg.load_captioner(pipeline.device, pipeline.dtype)
    pipeline.configure_faces(cfg.faces)
    watchdog.watch(pipeline)
    return ServedModel(pipeline, info, time.time())


def restore_isolated(
    pipeline: RestorationPipeline,
    images: Sequence[np.ndarray],
    options: Sequence[RestoreOptions],
    progress: Callable[[list[int], int, int], None] | None = None,
    captions: Sequence[Caption] | None = None,
) -> list[np.ndarray | Exception]:
    """RestorationPipeline.restore_grouped, and every image of a group that failed restored again
    alone (with the caption it had): one bad request never fails its batch mates (a deadline fails
    them all: no retry)."""
    captions = captions if captions is not None else pipeline.caption(images, options)
    results = pipeline.restore_grouped(images, options, progress, captions)
    for members in pipeline.canvas_groups(images, options):
        failure = results[members[0]]
        if len(members) > 1 and isinstance(failure, Exception) and not isinstance(failure, DeadlineError):
            for i in members:
                alone = (lambda _, done, total, i=i: progress([i], done, total)) if progress else None
                results[i] = pipeline.restore_grouped([images[i]], [options[i]], alone, [captions[i]])[0]
    return results


class ProgressBoard:
    """Where each request that brought an id (X-Request-Id) stands: {"stage", "steps_done",
    "steps_total"}, stage one of queued, restoring, encoding, done, failed. It holds the last
    `size` ids (the oldest dropped first) and is the replica's own: with several replicas a
    client may ask one that never saw its request (it answers 404, as for an id dropped)."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._entries: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()  # the sampling thread writes while the event loop reads

    def set(
        self, request_id: str | None, stage: str, steps_done: int | None = None, steps_total: int | None = None
    ) -> None:
        """Move `request_id` (None: a request without one) to `stage`; steps not given stay as they were."""
        if request_id is None:
            return
        with self._lock:
            entry = self._entries.pop(request_id, {"steps_done": 0, "steps_total": 0})
            steps = {k: v for k, v in (("steps_done", steps_done), ("steps_total", steps_total)) if v is not None}
            self._entries[request_id] = {**entry, "stage": stage, **steps}
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def get(self, request_id: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(request_id)
            return dict(entry) if entry else None

    def reporter(self, request_ids: Sequence[str | None]) -> Callable[[list[int], int, int], None]:
        """restore_isolated's progress for a batch whose image i is request_ids[i]'s."""

        def report(members: list[int], done: int, total: int) -> None:
            for i in members:
                self.set(request_ids[i], "restoring", done, total)

        return report


@dataclass(frozen=True)
class Job:
    image: np.ndarray  # RGB float32 (H, W, 3) in [0, 1]
    options: RestoreOptions  # its seed is the image's own (RestorationPipeline.restore_grouped)
    deadline: float  # time.monotonic() after which its request is answered 504
    request_id: str | None = None  # the client's X-Request-Id: its progress is kept under it


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
