"""The model parts the platform knows, and strict loading of weights into them.

Modules are built on the meta device and take the file's tensors with `assign=True`, so loading
never holds a second copy of the weights (the check below runs before any tensor is touched).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from pydantic import BaseModel
from torch import nn

from diffbir.checkpoints.io import CheckpointError, preview_keys
from diffbir.checkpoints.ldm_keys import Rename, is_vae_attention_projection, unet_rename, vae_rename
from diffbir.models.swinir import SwinIR, SwinIRConfig
from diffbir.models.text_encoder import OpenCLIPTextEncoder, TextEncoderConfig, unused_text_keys
from diffbir.models.unet import IRControlNet, UNetConfig, build_unet
from diffbir.models.vae import CondEncoder, VAEConfig, build_vae

Adapt = Callable[[str, torch.Tensor], torch.Tensor]


def _squeeze_vae_attention(key: str, value: torch.Tensor) -> torch.Tensor:
    return value[:, :, 0, 0] if value.ndim == 4 and is_vae_attention_projection(key) else value


@dataclass(frozen=True)
class PartSpec:
    config_cls: type[BaseModel]
    build: Callable[[BaseModel], nn.Module]
    # official key -> package key for this config; None means the official names are kept.
    official_rename: Callable[[BaseModel], Rename] | None = None
    adapt: Adapt | None = None
    description: str = ""
    # keys a file may lack because the computation never reads them (filled with zeros)
    unused_keys: Callable[[BaseModel], set[str]] = lambda config: set()


PARTS: dict[str, PartSpec] = {
    "unet": PartSpec(UNetConfig, build_unet, lambda c: unet_rename(c.num_res_blocks), description="SD 2.1 UNet"),
    "controlnet": PartSpec(
        UNetConfig,
        IRControlNet.from_unet_config,
        lambda c: unet_rename(c.num_res_blocks, controlnet=True),
        description="IRControlNet",
    ),
    "vae": PartSpec(VAEConfig, build_vae, lambda c: vae_rename(len(c.ch_mult)), _squeeze_vae_attention, "SD 2.1 VAE"),
    "cond_encoder": PartSpec(
        VAEConfig,
        CondEncoder,
        lambda c: vae_rename(len(c.ch_mult)),
        _squeeze_vae_attention,
        "DiffBIR v1 condition encoder",
    ),
    "text_encoder": PartSpec(
        TextEncoderConfig, OpenCLIPTextEncoder, description="OpenCLIP ViT-H/14 text tower", unused_keys=unused_text_keys
    ),
    "swinir": PartSpec(SwinIRConfig, SwinIR, description="DiffBIR SwinIR restoration module"),
}


def infer_config(
    part: str, sd: Mapping[str, torch.Tensor], num_head_channels: int = 64, *, source: str = "", layout: str = ""
) -> BaseModel:
    """The architecture of an official-layout part state dict (prefix removed). Attention head
    widths leave no trace in the weights: `num_head_channels` (SD 2.1: 64) supplies them."""
    try:
        if part in ("unet", "controlnet"):
            return UNetConfig.infer(sd, num_head_channels)
        if part in ("vae", "cond_encoder"):
            return VAEConfig.infer(sd)
        if part == "text_encoder":
            return TextEncoderConfig.infer(sd)
        return PARTS[part].config_cls.infer(sd)
    except (KeyError, IndexError, ValueError) as e:
        raise CheckpointError(
            f"{source}: looks like {layout} / {part} but its architecture cannot be worked out from its keys "
            f"({type(e).__name__}: {e})"
        ) from e


def build_part(
    part: str,
    config: BaseModel,
    sd: Mapping[str, torch.Tensor],
    *,
    official: bool,
    source: str,
    layout: str,
) -> nn.Module:
    """Build `part` from `config` and load `sd` strictly (official names if `official`, else the
    package's own names). Raises CheckpointError naming the file, layout and first mismatches."""
    spec = PARTS[part]
    with torch.device("meta"):
        module = spec.build(config)
    rename = spec.official_rename(config) if official and spec.official_rename else None
    load_strict(
        module,
        sd,
        rename,
        spec.adapt if official else None,
        source=source,
        what=f"{layout} / {part}",
        may_lack=spec.unused_keys(config),
    )
    rebuild = getattr(module, "rebuild_buffers", None)
    if rebuild is not None:
        rebuild()
    return module.eval()


def load_strict(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    rename: Rename | None,
    adapt: Adapt | None,
    *,
    source: str,
    what: str,
    may_lack: set[str] = frozenset(),
) -> None:
    """Every file key used, every module tensor filled, every shape equal; else a clear error.
    Keys in `may_lack` (never read by the computation) are zero-filled when the file lacks them."""
    expected = module.state_dict()
    converted: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in sd.items():
        new = rename(key) if rename else key
        if new is None or new not in expected:
            unused.append(key)
            continue
        converted[new] = adapt(new, value) if adapt else value
    for k in may_lack - converted.keys():
        if k in expected:
            converted[k] = torch.zeros(expected[k].shape, dtype=expected[k].dtype)
    missing = [k for k in expected if k not in converted]
    wrong = [
        f"{k}: file {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in converted.items()
        if v.shape != expected[k].shape
    ]
    if missing or unused or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} model keys missing from the file (first: {preview_keys(missing, 5)})")
        if unused:
            problems.append(f"{len(unused)} file keys not used (first: {preview_keys(unused, 5)})")
        if wrong:
            problems.append(f"{len(wrong)} shapes differ (first: {preview_keys(wrong, 3)})")
        raise CheckpointError(f"{source}: looks like {what} but does not match the model: " + "; ".join(problems))
    module.load_state_dict(converted, strict=True, assign=True)
