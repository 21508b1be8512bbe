"""Full-reference image metrics (PSNR, SSIM): the one place they are computed.

Restoration papers measure the same images in different ways, so every number here comes with a
`MetricConvention`:

- `space`: "rgb" (all three channels, SSIM averaged over them) or "y", the luma of ITU-R BT.601
  YCbCr as BasicSR computes it: Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in [0, 1]
  (Y on [16, 235], not rounded), the usual convention of super-resolution papers.
- `crop`: pixels cut from each border before measuring (SR papers crop the scale factor).
- `uint8`: round the images to 8 bits first, as writing them to PNG would.

PSNR and SSIM are taken on the [0, 255] scale (data_range 255). SSIM is Wang et al. 2004's, as
restoration papers and BasicSR report it: an 11x11 Gaussian window with sigma 1.5 and population
covariances (scikit-image's `structural_similarity` with those settings).

`PLATFORM` (RGB, no crop, uint8 rounding) is the convention of the platform's own numbers:
training validation (training/train_rm.py, train_gm.py) and promotion (training/promote.py) both
use it, so the PSNR a training run logs is the PSNR promotion compares, and both are what the
restored images measure once written to disk.

Inputs are HxWxC arrays, float in [0, 1] or uint8 in [0, 255]; the two images of a pair must
have the same shape and kind. PSNR of identical images (after the convention's rounding and
crop) is `math.inf`, returned as is: a mean over a set that holds one is inf as well.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])  # BT.601 luma of [0, 1] RGB, scaled to [16, 235]
_WANG_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


class MetricConvention(BaseModel):
    """How a pair of images is measured (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: Literal["rgb", "y"] = Field("rgb", description="rgb: all channels; y: BT.601 luma (BasicSR)")
    crop: int = Field(0, ge=0, description="pixels cut from each border before measuring")
    uint8: bool = Field(True, description="round to 8 bits before measuring, as an image written to disk")


PLATFORM = MetricConvention()


def psnr(pred: np.ndarray, target: np.ndarray, convention: MetricConvention = PLATFORM) -> float:
    """PSNR in dB (inf for identical images)."""
    return _psnr(*_prepare(pred, target, convention))


def ssim(pred: np.ndarray, target: np.ndarray, convention: MetricConvention = PLATFORM) -> float:
    """SSIM (1 for identical images)."""
    return _ssim(*_prepare(pred, target, convention))


def image_metrics(pred: np.ndarray, target: np.ndarray, convention: MetricConvention = PLATFORM) -> dict[str, float]:
    """{"psnr": ..., "ssim": ...} of one pair."""
    a, b = _prepare(pred, target, convention)
    return {"psnr": _psnr(a, b), "ssim": _ssim(a, b)}


def batch_metrics(
    pred: torch.Tensor, target: torch.Tensor, convention: MetricConvention = PLATFORM
) -> dict[str, float]:
    """Mean PSNR and SSIM over a batch of NCHW image tensors in [0, 1] (clamped: raw network output)."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two NCHW batches of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")

    def to_hwc(x: torch.Tensor) -> np.ndarray:
        return x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    scores = [image_metrics(p, t, convention) for p, t in zip(to_hwc(pred), to_hwc(target))]
    return {k: float(np.mean([s[k] for s in scores])) for k in ("psnr", "ssim")}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    if np.array_equal(a, b):
        return math.inf  # explicit: skimage would divide by zero, with a RuntimeWarning
    return float(peak_signal_noise_ratio(b, a, data_range=255))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(b, a, data_range=255, channel_axis=2 if a.ndim == 3 else None, **_WANG_SSIM))


def _prepare(pred: np.ndarray, target: np.ndarray, convention: MetricConvention) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 on [0, 255] (RGB, or Y as HxW), rounded and cropped as the convention says."""
    if pred.shape != target.shape:
        raise ValueError(f"images differ in shape: {pred.shape} vs {target.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected HxWxC images, got shape {pred.shape}")
    if convention.space == "y" and pred.shape[2] != 3:
        raise ValueError(f"the y convention needs RGB images, got {pred.shape[2]} channels")
    if 2 * convention.crop >= min(pred.shape[:2]):
        raise ValueError(f"a border crop of {convention.crop} pixels leaves nothing of a {pred.shape[:2]} image")
    if pred.dtype == target.dtype == np.uint8:
        images = [x.astype(np.float64) for x in (pred, target)]
    elif np.issubdtype(pred.dtype, np.floating) and np.issubdtype(target.dtype, np.floating):
        for x in (pred, target):
            if not (x.min() >= 0 and x.max() <= 1):  # also false for NaN
                raise ValueError(f"float images must lie in [0, 1], got values in [{x.min()}, {x.max()}]")
        images = [x.astype(np.float64) * 255 for x in (pred, target)]
        if convention.uint8:
            images = [np.round(x) for x in images]
    else:
        raise ValueError(f"expected two uint8 or two float images, got {pred.dtype} and {target.dtype}")
    if c := convention.crop:
        images = [x[c:-c, c:-c] for x in images]
    if convention.space == "y":
        images = [16 + x @ _Y_WEIGHTS / 255 for x in images]
    return images[0], images[1]
