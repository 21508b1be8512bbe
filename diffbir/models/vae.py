"""The SD 2.1 VAE (diffusers' AutoencoderKL) and DiffBIR v1's condition encoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import Encoder
from pydantic import BaseModel, ConfigDict
from torch import nn


class VAEConfig(BaseModel):
    """AutoencoderKL architecture (ldm `ddconfig` names). Defaults: SD 2.1-base."""

    model_config = ConfigDict(extra="forbid")

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list[int] = [1, 2, 4, 4]
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4

    @classmethod
    def from_reference(cls, vae_cfg: Mapping[str, Any]) -> VAEConfig:
        """From the reference's `vae_cfg` ({embed_dim, ddconfig})."""
        dd = vae_cfg["ddconfig"]
        if dd.get("attn_resolutions"):
            raise ValueError("attention inside VAE levels is not part of the SD 2.1 VAE")
        if dd["z_channels"] != vae_cfg["embed_dim"]:
            raise ValueError("z_channels must equal embed_dim (as in every SD VAE)")
        keep = ("in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "z_channels")
        return cls(embed_dim=vae_cfg["embed_dim"], **{k: dd[k] for k in keep})

    @classmethod
    def infer(cls, sd: Mapping[str, torch.Tensor], prefix: str = "") -> VAEConfig:
        """From an ldm-layout VAE (or v1 cond_encoder) state dict; keys start with `prefix`."""
        conv_in = sd[f"{prefix}encoder.conv_in.weight"]
        ch = conv_in.shape[0]
        levels = 1 + max(int(k[len(prefix) :].split(".")[2]) for k in sd if k.startswith(f"{prefix}encoder.down."))
        nres = 1 + max(
            int(k[len(prefix) :].split(".")[4]) for k in sd if k.startswith(f"{prefix}encoder.down.0.block.")
        )
        mult = [sd[f"{prefix}encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
        z2 = sd[f"{prefix}encoder.conv_out.weight"].shape[0]
        out = sd.get(f"{prefix}decoder.conv_out.weight")
        return cls(
            in_channels=conv_in.shape[1],
            out_ch=out.shape[0] if out is not None else conv_in.shape[1],
            ch=ch,
            ch_mult=mult,
            num_res_blocks=nres,
            z_channels=z2 // 2,
            embed_dim=sd[f"{prefix}quant_conv.weight"].shape[0] // 2,
        )

    def diffusers_kwargs(self) -> dict[str, Any]:
        n = len(self.ch_mult)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_ch,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(self.ch * m for m in self.ch_mult),
            layers_per_block=self.num_res_blocks,
            latent_channels=self.z_channels,
            norm_num_groups=32,
        )


def build_vae(cfg: VAEConfig) -> AutoencoderKL:
    return AutoencoderKL(**cfg.diffusers_kwargs())


class CondEncoder(nn.Module):
    """DiffBIR v1's condition encoder: a trained copy of the VAE encoder plus quant_conv; the
    condition latent is the mode of its Gaussian, scaled like the VAE latent."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        kw = cfg.diffusers_kwargs()
        self.encoder = Encoder(
            in_channels=cfg.in_channels,
            out_channels=cfg.z_channels,
            down_block_types=kw["down_block_types"],
            block_out_channels=kw["block_out_channels"],
            layers_per_block=cfg.num_res_blocks,
            norm_num_groups=32,
            double_z=True,
        )
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image in [-1, 1] -> posterior mean (unscaled)."""
        return self.quant_conv(self.encoder(image)).chunk(2, dim=1)[0]
