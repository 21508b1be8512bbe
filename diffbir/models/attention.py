"""The denoiser's attention kernel: torch's fused attention, except in bf16/fp16 on a CPU.

Written here because no library picks by measurement: torch's CPU flash-attention kernel
computes bf16 no faster than float32 (0.108 vs 0.105 s for 5 heads × 4096² at 64 channels on
a 2-vCPU AMD EPYC with AVX512-BF16), while bf16 matrix products run twice as fast as float32
ones. So on a CPU in bf16/fp16 the attention is two products around a softmax, over blocks of
queries small enough that a block's scores stay in the last-level cache: 0.050 s for the same
shape, and one SD 2.1 + IRControlNet call at 512² takes 1.9 instead of 2.4 s
(benchmarks/RESULTS.md). On GPUs, and in float32 anywhere, the fused kernel stays: there it is
the faster one.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

# scores per block: inside a 32 MB L3 with the softmax's copy (10 MB measured best, 20 MB slow)
SCORE_BLOCK_BYTES = 8 << 20


class DenoiserAttnProcessor(AttnProcessor2_0):
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        plain = (
            hidden_states.ndim == 3
            and attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and not attn.norm_cross
            and attn.norm_q is None
            and attn.norm_k is None
        )
        low_cpu = hidden_states.device.type == "cpu" and hidden_states.dtype in (torch.bfloat16, torch.float16)
        if not (plain and low_cpu):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, heads = hidden_states.shape[0], attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (b, n, heads*d) -> (b, heads, n, d)
            return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
        out = blocked_attention(q, k, v, attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3])))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for (b, heads, n, d) tensors, SCORE_BLOCK_BYTES of scores at a time."""
    per_query = q.shape[0] * q.shape[1] * k.shape[2] * q.element_size()
    block = max(1, SCORE_BLOCK_BYTES // per_query)
    kt = k.transpose(-1, -2) * scale
    return torch.cat([torch.softmax(qb @ kt, dim=-1) @ v for qb in q.split(block, dim=2)], dim=2)


def use_denoiser_attention(*models: nn.Module) -> None:
    for model in models:
        model.set_attn_processor(DenoiserAttnProcessor())
