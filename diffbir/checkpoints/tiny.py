"""Tiny official-layout checkpoint files made from a key layout with the key-based initialisation.

The demo, the README's examples, the tiny training configs and the parity tests all need an SD 2.1
single file, an IRControlNet file and a SwinIR file in the official layouts. Nothing may be
downloaded, and the reference's tiny files are fully determined by their keys, shapes and the
salt of the key-based initialisation (golden README, sections 3.1 and 4), so they are made here
instead of stored: `diffbir init-tiny DIR` writes them, bit-identical to the reference's.

A layout is a weights manifest: `{file name: {"tensors": {key: {"shape": [...], "dtype": ...}}}}`
(a golden set's `weights/weights_manifest.json`, or `tiny_layout.json` beside this module, the
layout of the embedded tiny model).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffbir.config import DiffusionConfig
from diffbir.models.swinir import SwinIRConfig, swinir_computed_buffers
from diffbir.utils.keyed_init import COMPUTED_BUFFER_SUFFIXES, keyed_tensor

TINY_LAYOUT = Path(__file__).with_name("tiny_layout.json")
TINY_SALT = 1  # the salt of the reference's stored tiny weights
LDM_SCHEDULE_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)


def read_layout(path: str | Path = TINY_LAYOUT) -> dict[str, dict[str, list[int]]]:
    """{file name: {key: shape}} of every file of a layout that lists its tensors."""
    manifest = json.loads(Path(path).read_text())
    return {
        name: {key: t["shape"] for key, t in entry["tensors"].items()}
        for name, entry in manifest.items()
        if "tensors" in entry
    }


def ldm_schedule_buffers(config: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The schedule buffers ldm's LatentDiffusion.register_schedule stores in an SD checkpoint
    (float64 numpy arithmetic, stored as float32). DiffBIR never reads them; a file made here
    carries them so that it is the reference's file, byte for byte."""
    betas = (
        torch.linspace(config.linear_start**0.5, config.linear_end**0.5, config.timesteps, dtype=torch.float64) ** 2
    ).numpy()
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    values = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "logvar": np.zeros(config.timesteps),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


def keyed_file(shapes: Mapping[str, list[int]], salt: int) -> dict[str, torch.Tensor]:
    """The tensors of one file: keyed values, except the buffers a module computes (SwinIR's
    position index and masks, from the config its shapes imply) and ldm's schedule buffers."""
    sd: dict[str, torch.Tensor] = {}
    computed: dict[str, torch.Tensor] = {}
    if any(k.endswith(COMPUTED_BUFFER_SUFFIXES) for k in shapes):
        placeholders = {k: torch.empty(s) for k, s in shapes.items()}
        computed = swinir_computed_buffers(SwinIRConfig.infer(placeholders))
    if LDM_SCHEDULE_KEYS[0] in shapes:
        computed |= ldm_schedule_buffers(DiffusionConfig(timesteps=shapes["betas"][0]))
    for key, shape in shapes.items():
        if key in computed:
            if list(computed[key].shape) != list(shape):
                raise ValueError(f"{key}: the layout says {shape}, the module computes {list(computed[key].shape)}")
            sd[key] = computed[key]
        else:
            sd[key] = keyed_tensor(key, shape, salt)
    return sd


def write_keyed_files(
    out_dir: str | Path, layout: str | Path = TINY_LAYOUT, salt: int = TINY_SALT, overwrite: bool = False
) -> list[Path]:
    """Write every file of `layout` into `out_dir` as safetensors (key order as listed). Files that
    exist are kept unless `overwrite`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, shapes in read_layout(layout).items():
        path = out_dir / name
        if path.suffix != ".safetensors":
            raise ValueError(f"{layout}: {name}: only safetensors files are made from a layout")
        if overwrite or not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            save_file(keyed_file(shapes, salt), str(tmp), metadata={})  # as the reference wrote them
            tmp.replace(path)
        written.append(path)
    return written
