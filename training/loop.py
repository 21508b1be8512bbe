"""The loop every training rank runs (a Ray Train worker), for the RM and the GM alike.

DeepSpeed owns the trained module: optimizer, ZeRO partitioning, bf16, gradient accumulation
and clipping, and its checkpoint. The task (train_rm.RMTask, train_gm.GMTask) says what the
module is, its loss, its validation and what the final model holds. Rank 0 logs to MLflow.

A checkpoint is one directory per step in Ray Train's storage: DeepSpeed's files (each rank
writes its optimizer shard; Ray merges the ranks' directories), each rank's noise generator,
the EMA, and data.json: the step, the world size and the data position (how far into its sample
stream every rank is), so a restored run draws the same batches and the same noise it would have
drawn. A resumed run may change batch_size or grad_accum: each rank continues its stream at the
saved position, whatever the batches it is cut into. It may not change the world size: the ranks'
streams, noise generators and ZeRO optimizer shards belong to one rank each (ResumeError).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import queue
import resource
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

import deepspeed
import fsspec
import numpy as np
import ray
import ray.train
import ray.train.torch
import requests
import torch
import torch.distributed as dist
from mlflow import MlflowClient
from mlflow.entities import Metric as MlflowMetric
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.time import get_current_time_millis
from torch import nn
from torchvision.utils import make_grid

from diffbir.checkpoints.platform import save_model_dir
from diffbir.config import DiffusionConfig
from diffbir.metrics import Metric, MetricsConfig, build_metric
from diffbir.pipeline import DTYPES
from pipelines.feed import rank_batches, validation_batch
from training.config import TrainConfig

DS_TAG = "deepspeed"  # DeepSpeed's sub-directory in each checkpoint
DATA_STATE = "data.json"  # step, world size and data position, in each checkpoint
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 15.0  # the tracker's back-off while MLflow is unreachable
log = logging.getLogger(__name__)


class ResumeError(Exception):
    """A checkpoint this run cannot continue from exactly."""


class Task(Protocol):
    config_cls: type[TrainConfig]
    diffusion: DiffusionConfig  # the schedule the exported model declares

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None: ...

    def trainable(self) -> nn.Module:
        """The module DeepSpeed trains (frozen parts stay outside it)."""

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor: ...

    def validate(self, model: nn.Module, batch: dict) -> tuple[dict[str, float], list[torch.Tensor]]:
        """Metrics and the grid's columns ((N,3,H,W) images in [0, 1]: LQ, ..., HQ)."""

    def export(self, model: nn.Module) -> dict[str, tuple[nn.Module, dict]]:
        """The final model's parts, for save_model_dir."""


def train_loop_per_worker(args: dict) -> None:
    module_name, cls_name = args["task"].split(":")
    task_cls = getattr(importlib.import_module(module_name), cls_name)
    cfg: TrainConfig = task_cls.config_cls(**args["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    task = task_cls(cfg, device)
    trainable = task.trainable()
    engine, _, _, _ = deepspeed.initialize(
        model=trainable,
        model_parameters=[p for p in trainable.parameters() if p.requires_grad],
        config=args["deepspeed"],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, cfg)),
    )
    ema = EMA(engine, cfg.ema_decay) if cfg.ema_decay else None
    # all training noise (timesteps, eps, VAE posterior samples) comes from here
    generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + rank)

    step, position = 0, 0  # position: the next sample of this rank's stream
    if checkpoint := ray.train.get_checkpoint():
        step, position = restore(checkpoint, engine, ema, generator, rank, world)
    resumed_from = step

    per_step = cfg.batch_size * cfg.grad_accum  # samples per rank per step
    # the index travels as an ObjectRef: each data task reads the one shared copy
    batches = rank_batches(
        cfg.feed(),
        args["index"],
        rank,
        world,
        cfg.batch_size,
        start=position,
        count=(cfg.steps - step) * per_step,
    )
    tracker = Tracker(args["tracking_uri"], args["run_id"], cfg.tracking_outage_s) if rank == 0 else None
    val_batch = validation_batch(cfg.feed(), ray.get(args["val_index"]), cfg.val_samples) if rank == 0 else None
    val_metrics: dict[str, float] = {}

    window_start, waited, window_steps, loss_sum = time.perf_counter(), 0.0, 0, torch.zeros((), device=device)
    while step < cfg.steps:
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t0
            position = int(batch["position"][-1]) + 1
            loss = task.loss(engine, batch, generator)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer and scheduler at the accumulation boundary
            loss_sum += loss.detach().float()
        step += 1
        window_steps += 1
        if ema is not None:
            ema.update(engine)

        last = step == cfg.steps
        log_now = step % cfg.log_every == 0 or last
        images_now = step % cfg.image_every == 0 or last
        val_now = step % cfg.val_every == 0 or images_now
        checkpoint_now = step % cfg.checkpoint_every == 0 or last
        metrics: dict[str, float] = {}
        if log_now:
            elapsed = time.perf_counter() - window_start
            loss_mean = loss_sum / (window_steps * cfg.grad_accum)
            if world > 1:
                dist.all_reduce(loss_mean)
                loss_mean /= world
            metrics = {
                "train/loss": loss_mean.item(),
                "train/lr": engine.get_lr()[0],
                "train/samples_per_s": world * per_step * window_steps / elapsed,
                "train/data_wait_s": waited / window_steps,
                "train/data_wait_frac": waited / elapsed,
                "train/peak_memory_mb": peak_memory_mb(device),
                "train/resumed_from": resumed_from,  # the checkpoint step this worker group started at
                "train/data_position": position,  # samples of its stream each rank has consumed
            }
        if val_now:
            with full_weights(engine, ema):
                if rank == 0:
                    val_metrics, columns = task.validate(engine.module, val_batch)
                    metrics |= val_metrics
                    if images_now:
                        tracker.image(columns, step)
        if tracker is not None and metrics:
            tracker.log(metrics, step)
        # every rank reports at the same steps: ray.train.report is a barrier
        if checkpoint_now:
            data_state = {"step": step, "world_size": world, "position": position}
            save_and_report(engine, ema, generator, rank, data_state, metrics | val_metrics)
        elif log_now or val_now:
            ray.train.report(metrics | {"step": step})
        if log_now:  # the next window times training only, not validation or checkpoints
            window_start, waited, window_steps, loss_sum = time.perf_counter(), 0.0, 0, torch.zeros((), device=device)

    with full_weights(engine, ema):
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_model_dir(Path(tmp) / "model", task.export(engine.module), diffusion=task.diffusion)
                publish(Path(tmp) / "model", f"{cfg.storage}/{cfg.name}/model")
                tracker.model(Path(tmp) / "model")
    if tracker is not None:
        tracker.close()


def publish(model_dir: Path, url: str) -> None:
    """The final model also goes beside the checkpoints, a stable path for the next stage
    (GM's stage1_weights: <storage>/<rm run>/model). The new model is uploaded beside the old one
    first and swapped in only once complete: a failed upload leaves the old model in place."""
    fs, path = fsspec.core.url_to_fs(url)
    suffix = uuid.uuid4().hex[:8]
    staging, retired = f"{path}.new-{suffix}", f"{path}.old-{suffix}"
    try:
        fs.put(f"{model_dir}/", staging, recursive=True)
    except BaseException:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        raise
    # renames on a local or shared POSIX disk: the path is without a model for an instant only
    # (object stores copy instead: longer, but the new model is complete before the old goes)
    if fs.exists(path):
        fs.mv(path, retired, recursive=True)
    fs.mv(staging, path, recursive=True)
    if fs.exists(retired):
        fs.rm(retired, recursive=True)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Multiplier of cfg.lr after `step` optimizer steps: warm-up, then the piecewise schedule."""
    lr = cfg.lr
    for at, value in sorted(cfg.lr_drops.items()):
        if step >= at:
            lr = value
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warmup * lr / cfg.lr


def autocast(precision: str, device: torch.device):
    """Mixed precision for the tasks' forward passes: DeepSpeed casts the trained module to
    bf16/fp16, autocast casts what meets it (fp32 frozen parts, masks built on the fly)."""
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class ValMetrics:
    """The run's val_metrics (diffbir.metrics, as promotion scores them), built on first use: only
    rank 0 validates, and a learned metric's network is loaded once."""

    def __init__(self, cfg: MetricsConfig, device: torch.device):
        self.cfg, self.device = cfg, device

    @functools.cached_property
    def metrics(self) -> list[Metric]:
        return [build_metric(name, self.cfg, self.device) for name in self.cfg.names]

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, suffix: str = "") -> dict[str, float]:
        """{"val/<name><suffix>": mean over the batch} of (N,3,H,W) images in [0, 1]."""
        return {
            f"val/{m.name}{suffix}": m(pred, target if m.kind == "fr" else None).mean().item() for m in self.metrics
        }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# Weights: ZeRO-3 gathering and the EMA


def gathered(engine):
    """Full parameters on every rank for the duration (ZeRO-3 partitions them; a no-op below)."""
    return deepspeed.zero.GatheredParameters(
        list(engine.module.parameters()), enabled=engine.zero_optimization_stage() == 3
    )


@contextlib.contextmanager
def full_weights(engine, ema: EMA | None):
    """The weights to validate and export: gathered, with the EMA swapped in if there is one.
    Collective under ZeRO-3: every rank enters."""
    with gathered(engine), ema.swapped(engine.module) if ema else contextlib.nullcontext():
        yield


class EMA:
    """An fp32 exponential moving average of the trained parameters, the same on every rank."""

    def __init__(self, engine, decay: float):
        self.decay = decay
        with gathered(engine):
            self.shadow = {
                n: p.detach().float().clone() for n, p in engine.module.named_parameters() if p.requires_grad
            }

    @torch.no_grad()
    def update(self, engine) -> None:
        with gathered(engine):
            for n, p in engine.module.named_parameters():
                if n in self.shadow:
                    self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self, module: nn.Module):
        params = dict(module.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, v in self.shadow.items():
                params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, v in state.items():
            self.shadow[n].copy_(v)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_and_report(
    engine, ema: EMA | None, generator: torch.Generator, rank: int, data_state: dict, metrics: dict
) -> None:
    """Every rank writes its part into a local directory; ray.train.report uploads and merges
    them into <storage>/<name>/checkpoint_<step>, registered only once all ranks are done."""
    step = data_state["step"]
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step})
        torch.save({"generator": generator.get_state()}, f"{tmp}/rng_rank{rank}.pt")
        if rank == 0:
            Path(tmp, DATA_STATE).write_text(json.dumps(data_state))
            if ema is not None:
                torch.save(ema.state_dict(), f"{tmp}/ema.pt")
        ray.train.report(
            metrics | {"step": step},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def restore(
    checkpoint: ray.train.Checkpoint, engine, ema: EMA | None, generator: torch.Generator, rank: int, world: int
) -> tuple[int, int]:
    """Model, optimizer, scheduler (DeepSpeed), noise generator and EMA; returns the step and
    the data position. Refuses (ResumeError) a checkpoint of another world size."""
    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, DATA_STATE).read_text())
        if state["world_size"] != world:
            raise ResumeError(
                f"{checkpoint.path} was written by {state['world_size']} ranks, this run has {world}: "
                "each rank's data stream, noise generator and ZeRO optimizer shard belong to one rank of "
                f"that world, so its data position cannot be mapped exactly. Resume with "
                f"num_workers={state['world_size']}, or start a new run name from its model"
            )
        engine.load_checkpoint(d, tag=DS_TAG)
        generator.set_state(torch.load(f"{d}/rng_rank{rank}.pt", weights_only=True)["generator"])
        if ema is not None:
            ema.load_state_dict(torch.load(f"{d}/ema.pt", weights_only=True))
    return state["step"], state["position"]


# ---------------------------------------------------------------------------------------------
# MLflow (rank 0)


class TrackingError(Exception):
    """Rank 0 could not hand the run's record (metrics, images, model) to MLflow."""


class Tracker:
    """Rank 0's MLflow logging, made by a background thread that keeps every call until the
    server has taken it: an outage of the tracking server neither stops nor stalls training, and
    once the server is back the backlog arrives in order, with the metrics' own timestamps.

    MLflow's client retries each HTTP request itself (MLFLOW_HTTP_REQUEST_MAX_RETRIES with
    exponential back-off, about 4 minutes by default), which covers blips; but it blocks the
    caller meanwhile, and when its retries run out the call raises and its data is gone, which on
    the training thread kills rank 0. Hence this queue and the retry loop around MLflow's calls.
    model() and close() wait for the backlog, `outage_s` at most, then fail the run rather than
    end it with an incomplete record.
    """

    def __init__(self, tracking_uri: str, run_id: str, outage_s: float):
        self.client, self.run_id, self.outage_s = MlflowClient(tracking_uri), run_id, outage_s
        self.calls: queue.Queue = queue.Queue()
        self.error: Exception | None = None  # the first call MLflow refused (not an outage)
        self.system: SystemMetricsMonitor | None = None
        threading.Thread(target=self._drain, name="mlflow-tracker", daemon=True).start()
        self.calls.put(self._start_system_metrics)  # it asks the server for the run: not on this thread

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = get_current_time_millis()
        batch = [MlflowMetric(k, float(v), now, step) for k, v in metrics.items()]
        self.calls.put(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def image(self, columns: list[torch.Tensor], step: int) -> None:
        """One row per validation sample: LQ | ... | HQ."""
        tiles = torch.stack(columns, dim=1).flatten(0, 1).float().clamp(0, 1)
        grid = make_grid(tiles, nrow=len(columns), padding=2)
        pixels = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        self.calls.put(lambda: self.client.log_image(self.run_id, pixels, artifact_file=f"images/step_{step:08d}.png"))

    def model(self, model_dir: Path) -> None:
        """Upload the final model; returns once it is uploaded (the caller then deletes model_dir)."""
        self.calls.put(lambda: self.client.log_artifacts(self.run_id, str(model_dir), "model"))
        self._wait()

    def close(self) -> None:
        self._wait()
        self.calls.put(None)
        if self.system is not None:
            self.system.finish()

    def _start_system_metrics(self) -> None:
        # MLflow's monitor samples every 10 s on its own thread; it stops at its first failed request
        self.system = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.client.tracking_uri)
        self.system.start()

    def _wait(self) -> None:
        """Until every call made so far has reached MLflow, `outage_s` at most."""
        done = threading.Event()
        self.calls.put(done.set)
        if not done.wait(self.outage_s):
            raise TrackingError(
                f"MLflow at {self.client.tracking_uri} has not answered for {self.outage_s:.0f} s "
                f"(tracking_outage_s); {self.calls.qsize()} calls are not logged"
            )
        if self.error is not None:
            raise TrackingError(f"MLflow refused a call of this run: {self.error}") from self.error

    def _drain(self) -> None:
        while (call := self.calls.get()) is not None:
            self._until_done(call)

    def _until_done(self, call) -> None:
        delay = RETRY_FIRST_S
        while True:
            try:
                call()
                return
            except Exception as e:  # noqa: BLE001 -- sorted below: an outage is retried, the rest kept for close()
                if not _unreachable(e):
                    self.error = self.error or e
                    return
                waiting = self.calls.qsize()
                log.warning("MLflow unreachable, retrying in %.0f s (%d calls waiting): %s", delay, waiting, e)
                time.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)


def _unreachable(e: Exception) -> bool:
    """An outage (no connection, a timeout, a 5xx or 429 after MLflow's own retries), as opposed
    to a request MLflow refuses."""
    if isinstance(e, MlflowException):
        return e.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
    return isinstance(e, (OSError, requests.RequestException))
