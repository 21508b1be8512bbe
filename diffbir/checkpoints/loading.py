"""From files to ready modules: official checkpoints or platform directories, and conversion."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from diffbir.checkpoints.io import CheckpointError
from diffbir.checkpoints.official import read_official
from diffbir.checkpoints.parts import PARTS, build_part, infer_config
from diffbir.checkpoints.platform import STAGE1, ModelManifest, is_model_dir, load_part, read_manifest, save_model_dir
from diffbir.config import DiffusionConfig
from diffbir.models.cldm import LATENT_SCALE_FACTOR, ControlLDM
from diffbir.presets import Version


@dataclass
class LoadedPart:
    module: nn.Module
    config: dict
    source: str


@dataclass
class ModelBundle:
    """Everything a restoration run needs; `cldm` is None when only stage 1 was given. `version`:
    the official release a converted model records (None for official files and trained models)."""

    parts: dict[str, LoadedPart]
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    latent_scale_factor: float = LATENT_SCALE_FACTOR
    version: Version | None = None

    @property
    def stage1(self) -> nn.Module | None:
        part = self.parts.get("swinir") or self.parts.get(STAGE1)
        return part.module if part else None

    @cached_property
    def cldm(self) -> ControlLDM | None:
        if "unet" not in self.parts or "vae" not in self.parts:
            return None
        get = lambda name: self.parts[name].module if name in self.parts else None  # noqa: E731
        return ControlLDM(
            get("unet"),
            get("controlnet"),
            get("vae"),
            get("text_encoder"),
            get("cond_encoder"),
            self.latent_scale_factor,
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
        for part in self.parts.values():
            param = next(part.module.parameters(), None)
            if (
                param is None
                or (device is not None and param.device != torch.device(device))
                or (dtype is not None and param.dtype != dtype)
            ):  # skip no-op moves: diffusers warns on every .to()
                part.module.to(device=device, dtype=dtype)
        return self


def _slot(part: str) -> str:
    """The DiffBIR SwinIR and an off-the-shelf net are alternatives for one slot."""
    return "stage-1" if part in ("swinir", STAGE1) else part


def load_official_parts(paths: Iterable[str | Path], num_head_channels: int = 64) -> dict[str, LoadedPart]:
    """Build every part the given official files hold. A part given by two files is an error."""
    parts: dict[str, LoadedPart] = {}
    for path in paths:
        official = read_official(path)
        if official.stage1 is not None:
            config = {"arch": official.stage1_arch, "scale": official.stage1_scale}
            parts_to_add = {STAGE1: LoadedPart(official.stage1, config, str(path))}
        else:
            parts_to_add = {}
            for name, sd in official.parts.items():
                config = infer_config(name, sd, num_head_channels, source=str(path), layout=official.layout)
                module = build_part(name, config, sd, official=True, source=str(path), layout=official.layout)
                parts_to_add[name] = LoadedPart(module, config.model_dump(), str(path))
        for name, part in parts_to_add.items():
            clash = next((p for n, p in parts.items() if _slot(n) == _slot(name)), None)
            if clash is not None:
                raise CheckpointError(f"{path}: gives the {_slot(name)} part again (already read from {clash.source})")
            parts[name] = part
    return parts


def load_model(
    paths: str | Path | Iterable[str | Path],
    *,
    diffusion: DiffusionConfig | None = None,
    num_head_channels: int = 64,
    parts: Iterable[str] | None = None,
) -> ModelBundle:
    """Load a platform model directory, or a set of official files (SD 2.1 + IRControlNet +
    stage 1, or a v1 full checkpoint). Modules come back in eval mode on the CPU in the stored
    dtype; move them with `bundle.to(device, dtype)`."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if len(paths) == 1 and is_model_dir(paths[0]):
        manifest = read_manifest(paths[0])
        wanted = list(parts) if parts is not None else list(manifest.parts)
        loaded = {
            n: LoadedPart(load_part(paths[0], n, manifest), manifest.parts[n].config, str(paths[0])) for n in wanted
        }
        return ModelBundle(loaded, diffusion or manifest.diffusion, manifest.latent_scale_factor, manifest.version)
    if any(Path(p).is_dir() for p in paths):
        raise CheckpointError(
            f"{[str(p) for p in paths if Path(p).is_dir()]}: "
            "a directory must be a platform model (with model.json) given alone"
        )
    loaded = load_official_parts(paths, num_head_channels)
    if parts is not None:
        loaded = {n: p for n, p in loaded.items() if n in set(parts)}
    return ModelBundle(loaded, diffusion or DiffusionConfig())


def convert(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    diffusion: DiffusionConfig,
    version: Version | None = None,
    num_head_channels: int = 64,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> ModelManifest:
    """Official files -> one platform model directory (recording `version`, the release they are)."""
    bundle = load_model(paths, diffusion=diffusion, num_head_channels=num_head_channels)
    return save_model_dir(
        out_dir,
        {name: (p.module, p.config) for name, p in bundle.parts.items()},
        diffusion=diffusion,
        version=version,
        sources={name: p.source for name, p in bundle.parts.items()},
        dtype=dtype,
        overwrite=overwrite,
    )


def known_parts() -> list[str]:
    return [*PARTS, STAGE1]
