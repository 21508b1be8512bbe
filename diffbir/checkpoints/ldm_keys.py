"""Key renaming from the official (ldm / DiffBIR) layouts to the package's diffusers modules.

diffusers ships ldm->diffusers converters, but they silently skip keys they do not know and have
no notion of IRControlNet, so they cannot prove that every key of a file was used. These rules
are one-to-one renames (None = not a key of this part), which is what the strict loader needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable

Rename = Callable[[str], "str | None"]

_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Keys inside a SpatialTransformer have the same names in ldm and diffusers.
_TRANSFORMER = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)|norm[123]))\.(weight|bias)$"
)


def _resnet(rest: str, table: dict[str, str]) -> str | None:
    layer, _, param = rest.rpartition(".")
    return f"{table[layer]}.{param}" if layer in table and param in ("weight", "bias") else None


def _transformer(rest: str) -> str | None:
    return rest if _TRANSFORMER.fullmatch(rest) else None


def unet_rename(num_res_blocks: int, controlnet: bool = False) -> Rename:
    """ldm UNetModel / DiffBIR ControlNet key (no prefix) -> diffusers key."""
    per_level = num_res_blocks + 1

    def rename(key: str) -> str | None:
        if m := re.fullmatch(r"time_embed\.([02])\.(weight|bias)", key):
            return f"time_embedding.linear_{1 if m[1] == '0' else 2}.{m[2]}"
        if m := re.fullmatch(r"input_blocks\.0\.0\.(weight|bias)", key):
            return f"conv_in.{m[1]}"
        if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", key):
            level, idx = divmod(int(m[1]) - 1, per_level)
            if idx < num_res_blocks:
                if m[2] == "0":
                    new = _resnet(m[3], _RESNET)
                    return new and f"down_blocks.{level}.resnets.{idx}.{new}"
                new = _transformer(m[3])
                return new and f"down_blocks.{level}.attentions.{idx}.{new}"
            if m[2] == "0" and (p := re.fullmatch(r"op\.(weight|bias)", m[3])):
                return f"down_blocks.{level}.downsamplers.0.conv.{p[1]}"
            return None
        if m := re.fullmatch(r"middle_block\.([012])\.(.+)", key):
            if m[1] == "1":
                new = _transformer(m[2])
                return new and f"mid_block.attentions.0.{new}"
            new = _resnet(m[2], _RESNET)
            return new and f"mid_block.resnets.{int(m[1]) // 2}.{new}"
        if controlnet:
            if m := re.fullmatch(r"zero_convs\.(\d+)\.0\.(weight|bias)", key):
                return f"controlnet_down_blocks.{m[1]}.{m[2]}"
            if m := re.fullmatch(r"middle_block_out\.0\.(weight|bias)", key):
                return f"controlnet_mid_block.{m[1]}"
            return None
        if m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", key):
            level, idx = divmod(int(m[1]), per_level)
            if m[2] == "0":
                new = _resnet(m[3], _RESNET)
                return new and f"up_blocks.{level}.resnets.{idx}.{new}"
            if p := re.fullmatch(r"conv\.(weight|bias)", m[3]):  # the upsampler (index 1 or 2)
                return f"up_blocks.{level}.upsamplers.0.conv.{p[1]}"
            if m[2] == "1":
                new = _transformer(m[3])
                return new and f"up_blocks.{level}.attentions.{idx}.{new}"
            return None
        if m := re.fullmatch(r"out\.([02])\.(weight|bias)", key):
            return f"{'conv_norm_out' if m[1] == '0' else 'conv_out'}.{m[2]}"
        return None

    return rename


def vae_rename(num_levels: int) -> Rename:
    """ldm AutoencoderKL key (no prefix) -> diffusers AutoencoderKL key. The v1 condition encoder
    (encoder + quant_conv) uses the same names."""

    def rename(key: str) -> str | None:
        if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)", key):
            return key
        m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
        if not m:
            return None
        part, rest = m[1], m[2]
        if re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
            return key
        if p := re.fullmatch(r"norm_out\.(weight|bias)", rest):
            return f"{part}.conv_norm_out.{p[1]}"
        if p := re.fullmatch(r"mid\.block_([12])\.(.+)", rest):
            new = _resnet(p[2], _VAE_RESNET)
            return new and f"{part}.mid_block.resnets.{int(p[1]) - 1}.{new}"
        if p := re.fullmatch(r"mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", rest):
            return f"{part}.mid_block.attentions.0.{_VAE_ATTN[p[1]]}.{p[2]}"
        if p := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(.+)", rest):
            if (p[1] == "down") != (part == "encoder"):
                return None
            level = int(p[2]) if part == "encoder" else num_levels - 1 - int(p[2])
            new = _resnet(p[4], _VAE_RESNET)
            blocks = "down_blocks" if part == "encoder" else "up_blocks"
            return new and f"{part}.{blocks}.{level}.resnets.{p[3]}.{new}"
        if p := re.fullmatch(r"down\.(\d+)\.downsample\.conv\.(weight|bias)", rest):
            return f"encoder.down_blocks.{p[1]}.downsamplers.0.conv.{p[2]}" if part == "encoder" else None
        if p := re.fullmatch(r"up\.(\d+)\.upsample\.conv\.(weight|bias)", rest):
            if part != "decoder":
                return None
            return f"decoder.up_blocks.{num_levels - 1 - int(p[1])}.upsamplers.0.conv.{p[2]}"
        return None

    return rename


def is_vae_attention_projection(new_key: str) -> bool:
    """ldm stores the VAE mid-block attention projections as 1x1 convs; diffusers as linears."""
    return bool(re.search(r"mid_block\.attentions\.0\.(to_[qkv]|to_out\.0)\.weight$", new_key))
