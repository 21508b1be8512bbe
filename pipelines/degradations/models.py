"""The degradation models: sample a JSON-able list of operations, then apply it.

Sampling draws every random choice up front (noise included, as a seed), so the returned params
are the complete record of what was applied: ``apply_params(hq, params)`` replays it exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .config import FirstOrderConfig, KernelConfig, RealESRGANConfig, StageConfig
from .kernels import sample_mixed_kernel, sample_sinc_kernel
from .ops import (
    INTERPOLATIONS,
    add_gaussian_noise,
    add_poisson_noise,
    blur,
    from_float,
    jpeg,
    quantize,
    resize,
    to_float_rgb,
    usm_sharp,
)

# An op is {"op": name, **keyword arguments of the function}.
OPS = {
    "usm_sharp": usm_sharp,
    "blur": blur,
    "resize": resize,
    "gaussian_noise": add_gaussian_noise,
    "poisson_noise": add_poisson_noise,
    "jpeg": jpeg,
    "quantize": quantize,
}
_FINAL_SINC_CUTOFF = (math.pi / 3, math.pi)  # Real-ESRGAN's final sinc filter


def _choice(rng: np.random.Generator, options: Sequence, p: Sequence[float] | None = None):
    p = None if p is None else np.asarray(p, dtype=np.float64) / sum(p)
    return options[int(rng.choice(len(options), p=p))]


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**63))


def _size(hw: Sequence[int], factor: float) -> list[int]:
    return [max(1, int(hw[0] * factor)), max(1, int(hw[1] * factor))]


def sample_kernel(rng: np.random.Generator, cfg: KernelConfig) -> dict:
    """A kernel spec: a sinc filter with cfg.sinc_prob, else one of BasicSR's mixed kernels."""
    ksize = int(rng.choice(cfg.sizes))
    if rng.random() < cfg.sinc_prob:
        # BasicSR: small kernels cannot hold the wide ringing of a low cut-off
        low = math.pi / 3 if ksize < 13 else math.pi / 5
        return sample_sinc_kernel(rng, ksize, (low, math.pi))
    return sample_mixed_kernel(
        rng,
        cfg.kernel_list,
        cfg.kernel_prob,
        ksize,
        cfg.sigma_range,
        cfg.rotation_range,
        cfg.betag_range,
        cfg.betap_range,
    )


def _jpeg_op(rng: np.random.Generator, quality_range: Sequence[int]) -> dict:
    return {"op": "jpeg", "quality": int(rng.integers(quality_range[0], quality_range[1], endpoint=True))}


def sample_first_order(cfg: FirstOrderConfig, size: Sequence[int], rng: np.random.Generator) -> dict:
    """Params of the first-order model (also the CodeFormer face model) for an HQ of size (h, w)."""
    h, w = size
    r = float(rng.uniform(*cfg.downsample_range))
    ops = [
        {"op": "blur", "kernel": sample_kernel(rng, cfg.blur)},
        # DiffBIR's (w // r, h // r)
        {"op": "resize", "size": [max(1, int(h // r)), max(1, int(w // r))], "interpolation": "bilinear"},
        {"op": "gaussian_noise", "sigma": float(rng.uniform(*cfg.noise_range)), "gray": False, "seed": _seed(rng)},
        _jpeg_op(rng, cfg.jpeg_range),
        {"op": "resize", "size": [h, w], "interpolation": "bilinear"},
    ]
    return {"model": cfg.model, "input_size": [h, w], "downsample": r, "ops": ops}


def _stage_ops(rng: np.random.Generator, cfg: StageConfig, base: Sequence[int]) -> list[dict]:
    """Blur, resize relative to base (h, w), noise: one Real-ESRGAN stage without its JPEG."""
    ops = []
    if rng.random() < cfg.blur_prob:
        ops.append({"op": "blur", "kernel": sample_kernel(rng, cfg.blur)})
    direction = _choice(rng, ("up", "down", "keep"), cfg.resize_prob)
    factor = 1.0
    if direction == "up":
        factor = float(rng.uniform(1, cfg.resize_range[1]))
    elif direction == "down":
        factor = float(rng.uniform(cfg.resize_range[0], 1))
    ops.append({"op": "resize", "size": _size(base, factor), "interpolation": _choice(rng, tuple(INTERPOLATIONS))})
    if rng.random() < cfg.gaussian_noise_prob:
        noise = {"op": "gaussian_noise", "sigma": float(rng.uniform(*cfg.noise_range))}
    else:
        noise = {"op": "poisson_noise", "scale": float(rng.uniform(*cfg.poisson_scale_range))}
    noise.update(gray=bool(rng.random() < cfg.gray_noise_prob), seed=_seed(rng))
    ops.append(noise)
    return ops


def sample_realesrgan(cfg: RealESRGANConfig, size: Sequence[int], rng: np.random.Generator) -> dict:
    """Params of the Real-ESRGAN second-order model for an HQ of size (h, w)."""
    h, w = size
    lq_size = _size((h, w), 1 / cfg.scale)
    ops = []
    if cfg.usm_sharpen:
        ops.append(
            {"op": "usm_sharp", "weight": cfg.usm_weight, "radius": cfg.usm_radius, "threshold": cfg.usm_threshold}
        )
    ops += _stage_ops(rng, cfg.stage1, (h, w))
    ops.append(_jpeg_op(rng, cfg.stage1.jpeg_range))
    # the second stage resizes relative to the LQ size, as in BasicSR
    ops += _stage_ops(rng, cfg.stage2, lq_size)
    resize_sinc = [{"op": "resize", "size": lq_size, "interpolation": _choice(rng, tuple(INTERPOLATIONS))}]
    if rng.random() < cfg.final_sinc_prob:
        ksize = int(rng.choice(cfg.final_sinc_sizes))
        resize_sinc.append({"op": "blur", "kernel": sample_sinc_kernel(rng, ksize, _FINAL_SINC_CUTOFF)})
    final_jpeg = _jpeg_op(rng, cfg.stage2.jpeg_range)
    # Real-ESRGAN: either order; other placements of the sinc filter give twisted lines
    ops += resize_sinc + [final_jpeg] if rng.random() < 0.5 else [final_jpeg] + resize_sinc
    if cfg.resize_back and lq_size != [h, w]:
        ops.append({"op": "resize", "size": [h, w], "interpolation": "bicubic"})
    ops.append({"op": "quantize"})
    return {"model": cfg.model, "input_size": [h, w], "ops": ops}


def sample_params(
    config: FirstOrderConfig | RealESRGANConfig, size: Sequence[int], rng: np.random.Generator | int
) -> dict:
    """Draw the params of one degradation of an HQ image of size (h, w)."""
    rng = np.random.default_rng(rng)
    if isinstance(config, RealESRGANConfig):
        return sample_realesrgan(config, size, rng)
    if isinstance(config, FirstOrderConfig):
        return sample_first_order(config, size, rng)
    raise TypeError(f"unknown degradation config {type(config).__name__}")


def apply_ops(img: np.ndarray, ops: Sequence[dict]) -> np.ndarray:
    """Run ops on a float32 HWC RGB [0, 1] image."""
    for op in ops:
        img = OPS[op["op"]](img, **{k: v for k, v in op.items() if k != "op"})
    return img


def apply_params(hq: np.ndarray, params: dict) -> np.ndarray:
    """Replay logged params on hq (same conventions as degrade)."""
    img, dtype = to_float_rgb(hq)
    if list(img.shape[:2]) != list(params["input_size"]):
        raise ValueError(f"params were sampled for size {params['input_size']}, image is {list(img.shape[:2])}")
    return from_float(apply_ops(img, params["ops"]), dtype)


def degrade(
    hq: np.ndarray, rng: np.random.Generator | int, config: FirstOrderConfig | RealESRGANConfig | None = None
) -> tuple[np.ndarray, dict]:
    """Degrade an HQ image; returns (lq, params).

    hq: HxWx3 RGB, uint8 [0, 255] or float [0, 1]; grayscale HxW / HxWx1 is replicated to RGB,
    RGBA is refused. lq: HxWx3 RGB (HQ size unless a Real-ESRGAN config has resize_back off),
    uint8 for uint8 input, else float32 in [0, 1]. rng: a Generator (advanced) or an int seed;
    the same seed gives a bit-identical lq. params: JSON-able record of every sampled value.
    config: FirstOrderConfig (default), CodeFormerFaceConfig or RealESRGANConfig.
    """
    _, lq, params = degrade_pair(hq, rng, config)
    return lq, params


def degrade_pair(
    hq: np.ndarray, rng: np.random.Generator | int, config: FirstOrderConfig | RealESRGANConfig | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """A training pair from an HQ image: (target, lq, params), as degrade. The target is the HQ,
    or the USM-sharpened HQ when the config sharpens (usm_sharpen: the reference trains towards
    the sharpened ground truth that the LQ was degraded from)."""
    img, dtype = to_float_rgb(hq)
    params = sample_params(FirstOrderConfig() if config is None else config, img.shape[:2], rng)
    ops = params["ops"]
    sharpen = 1 if ops and ops[0]["op"] == "usm_sharp" else 0  # sampling puts it first
    target = apply_ops(img, ops[:sharpen])
    return from_float(target, dtype), from_float(apply_ops(target, ops[sharpen:]), dtype), params
