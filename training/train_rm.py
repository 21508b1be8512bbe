"""Stage 1: train the restoration module (DiffBIR's SwinIR) with an L2 loss on degraded crops.

Paper: 150k iterations, batch 96, Adam, lr 1e-4 (training/configs/rm_paper.yaml).

    python training/train_rm.py --config training/configs/rm_tiny.yaml [--steps N ...]

As a job on a running cluster (the job runs in an uploaded copy of the working directory, which
leaves out the git-ignored runs/: give data, storage and MLflow paths absolute, or as URLs):

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python training/train_rm.py --config training/configs/rm_tiny.yaml \\
        --data $PWD/runs/data/example/train --val-data $PWD/runs/data/example/val \\
        --storage $PWD/runs/train --tracking-dir $PWD/runs/mlflow
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python training/train_rm.py` from a checkout

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from diffbir.checkpoints.loading import load_model
from diffbir.config import DiffusionConfig
from diffbir.models.swinir import SwinIR, SwinIRConfig
from pipelines.config import Location
from training.config import TrainConfig
from training.loop import ValMetrics, autocast


class RMConfig(TrainConfig):
    swinir: SwinIRConfig = Field(default_factory=SwinIRConfig, description="SwinIR architecture (default: DiffBIR's)")
    init_weights: Location | None = Field(
        None, description="start from these SwinIR weights (official file or platform model) instead of random"
    )


class RMTask:
    config_cls = RMConfig
    diffusion = DiffusionConfig()  # an RM-only model has no diffusion part; the manifest wants one

    def __init__(self, cfg: RMConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.val_metrics = ValMetrics(cfg.val_metrics, device)
        if cfg.init_weights:
            self.model = load_model(cfg.init_weights, parts=["swinir"]).stage1.float()
        else:
            self.model = SwinIR(cfg.swinir)
        self.model.train()

    def trainable(self) -> nn.Module:
        return self.model

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        lq, hq = batch["lq"].to(self.device), batch["hq"].to(self.device)
        with autocast(self.cfg.precision, self.device):
            restored = model(lq)
        return F.mse_loss(restored.float(), (hq + 1) / 2)

    @torch.no_grad()
    def validate(self, model: nn.Module, batch: dict) -> tuple[dict[str, float], list[torch.Tensor]]:
        lq, hq01 = batch["lq"].to(self.device), (batch["hq"].to(self.device) + 1) / 2
        model.eval()
        with autocast(self.cfg.precision, self.device):
            restored = model(lq).float().clamp(0, 1)
        model.train()
        metrics = self.val_metrics(restored, hq01) | self.val_metrics(lq, hq01, "_lq")
        return metrics, [lq, restored, hq01]

    def export(self, model: nn.Module) -> dict[str, tuple[nn.Module, dict]]:
        return {"swinir": (model, model.config.model_dump())}


def main(argv: list[str] | None = None) -> None:
    from training.launch import run_from_command_line  # the driver's imports: not needed by the workers

    run_from_command_line(RMConfig, "training.train_rm:RMTask", argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
