"""SD 2.x text conditioning: the OpenCLIP ViT-H/14 text tower (DiffBIR's FrozenOpenCLIPEmbedder).

The transformer is open_clip's own `TextTransformer`; this module only fixes the state-dict layout
to the checkpoint's `cond_stage_model.model.*` keys (prefix `cond_stage_model.` stripped) and the
forward DiffBIR uses: penultimate layer + ln_final, no projection, no pooling (golden README §6).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

import torch
from open_clip.tokenizer import tokenize as _open_clip_tokenize
from open_clip.transformer import TextTransformer
from pydantic import BaseModel, ConfigDict
from torch import nn


def tokenize(prompts: list[str] | str, context_length: int = 77) -> torch.LongTensor:
    """open_clip's tokenizer: <start_of_text> ids <end_of_text>, zero padded; truncation keeps
    <end_of_text> at the last position. Its BPE vocab ships inside the package (no download)."""
    return _open_clip_tokenize(prompts, context_length=context_length)


class TextEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = 1024
    layers: int = 24
    heads: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    output_dim: int = 1024  # text_projection: stored in checkpoints, unused by DiffBIR
    mlp_ratio: float = 4.0
    layer: Literal["penultimate", "last"] = "penultimate"

    @classmethod
    def infer(cls, state_dict: Mapping[str, torch.Tensor], heads: int | None = None, **overrides) -> TextEncoderConfig:
        """Config from the shapes of a `model.*`-keyed state dict. Head count is not visible in any
        shape: default to 64-wide heads (ViT-H/14: 1024 // 64 = 16) unless given."""
        vocab_size, width = state_dict["model.token_embedding.weight"].shape
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"model\.transformer\.resblocks\.(\d+)\.", k))}
        # Files converted back from diffusers (e.g. sd2.1-base-zsnr-laionaes5.ckpt) have no
        # text_projection and lack the last block, which diffusers drops because SD 2.x reads the
        # penultimate layer; the tower still has one block more than the file holds.
        converted_from_diffusers = "model.text_projection" not in state_dict
        return cls(
            width=width,
            layers=len(blocks) + converted_from_diffusers,
            heads=heads if heads is not None else width // 64,
            context_length=state_dict["model.positional_embedding"].shape[0],
            vocab_size=vocab_size,
            output_dim=state_dict["model.text_projection"].shape[1] if "model.text_projection" in state_dict else width,
            mlp_ratio=state_dict["model.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            **overrides,
        )


def unused_text_keys(config: TextEncoderConfig) -> set[str]:
    """Keys the computation never reads: a file may lack them (see `infer`)."""
    keys = {"model.text_projection", "model.logit_scale"}
    if config.layer == "penultimate":
        last = f"model.transformer.resblocks.{config.layers - 1}."
        keys |= {
            last + k
            for k in (
                "ln_1.weight",
                "ln_1.bias",
                "attn.in_proj_weight",
                "attn.in_proj_bias",
                "attn.out_proj.weight",
                "attn.out_proj.bias",
                "ln_2.weight",
                "ln_2.bias",
                "mlp.c_fc.weight",
                "mlp.c_fc.bias",
                "mlp.c_proj.weight",
                "mlp.c_proj.bias",
            )
        }
    return keys


class OpenCLIPTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or TextEncoderConfig()
        # no_causal_mask: no non-persistent mask buffer (it would stay on meta after an assign
        # load); forward builds the causal mask on the fly instead.
        self.model = TextTransformer(
            context_length=config.context_length,
            vocab_size=config.vocab_size,
            width=config.width,
            heads=config.heads,
            layers=config.layers,
            mlp_ratio=config.mlp_ratio,
            output_dim=config.output_dim,
            no_causal_mask=True,
        )
        # The checkpoint stores the whole CLIP model minus the vision tower: logit_scale too.
        self.model.logit_scale = nn.Parameter(torch.ones([]))
        self.requires_grad_(False)  # frozen in DiffBIR

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, L] int64 -> context [N, L, width]."""
        m = self.model
        seq_len = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:seq_len]
        # additive causal mask, -inf above the diagonal (as open_clip's build_causal_mask)
        mask = torch.full((seq_len, seq_len), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        n_blocks = len(m.transformer.resblocks) - (self.config.layer == "penultimate")
        for block in m.transformer.resblocks[:n_blocks]:
            x = block(x, attn_mask=mask)
        return m.ln_final(x)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        return self(tokenize(prompts, self.config.context_length).to(self.device))
