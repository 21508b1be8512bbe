"""Stage 2: train IRControlNet on a frozen SD 2.1-base, conditioned on c_RM, the VAE-encoded
output of a frozen restoration module.

Stage 1 is any frozen restoration net: a platform model (train_rm's), DiffBIR's SwinIR file or
an off-the-shelf net spandrel reads (--stage1-weights). With paired data (--data with hq/ and lq/,
see pipelines.feed) it makes the condition from the user's own LQ images.

The ControlNet starts as a copy of the UNet encoder with its extra input channels and zero convs
at zero (IRControlNet.from_unet), or from given IRControlNet weights. The objective is eps or v
prediction, as the DiffusionConfig says (v2: eps; v2.1: zero-terminal-SNR with v). DiffBIR
trains with empty prompts (caption_drop_rate 1); lower it to train on the shards' captions.
Paper: batch 256, lr 1e-4 then 1e-5 (training/configs/gm_paper.yaml).

    diffbir init-tiny --output runs/tiny      # the tiny official-layout files gm_tiny.yaml reads
    python training/train_gm.py --config training/configs/gm_tiny.yaml [--steps N ...]

As a job on a running cluster (the job runs in an uploaded copy of the working directory, which
leaves out the git-ignored runs/: give data, weights, storage and MLflow paths absolute, or as
URLs); here with the RM that rm_tiny.yaml trained as stage 1:

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python training/train_gm.py --config training/configs/gm_tiny.yaml \\
        --data $PWD/runs/data/example/train --val-data $PWD/runs/data/example/val \\
        --base-weights $PWD/runs/tiny/sd21_tiny.safetensors \\
        --stage1-weights $PWD/runs/train/rm-tiny/model --storage $PWD/runs/train --tracking-dir $PWD/runs/mlflow

The frozen parts stay in fp32 outside DeepSpeed; with bf16/fp16 everything runs under autocast.
The tiny reference weights have no text tower: gm_tiny.yaml sets `text_encoder` to build a
randomly initialised tiny OpenCLIP tower (seeded, saved with the model), so prompts take the
same code path as with SD 2.1's real tower.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python training/train_gm.py` from a checkout

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from diffbir.checkpoints.loading import load_model
from diffbir.config import DiffusionConfig
from diffbir.models.cldm import ControlLDM
from diffbir.models.text_encoder import OpenCLIPTextEncoder, TextEncoderConfig
from diffbir.models.unet import IRControlNet, UNetConfig
from diffbir.sampling.denoiser import Denoiser, cfg_model, gaussian_noise, initial_latent
from diffbir.sampling.samplers import SAMPLERS, sample
from diffbir.sampling.schedules import NoiseSchedule
from pipelines.config import Location
from training.config import TrainConfig
from training.loop import ValMetrics, autocast


class GMConfig(TrainConfig):
    base_weights: list[Location] = Field(
        description="SD 2.1-base: official checkpoint file(s) or a platform model directory "
        "with unet and vae (and text_encoder)"
    )
    num_head_channels: int = Field(64, description="attention head width of the base UNet (SD 2.1: 64)")
    stage1_weights: Location = Field(
        description="the frozen restoration module: a platform model (train_rm's) or an official SwinIR / spandrel file"
    )
    controlnet_weights: Location | None = Field(
        None, description="start from these IRControlNet weights instead of the UNet copy"
    )
    text_encoder: TextEncoderConfig | None = Field(
        None, description="build a randomly initialised text tower of these sizes when the base weights have none"
    )
    diffusion: DiffusionConfig = Field(
        default_factory=DiffusionConfig, description="noise schedule and objective (eps | v)"
    )
    gradient_checkpointing: bool = Field(True, description="recompute UNet/ControlNet activations in the backward pass")
    val_sampler: str = Field("ddim", description=f"sampler of the validation run: {', '.join(SAMPLERS)}")
    val_steps: int = Field(4, ge=1, description="sampling steps of the validation run")


class GMTask:
    config_cls = GMConfig

    def __init__(self, cfg: GMConfig, device: torch.device):
        self.cfg, self.device, self.diffusion = cfg, device, cfg.diffusion
        self.val_metrics = ValMetrics(cfg.val_metrics, device)
        base = load_model(cfg.base_weights, num_head_channels=cfg.num_head_channels)
        stage1 = load_model(cfg.stage1_weights)
        self.stage1_name, stage1_part = next((n, p) for n, p in stage1.parts.items() if n in ("swinir", "stage1"))
        # an off-the-shelf net's output / input size (spandrel's; DiffBIR's SwinIR keeps the size)
        self.stage1_scale = int(stage1_part.config.get("scale", 1)) if self.stage1_name == "stage1" else 1
        self.configs = {n: p.config for n, p in base.parts.items()} | {self.stage1_name: stage1_part.config}
        self.unet, self.vae, self.stage1 = base.parts["unet"].module, base.parts["vae"].module, stage1_part.module
        if "text_encoder" in base.parts:
            self.text = base.parts["text_encoder"].module
        elif cfg.text_encoder is not None:
            self.text = OpenCLIPTextEncoder(cfg.text_encoder)  # seeded: the same tower on every rank
            self.configs["text_encoder"] = cfg.text_encoder.model_dump()
        else:
            raise ValueError(f"{cfg.base_weights} has no text tower: set text_encoder to build a random one")
        for frozen in (self.unet, self.vae, self.stage1, self.text):
            frozen.requires_grad_(False).eval().to(device).float()
        self.empty_context = self.text.encode([""])

        if cfg.controlnet_weights:
            part = load_model(
                cfg.controlnet_weights, num_head_channels=cfg.num_head_channels, parts=["controlnet"]
            ).parts["controlnet"]
            self.controlnet, self.configs["controlnet"] = part.module, part.config
        else:
            self.controlnet = IRControlNet.from_unet(self.unet, UNetConfig(**self.configs["unet"]))
            self.configs["controlnet"] = self.configs["unet"]
        self.controlnet.float().train()
        if cfg.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()  # frozen, but its activations carry the ControlNet's gradient
        self.alphas_cumprod = NoiseSchedule.from_config(cfg.diffusion).alphas_cumprod.float().to(device)

    def trainable(self) -> nn.Module:
        return self.controlnet

    def _stage1(self, lq: torch.Tensor) -> torch.Tensor:
        """Stage 1 on the LQ (fed at the HQ size), its output at that size. A net of scale s (an
        x4 super-resolution net) sees the LQ reduced by s, as restoration runs it on the small input."""
        size = lq.shape[-2:]
        if self.stage1_scale > 1:
            lq = F.interpolate(lq, scale_factor=1 / self.stage1_scale, mode="bicubic", antialias=True).clamp(0, 1)
        out = self.stage1(lq)
        if out.shape[-2:] != size:
            out = F.interpolate(out.float(), size=size, mode="bicubic", antialias=True)
        return out

    def _context(self, prompts: list[str]) -> torch.Tensor:
        if not any(prompts):
            return self.empty_context.expand(len(prompts), -1, -1)
        return self.text.encode(prompts)

    def loss(self, model, batch: dict, generator: torch.Generator) -> torch.Tensor:
        cldm = ControlLDM(self.unet, model, self.vae)
        hq, lq = batch["hq"].to(self.device), batch["lq"].to(self.device)
        with torch.no_grad(), autocast(self.cfg.precision, self.device):
            z0 = cldm.vae_encode(hq, sample=True, generator=generator).float()
            c_img = cldm.condition_latent(self._stage1(lq).clamp(0, 1))
            c_txt = self._context(batch["prompt"])
        t = torch.randint(0, len(self.alphas_cumprod), (len(z0),), generator=generator, device=self.device)
        noise = torch.randn(z0.shape, generator=generator, device=self.device)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        target = noise if self.cfg.diffusion.parameterization == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * z0
        with autocast(self.cfg.precision, self.device):
            pred = cldm(x_t, t, c_txt, c_img)
        return F.mse_loss(pred.float(), target)

    @torch.no_grad()
    def validate(self, model: nn.Module, batch: dict) -> tuple[dict[str, float], list[torch.Tensor]]:
        """A short sampling run from fixed noise: the val_metrics of the restoration and of stage 1."""
        cldm = ControlLDM(self.unet, model, self.vae)
        hq01, lq = (batch["hq"].to(self.device) + 1) / 2, batch["lq"].to(self.device)
        model.eval()
        with autocast(self.cfg.precision, self.device):
            stage1 = self._stage1(lq).float().clamp(0, 1)
            c_img = cldm.condition_latent(stage1).float()
            den = Denoiser(cfg_model(cldm, c_img, self._context(batch["prompt"])), self.cfg.diffusion)
            generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
            x_T = initial_latent(den, torch.randn(c_img.shape, generator=generator, device=self.device))
            z = sample(den, x_T, self.cfg.val_sampler, self.cfg.val_steps, noise=gaussian_noise(generator))
            restored = ((cldm.vae_decode(z).float() + 1) / 2).clamp(0, 1)
        model.train()
        metrics = self.val_metrics(restored, hq01) | self.val_metrics(stage1, hq01, "_stage1")
        return metrics, [lq, stage1, restored, hq01]

    def export(self, model: nn.Module) -> dict[str, tuple[nn.Module, dict]]:
        modules = {
            "unet": self.unet,
            "controlnet": model,
            "vae": self.vae,
            self.stage1_name: self.stage1,
            "text_encoder": self.text,
        }
        return {name: (module, self.configs[name]) for name, module in modules.items()}


def main(argv: list[str] | None = None) -> None:
    from training.launch import run_from_command_line  # the driver's imports: not needed by the workers

    run_from_command_line(GMConfig, "training.train_gm:GMTask", argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
