"""ControlLDM: the frozen SD 2.1 parts plus IRControlNet, as one module with DiffBIR's semantics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from diffbir.models.attention import use_denoiser_attention
from diffbir.models.unet import IRControlNet
from diffbir.models.vae import CondEncoder

LATENT_SCALE_FACTOR = 0.18215  # SD 2.x; v1, v2 and v2.1 weights alike


class ControlLDM(nn.Module):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        controlnet: IRControlNet | None,
        vae: AutoencoderKL,
        text_encoder: nn.Module | None = None,
        cond_encoder: CondEncoder | None = None,
        latent_scale_factor: float = LATENT_SCALE_FACTOR,
    ):
        super().__init__()
        self.unet, self.controlnet, self.vae = unet, controlnet, vae
        self.text_encoder, self.cond_encoder = text_encoder, cond_encoder
        self.latent_scale_factor = latent_scale_factor
        use_denoiser_attention(*(m for m in (unet, controlnet) if m is not None))

    def vae_encode(self, image: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """image in [-1, 1] -> scaled latent: the posterior mode, or a sample (training targets)."""
        dist = self.vae.encode(image).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
        return z * self.latent_scale_factor

    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        """scaled latent (any float dtype: samplers keep theirs in float32) -> image in [-1, 1] (not
        clamped), in the VAE's dtype."""
        return self.vae.decode((z / self.latent_scale_factor).to(self.vae.dtype)).sample

    def condition_latent(self, image01: torch.Tensor) -> torch.Tensor:
        """c_RM: the stage-1 output (in [0, 1]) encoded to the scaled latent space. v1 weights
        bring their own trained encoder for this; v2 and later use the VAE encoder."""
        image = image01 * 2 - 1
        if self.cond_encoder is not None:
            return self.cond_encoder(image) * self.latent_scale_factor
        return self.vae_encode(image)

    @torch.no_grad()
    def text_context(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise RuntimeError("this model has no text encoder: pass text contexts directly")
        return self.text_encoder.encode(list(prompts))

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        c_txt: torch.Tensor,
        c_img: torch.Tensor,
        control_scale: float | Sequence[float] = 1.0,
    ) -> torch.Tensor:
        """The raw network prediction (eps or v, depending on the weights), in the UNet's dtype:
        the inputs are cast to it, so a float32 sampler state drives bf16/fp16 weights."""
        t = t.to(x_t.device).reshape(-1).expand(x_t.shape[0])
        dtype = self.unet.dtype
        x_t, c_txt, c_img = x_t.to(dtype), c_txt.to(dtype), c_img.to(dtype)
        down = mid = None
        if self.controlnet is not None:
            down, mid = self.controlnet(x_t, t, c_txt, c_img, scale=control_scale)
        return self.unet(
            x_t, t, encoder_hidden_states=c_txt, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
