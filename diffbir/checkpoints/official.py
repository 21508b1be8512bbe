"""The official checkpoint layouts: recognising a file and splitting it into model parts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffbir.checkpoints.io import CheckpointError, StateDict, preview_keys, read_state_dict
from diffbir.models.stage1 import load_spandrel_model


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    examples: str
    prefixes: Mapping[str, str]  # key prefix -> part ("" = the whole file is that part)


_SD_PARTS = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text_encoder"}
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        Layout(
            "sd21",
            "Stable Diffusion 2.1-base single-file checkpoint",
            "v2-1_512-ema-pruned.ckpt, sd2.1-base-zsnr-laionaes5.ckpt",
            _SD_PARTS,
        ),
        Layout(
            "diffbir_v1_full",
            "DiffBIR v1 full checkpoint (SD + IRControlNet + SwinIR + condition encoder)",
            "general_full_v1.ckpt, face_full_v1.ckpt",
            {
                **_SD_PARTS,
                "control_model.": "controlnet",
                "preprocess_model.": "swinir",
                "cond_encoder.": "cond_encoder",
            },
        ),
        Layout(
            "diffbir_v2_cldm",
            "DiffBIR v2 ControlLDM module state dict (cldm.state_dict())",
            "a whole v2/v2.1 ControlLDM saved from the reference code",
            {"unet.": "unet", "vae.": "vae", "clip.": "text_encoder", "controlnet.": "controlnet"},
        ),
        Layout("ldm_unet", "bare SD 2.1 UNet (ldm names)", "ControlLDM.unet.state_dict()", {"": "unet"}),
        Layout("ldm_vae", "bare SD 2.1 VAE (ldm names)", "ControlLDM.vae.state_dict()", {"": "vae"}),
        Layout(
            "openclip_text",
            "bare OpenCLIP text tower (FrozenOpenCLIPEmbedder)",
            "ControlLDM.clip.state_dict()",
            {"": "text_encoder"},
        ),
        Layout(
            "ircontrolnet",
            "DiffBIR IRControlNet weights",
            "v1_general.pth, v1_face.pth, v2.pth, DiffBIR_v2.1.pt",
            {"": "controlnet"},
        ),
        Layout(
            "swinir",
            "DiffBIR SwinIR restoration module (stage 1)",
            "general_swinir_v1.ckpt, face_swinir_v1.ckpt, codeformer_swinir.ckpt, realesrgan_s4_swinir_100k.pth",
            {"": "swinir"},
        ),
    ]
}


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the official DiffBIR/SD layout `sd` is in, or None."""
    has = lambda prefix: any(k.startswith(prefix) for k in sd)  # noqa: E731
    if has("control_model.") and has("model.diffusion_model."):
        return "diffbir_v1_full"
    if any(map(has, _SD_PARTS)):
        return "sd21"
    if has("controlnet.zero_convs.") and has("unet."):
        return "diffbir_v2_cldm"
    if "zero_convs.0.0.weight" in sd or "middle_block_out.0.weight" in sd:
        return "ircontrolnet"
    if "input_blocks.0.0.weight" in sd and "out.2.weight" in sd:
        return "ldm_unet"
    if "encoder.conv_in.weight" in sd and "decoder.conv_in.weight" in sd:
        return "ldm_vae"
    if "model.token_embedding.weight" in sd:
        return "openclip_text"
    if "conv_first.1.weight" in sd and has("layers.0.residual_group."):
        return "swinir"
    return None


@dataclass
class OfficialFile:
    """An official file read and split into parts (official key names, prefixes removed)."""

    path: str
    layout: str
    parts: dict[str, StateDict]
    ignored: list[str] = field(default_factory=list)  # keys no part reads (schedule buffers, EMA...)
    stage1: nn.Module | None = None  # off-the-shelf nets, already built by spandrel
    stage1_arch: str | None = None
    stage1_scale: int = 1

    @property
    def description(self) -> str:
        if self.layout.startswith("spandrel:"):
            return f"off-the-shelf restoration network ({self.stage1_arch}, read by spandrel)"
        return LAYOUTS[self.layout].description


def read_official(path: str | Path) -> OfficialFile:
    """Read an official checkpoint; raises CheckpointError for unreadable or unknown files."""
    return split_official(read_state_dict(path), str(path))


def split_official(sd: StateDict, source: str) -> OfficialFile:
    """Recognise the layout of `sd` (read from `source`) and split it into parts."""
    layout = detect_layout(sd)
    if layout is None:
        try:
            net = load_spandrel_model(sd, source)
        except CheckpointError as e:
            prefixes = sorted({k.split(".")[0] for k in sd})
            raise CheckpointError(
                f"{source}: matches no known layout (SD 2.1, DiffBIR v1 full, IRControlNet, DiffBIR SwinIR, or "
                f"an architecture spandrel reads); its top-level key prefixes are: {preview_keys(prefixes, 12)} "
                f"({len(sd)} keys). spandrel said: {e}"
            ) from e
        return OfficialFile(
            source, f"spandrel:{net.arch}", {}, stage1=net.module, stage1_arch=net.arch, stage1_scale=net.scale
        )
    parts: dict[str, StateDict] = {}
    ignored = []
    for key, value in sd.items():
        for prefix, part in LAYOUTS[layout].prefixes.items():
            if key.startswith(prefix):
                parts.setdefault(part, {})[key[len(prefix) :]] = value
                break
        else:
            ignored.append(key)
    return OfficialFile(source, layout, parts, ignored)
