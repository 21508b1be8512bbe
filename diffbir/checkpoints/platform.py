"""The platform's own model format: a directory of safetensors files plus `model.json`.

    model.json            format marker, per-part file + architecture config, noise schedule,
                          latent scale, the official release it is, and where each part came from
    unet.safetensors      one file per part, in the package's own key names; each file's
    controlnet.safetensors   metadata names its part and config, so a lone file is self-describing
    ...

This is what `diffbir convert` writes, what training saves and what the registry stores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file
from torch import nn

from diffbir.checkpoints.io import CheckpointError, read_metadata, read_state_dict
from diffbir.checkpoints.parts import PARTS, build_part
from diffbir.config import DiffusionConfig
from diffbir.models.cldm import LATENT_SCALE_FACTOR
from diffbir.models.stage1 import load_spandrel_model
from diffbir.presets import Version

FORMAT = "diffbir-platform"
MANIFEST = "model.json"
STAGE1 = "stage1"  # an off-the-shelf net kept in spandrel's own key names


class PartEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str
    config: dict = Field(default_factory=dict)  # architecture (for stage1: {"arch": spandrel name})
    source: str | None = None  # the file it was converted from
    num_parameters: int = 0


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["diffbir-platform"] = FORMAT
    format_version: Literal[1] = 1
    parts: dict[str, PartEntry]
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    # the official release converted (its preset is the default of restorations); None: not one
    version: Version | None = None
    latent_scale_factor: float = LATENT_SCALE_FACTOR
    notes: dict[str, str] = Field(default_factory=dict)


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(model_dir: str | Path) -> ModelManifest:
    path = Path(model_dir) / MANIFEST
    try:
        return ModelManifest.model_validate_json(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{model_dir}: not a platform model directory (no {MANIFEST})") from e
    except ValidationError as e:
        raise CheckpointError(f"{path}: invalid platform manifest: {e}") from e


def save_model_dir(
    out_dir: str | Path,
    parts: dict[str, tuple[nn.Module, dict]],
    *,
    diffusion: DiffusionConfig,
    version: Version | None = None,
    sources: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    latent_scale_factor: float = LATENT_SCALE_FACTOR,
    overwrite: bool = False,
) -> ModelManifest:
    """Write `parts` ({name: (module, config dict)}) atomically: everything goes to a temporary
    directory beside `out_dir`, which is renamed into place only when complete."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        entries = {}
        for name, (module, config) in parts.items():
            sd = {
                k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                for k, v in module.state_dict().items()
            }
            sd = {k: v.detach().contiguous() for k, v in sd.items()}
            meta = {"diffbir.part": name, "diffbir.config": json.dumps(config), "format": "pt"}
            save_file(sd, str(tmp / f"{name}.safetensors"), metadata=meta)
            entries[name] = PartEntry(
                file=f"{name}.safetensors",
                config=config,
                source=(sources or {}).get(name),
                num_parameters=sum(p.numel() for p in module.parameters()),
            )
        manifest = ModelManifest(
            parts=entries, diffusion=diffusion, version=version, latent_scale_factor=latent_scale_factor
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        for f in tmp.iterdir():  # mkdtemp is private (0700); the result follows the umask
            os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def load_part(model_dir: str | Path, name: str, manifest: ModelManifest | None = None) -> nn.Module:
    """One part of a platform model directory, strictly loaded (eval mode, on CPU, stored dtype)."""
    manifest = manifest or read_manifest(model_dir)
    if name not in manifest.parts:
        raise CheckpointError(f"{model_dir}: has no part '{name}' (it has: {', '.join(manifest.parts)})")
    entry = manifest.parts[name]
    path = Path(model_dir) / entry.file
    sd = read_state_dict(path)
    if name == STAGE1:
        return load_spandrel_model(sd, str(path)).module
    spec = PARTS.get(name)
    if spec is None:
        raise CheckpointError(f"{path}: unknown part '{name}'")
    try:
        config = spec.config_cls(**entry.config)
    except ValidationError as e:
        raise CheckpointError(f"{model_dir}/{MANIFEST}: invalid config for part '{name}': {e}") from e
    return build_part(name, config, sd, official=False, source=str(path), layout="platform")


def part_file_info(path: str | Path) -> tuple[str, dict] | None:
    """(part, config) of a lone platform part file, from its safetensors metadata; else None."""
    meta = read_metadata(path)
    if "diffbir.part" not in meta:
        return None
    return meta["diffbir.part"], json.loads(meta.get("diffbir.config", "{}"))
