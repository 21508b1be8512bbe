"""The SD 2.1 UNet and DiffBIR's IRControlNet, built from diffusers' blocks.

Sizes are given in the reference's (ldm) vocabulary so that the reference configs, the tiny test
configs and the full SD 2.1-base sizes are one code path; `diffusers_kwargs` translates them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.controlnets.controlnet import ControlNetModel
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

# Reference config fields that carry no information for inference here.
_IGNORED_REFERENCE_FIELDS = {"use_checkpoint", "image_size", "legacy", "use_spatial_transformer", "hint_channels"}


class UNetConfig(BaseModel):
    """UNet / IRControlNet architecture (ldm names). Defaults: SD 2.1-base."""

    model_config = ConfigDict(extra="forbid")

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = [1, 2, 4, 4]
    num_res_blocks: int = 2
    attention_resolutions: list[int] = [4, 2, 1]
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear_in_transformer: bool = True

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        for c in self.block_out_channels:
            if c % self.num_head_channels or c % 32:
                raise ValueError(
                    f"channel width {c} must be a multiple of num_head_channels={self.num_head_channels} and of 32"
                )
        return self

    @classmethod
    def from_reference(cls, cfg: Mapping[str, Any]) -> UNetConfig:
        """From the reference's `unet_cfg` / `controlnet_cfg` constructor arguments."""
        return cls(**{k: v for k, v in cfg.items() if k not in _IGNORED_REFERENCE_FIELDS})

    @classmethod
    def infer(cls, sd: Mapping[str, torch.Tensor], num_head_channels: int = 64) -> UNetConfig:
        """Everything but the head width follows from an ldm-layout UNet or ControlNet state dict
        (no prefix); attention heads do not change parameter shapes, so that one is given."""
        conv_in = sd["input_blocks.0.0.weight"]
        mc = conv_in.shape[0]
        downsamples = sorted({int(k.split(".")[1]) for k in sd if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k)})
        if downsamples:
            nres, levels = downsamples[0] - 1, len(downsamples) + 1
        else:  # a single level
            nres, levels = len({k.split(".")[1] for k in sd if k.startswith("input_blocks.")}) - 1, 1
        mult, attn = [], []
        for level in range(levels):
            first = 1 + level * (nres + 1)
            mult.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0] // mc)
            if f"input_blocks.{first}.1.proj_in.weight" in sd:
                attn.append(2**level)
        depth = len({k.split(".")[3] for k in sd if k.startswith("middle_block.1.transformer_blocks.")})
        is_controlnet = "middle_block_out.0.weight" in sd
        out = sd.get("out.2.weight")
        return cls(
            in_channels=conv_in.shape[1] // 2 if is_controlnet else conv_in.shape[1],
            out_channels=out.shape[0] if out is not None else conv_in.shape[1] // 2,
            model_channels=mc,
            channel_mult=mult,
            num_res_blocks=nres,
            attention_resolutions=sorted(attn, reverse=True),
            num_head_channels=num_head_channels,
            transformer_depth=depth,
            context_dim=sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            use_linear_in_transformer=sd["middle_block.1.proj_in.weight"].ndim == 2,
        )

    @property
    def block_out_channels(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def attention_levels(self) -> list[bool]:
        return [2**i in self.attention_resolutions for i in range(len(self.channel_mult))]

    def diffusers_kwargs(self) -> dict[str, Any]:
        attn = self.attention_levels
        return dict(
            in_channels=self.in_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.num_res_blocks,
            cross_attention_dim=self.context_dim,
            # diffusers' "attention_head_dim" of these classes is, historically, the number of heads.
            attention_head_dim=tuple(c // self.num_head_channels for c in self.block_out_channels),
            transformer_layers_per_block=self.transformer_depth,
            use_linear_projection=self.use_linear_in_transformer,
            norm_eps=1e-5,
            norm_num_groups=32,
            flip_sin_to_cos=True,
            freq_shift=0,
        )


def build_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    attn = cfg.attention_levels
    return UNet2DConditionModel(
        out_channels=cfg.out_channels,
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        **cfg.diffusers_kwargs(),
    )


class IRControlNet(ControlNetModel):
    """DiffBIR's IRControlNet: diffusers' ControlNet whose first conv takes cat(z_t, c_RM) (8
    channels) directly, with no hint encoder, and whose 13 zero-conv outputs are scaled by the
    control strength. The rest (blocks, zero convs, config handling) is diffusers' own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.controlnet_cond_embedding

    @classmethod
    def from_unet_config(cls, cfg: UNetConfig) -> IRControlNet:
        kwargs = cfg.diffusers_kwargs()
        kwargs["in_channels"] = 2 * cfg.in_channels  # z_t and the condition latent
        return cls(conditioning_channels=cfg.in_channels, **kwargs)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, cfg: UNetConfig) -> IRControlNet:
        """Training initialisation: copy the UNet encoder and middle block; the extra input
        channels of the first conv and all zero convs start at zero."""
        net = cls.from_unet_config(cfg).to(device=unet.device, dtype=unet.dtype)
        own = net.state_dict()
        for k, v in unet.state_dict().items():
            if k in own and k != "conv_in.weight":
                own[k].copy_(v)
        with torch.no_grad():
            net.conv_in.weight.zero_()
            net.conv_in.weight[:, : cfg.in_channels].copy_(unet.conv_in.weight)
            for zc in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                nn.init.zeros_(zc.weight)
                nn.init.zeros_(zc.bias)
        return net

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        cond: torch.Tensor,
        scale: float | Sequence[float] = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Returns (12 down residuals, mid residual), each multiplied by its control scale."""
        timestep = timestep.to(sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        h = self.conv_in(torch.cat([sample, cond], dim=1))
        residuals = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            residuals.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
        outputs = [zc(r) for zc, r in zip(self.controlnet_down_blocks, residuals)]
        outputs.append(self.controlnet_mid_block(h))
        scales = [scale] * len(outputs) if isinstance(scale, (int, float)) else list(scale)
        if len(scales) != len(outputs):
            raise ValueError(f"{len(scales)} control scales given for {len(outputs)} control outputs")
        outputs = [o * s for o, s in zip(outputs, scales)]
        return outputs[:-1], outputs[-1]
