"""The loop every training rank runs (a Ray Train worker), for the RM and the GM alike.

DeepSpeed owns the trained module: optimizer, ZeRO partitioning, bf16, gradient accumulation
and clipping, and its checkpoint. The task (train_rm.RMTask, train_gm.GMTask) says what the
module is, its loss, its validation and what the final model holds. Rank 0 logs to MLflow.

A checkpoint is one directory per step in Ray Train's storage: DeepSpeed's files (each rank
writes its optimizer shard; Ray merges the ranks' directories), each rank's noise generator,
and the EMA. The data position is the step (every rank consumes batch_size * grad_accum samples
per step), so a restored run draws the same batches and the same noise it would have drawn.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import resource
import tempfile
import time
from pathlib import Path
from typing import Protocol

import deepspeed
import fsspec
import mlflow
import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torchvision.utils import make_grid

from diffbir.checkpoints.platform import save_model_dir
from diffbir.config import DiffusionConfig
from diffbir.metrics import Metric, MetricsConfig, build_metric
from diffbir.pipeline import DTYPES
from pipelines.feed import rank_batches, validation_batch
from training.config import TrainConfig

DS_TAG = "deepspeed"  # DeepSpeed's sub-directory in each checkpoint


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

    step = 0
    if checkpoint := ray.train.get_checkpoint():
        step = restore(checkpoint, engine, ema, generator, rank)
    resumed_from = step

    per_step = cfg.batch_size * cfg.grad_accum  # samples per rank per step
    # the index travels as an ObjectRef: each data task reads the one shared copy
    batches = rank_batches(
        cfg.feed(),
        args["index"],
        rank,
        world,
        cfg.batch_size,
        start=step * per_step,
        count=(cfg.steps - step) * per_step,
    )
    tracker = Tracker(args["tracking_uri"], args["run_id"]) if rank == 0 else None
    val_batch = validation_batch(cfg.feed(), ray.get(args["val_index"]), cfg.val_samples) if rank == 0 else None
    val_metrics: dict[str, float] = {}

    window_start, waited, window_steps, loss_sum = time.perf_counter(), 0.0, 0, torch.zeros((), device=device)
    while step < cfg.steps:
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t0
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
            save_and_report(engine, ema, generator, rank, step, metrics | val_metrics)
        elif log_now or val_now:
            ray.train.report(metrics | {"step": step})
        if log_now:  # the next window times training only, not validation or checkpoints
            window_start, waited, window_steps, loss_sum = time.perf_counter(), 0.0, 0, torch.zeros((), device=device)

    with full_weights(engine, ema):
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_model_dir(Path(tmp) / "model", task.export(engine.module), diffusion=task.diffusion)
                tracker.model(Path(tmp) / "model")
                publish(Path(tmp) / "model", f"{cfg.storage}/{cfg.name}/model")
    if tracker is not None:
        tracker.close()


def publish(model_dir: Path, url: str) -> None:
    """The final model also goes beside the checkpoints, a stable path for the next stage
    (GM's stage1_weights: <storage>/<rm run>/model)."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(f"{model_dir}/", path, recursive=True)


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


def save_and_report(engine, ema: EMA | None, generator: torch.Generator, rank: int, step: int, metrics: dict) -> None:
    """Every rank writes its part into a local directory; ray.train.report uploads and merges
    them into <storage>/<name>/checkpoint_<step>, registered only once all ranks are done."""
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step})
        torch.save({"generator": generator.get_state()}, f"{tmp}/rng_rank{rank}.pt")
        if ema is not None and rank == 0:
            torch.save(ema.state_dict(), f"{tmp}/ema.pt")
        ray.train.report(
            metrics | {"step": step},
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_{step:08d}",
        )


def restore(checkpoint: ray.train.Checkpoint, engine, ema: EMA | None, generator: torch.Generator, rank: int) -> int:
    """Model, optimizer, scheduler (DeepSpeed), noise generator and EMA; returns the step."""
    with checkpoint.as_directory() as d:
        _, client_state = engine.load_checkpoint(d, tag=DS_TAG)
        generator.set_state(torch.load(f"{d}/rng_rank{rank}.pt", weights_only=True)["generator"])
        if ema is not None:
            ema.load_state_dict(torch.load(f"{d}/ema.pt", weights_only=True))
    return client_state["step"]


# ---------------------------------------------------------------------------------------------
# MLflow (rank 0)


class Tracker:
    def __init__(self, tracking_uri: str, run_id: str):
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.start_run(run_id=run_id, log_system_metrics=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        mlflow.log_metrics(metrics, step=step)

    def image(self, columns: list[torch.Tensor], step: int) -> None:
        """One row per validation sample: LQ | ... | HQ."""
        tiles = torch.stack(columns, dim=1).flatten(0, 1).float().clamp(0, 1)
        grid = make_grid(tiles, nrow=len(columns), padding=2)
        mlflow.log_image(
            (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8),
            artifact_file=f"images/step_{step:08d}.png",
        )

    def model(self, model_dir: Path) -> None:
        mlflow.log_artifacts(str(model_dir), "model")

    def close(self) -> None:
        mlflow.end_run()
