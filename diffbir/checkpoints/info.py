"""`diffbir info`: what a checkpoint file or model directory is, without building any model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from diffbir.checkpoints.io import read_state_dict
from diffbir.checkpoints.official import read_official
from diffbir.checkpoints.parts import PARTS, infer_config
from diffbir.checkpoints.platform import is_model_dir, part_file_info, read_manifest


def _tensor_stats(sd: Mapping[str, torch.Tensor]) -> dict:
    dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in sd.values())
    return {
        "keys": len(sd),
        "elements": sum(v.numel() for v in sd.values()),
        "dtypes": dict(dtypes),
    }


def describe(path: str | Path, num_head_channels: int = 64) -> dict:
    """A JSON-able description: layout, parts with key/element counts, dtypes and architecture."""
    path = Path(path)
    if is_model_dir(path):
        manifest = read_manifest(path)
        parts = {}
        for name, entry in manifest.parts.items():
            parts[name] = {**_tensor_stats(read_state_dict(path / entry.file)), "config": entry.config}
            if entry.source:
                parts[name]["converted_from"] = entry.source
        return {
            "path": str(path),
            "layout": "platform",
            "description": "platform model directory (safetensors + model.json)",
            "parts": parts,
            "diffusion": manifest.diffusion.model_dump(),
            "version": manifest.version,
        }
    lone = part_file_info(path)
    if lone is not None:
        name, config = lone
        return {
            "path": str(path),
            "layout": "platform-part",
            "description": f"one part of a platform model ({name})",
            "parts": {name: {**_tensor_stats(read_state_dict(path)), "config": config}},
        }
    official = read_official(path)
    info = {"path": str(path), "layout": official.layout, "description": official.description, "parts": {}}
    if official.stage1 is not None:
        info["parts"]["stage1"] = {
            **_tensor_stats(official.stage1.state_dict()),
            "config": {"arch": official.stage1_arch},
        }
    for name, sd in official.parts.items():
        info["parts"][name] = {
            **_tensor_stats(sd),
            "description": PARTS[name].description,
            "config": infer_config(name, sd, num_head_channels, source=str(path), layout=official.layout).model_dump(),
        }
    if official.ignored:
        info["ignored_keys"] = {"count": len(official.ignored), "first": official.ignored[:5]}
    return info


def format_description(info: dict) -> str:
    lines = [f"{info['path']}", f"  layout: {info['layout']} — {info['description']}"]
    for name, part in info["parts"].items():
        dtypes = ", ".join(f"{d}×{n}" for d, n in part["dtypes"].items())
        lines.append(f"  {name}: {part['keys']} tensors, {part['elements']:,} elements ({dtypes})")
        config = ", ".join(f"{k}={v}" for k, v in part["config"].items())
        lines.append(f"      {config}")
    if "diffusion" in info:
        lines.append("  diffusion: " + ", ".join(f"{k}={v}" for k, v in info["diffusion"].items()))
    if info.get("version"):
        lines.append(f"  version: DiffBIR {info['version']} (restorations default to its preset)")
    if "ignored_keys" in info:
        ign = info["ignored_keys"]
        lines.append(f"  ignored: {ign['count']} keys no part reads (e.g. {', '.join(ign['first'])})")
    return "\n".join(lines)
