"""Image operations of the degradation models, one job each (after BasicSR's degradations).

Every operation takes and returns float32 HWC RGB images in [0, 1] (noise and JPEG clip to
it; resampling and filtering may overshoot slightly, as in the reference). Noise functions take
``seed``: an int or a numpy Generator (as numpy's default_rng), so a logged seed replays the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from .kernels import gaussian_kernel, make_kernel

INTERPOLATIONS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
# Mirror without repeating the edge pixel: PyTorch's "reflect" padding in BasicSR's filter2D
_BORDER = cv2.BORDER_REFLECT_101
# Kernel taps below this are dropped: together they cannot change a [0, 1] image by 2e-9, and as
# float32 denormals (Gaussian tails of small sigmas) they slow OpenCV's filters several times over.
_NEGLIGIBLE = 1e-12


def to_float_rgb(img: np.ndarray) -> tuple[np.ndarray, np.dtype]:
    """Validate an image and return it as float32 HWC RGB in [0, 1], with its original dtype.

    Accepts uint8 ([0, 255]) or floating point ([0, 1]) arrays, HxWx3 RGB or grayscale (HxW or
    HxWx1, replicated to RGB). Refuses RGBA (composite or drop alpha first), other channel
    counts, empty or non-finite images and floats outside [0, 1].
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(img).__name__}")
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3:
        raise ValueError(f"expected an HxWx3 RGB or HxW grayscale image, got shape {img.shape}")
    if img.size == 0:
        raise ValueError(f"empty image, shape {img.shape}")
    channels = img.shape[2]
    if channels == 4:
        raise ValueError("RGBA input: composite onto a background or drop the alpha channel first")
    if channels not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels, got {channels} (shape {img.shape})")
    if img.dtype == np.uint8:
        out = from_uint8(img)
    elif np.issubdtype(img.dtype, np.floating):
        if not np.isfinite(img).all():
            raise ValueError("image contains NaN or infinite values")
        lo, hi = float(img.min()), float(img.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"float images must lie in [0, 1], got values in [{lo:g}, {hi:g}]")
        out = img.astype(np.float32, copy=False)
    else:
        raise ValueError(f"expected uint8 or float pixels, got {img.dtype}")
    if channels == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out), img.dtype


def from_float(img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 [0, 1] to the caller's dtype: uint8 (rounded) or float32."""
    if dtype == np.uint8:
        return to_uint8(img)
    return img.astype(np.float32, copy=False)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """round(255 x) saturated to [0, 255], in one pass (addWeighted with a zero second term)."""
    return cv2.addWeighted(img, 255, img, 0, 0, dtype=cv2.CV_8U)


def from_uint8(img: np.ndarray) -> np.ndarray:
    return np.divide(img, 255, dtype=np.float32)


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate with an odd, centred kernel (OpenCV: direct up to about 11x11 taps, else by DFT).

    Negligible taps are dropped and the kernel cropped to the rest, which can bring it under the
    DFT threshold.
    """
    kernel = np.where(np.abs(kernel) < _NEGLIGIBLE, 0, kernel).astype(np.float32)
    c = kernel.shape[0] // 2
    rows, cols = np.nonzero(kernel)
    ry, rx = np.abs(rows - c).max(), np.abs(cols - c).max()
    return cv2.filter2D(img, -1, kernel[c - ry : c + ry + 1, c - rx : c + rx + 1], borderType=_BORDER)


def gaussian_blur(img: np.ndarray, sigma_x: float, sigma_y: float, theta: float, ksize: int) -> np.ndarray:
    """Gaussian blur with a ksize x ksize kernel, sigma in pixels along the axes rotated by theta."""
    if sigma_x == sigma_y:
        # isotropic: separable; OpenCV's sampled 1-D kernels give the same normalised 2-D kernel,
        # cut where exp(-x^2 / 2 sigma^2) falls below the negligible level
        radius = min(ksize // 2, math.ceil(sigma_x * math.sqrt(-2 * math.log(_NEGLIGIBLE))))
        size = (2 * radius + 1, 2 * radius + 1)
        return cv2.GaussianBlur(img, size, sigma_x, sigmaY=sigma_x, borderType=_BORDER)
    return filter2d(img, gaussian_kernel(ksize, sigma_x, sigma_y, theta))


def blur(img: np.ndarray, kernel: dict) -> np.ndarray:
    """Blur with the kernel a spec describes (see kernels.py)."""
    if kernel["type"] in ("iso", "aniso"):
        return gaussian_blur(img, kernel["sigma_x"], kernel["sigma_y"], kernel["theta"], kernel["size"])
    return filter2d(img, make_kernel(kernel))


def resize(img: np.ndarray, size: Sequence[int], interpolation: str) -> np.ndarray:
    """Resize to size = (height, width) with "area", "bilinear" or "bicubic" (OpenCV, no antialias)."""
    h, w = int(size[0]), int(size[1])
    if (h, w) == img.shape[:2]:
        return img
    return cv2.resize(img, (w, h), interpolation=INTERPOLATIONS[interpolation])


def add_gaussian_noise(img: np.ndarray, sigma: float, gray: bool, seed: int | np.random.Generator) -> np.ndarray:
    """Add N(0, sigma^2) noise, sigma on the 0-255 scale; gray: one field shared by the channels."""
    rng = np.random.default_rng(seed)
    shape = img.shape[:2] + (1 if gray else img.shape[2],)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= sigma / 255
    out = img + noise
    return np.clip(out, 0, 1, out=out)


def add_poisson_noise(img: np.ndarray, scale: float, gray: bool, seed: int | np.random.Generator) -> np.ndarray:
    """Add scaled shot noise (BasicSR): Poisson counts at 2^ceil(log2(#levels)) photons per unit.

    gray: noise of the luma, shared by the channels.
    """
    rng = np.random.default_rng(seed)
    levels = to_uint8(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if gray else img)
    # BasicSR counts the image's distinct 8-bit levels to set the photon count per unit
    vals = 2.0 ** math.ceil(math.log2(np.count_nonzero(np.bincount(levels.ravel(), minlength=256))))
    src = from_uint8(levels)
    noise = rng.poisson(src * vals).astype(np.float32) / vals - src
    noise *= scale
    out = img + (noise[..., None] if gray else noise)
    return np.clip(out, 0, 1, out=out)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of the image at a quality in [0, 100] (libjpeg via OpenCV, 4:2:0 chroma)."""
    bgr = cv2.cvtColor(to_uint8(img), cv2.COLOR_RGB2BGR)  # JPEG's YCbCr conversion expects BGR here
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip at the given quality."""
    bgr = cv2.imdecode(np.frombuffer(encode_jpeg(img, quality), np.uint8), cv2.IMREAD_COLOR)
    return from_uint8(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def usm_sharp(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
    """Unsharp masking as BasicSR's usm_sharp / USMSharp (Real-ESRGAN's GT sharpening).

    Sharpens by weight * (img - blur) where |img - blur| exceeds threshold (0-255 scale), with
    the mask softened by the same Gaussian; radius is the kernel size (made odd), sigma OpenCV's
    default for it.
    """
    ksize = radius + 1 if radius % 2 == 0 else radius
    residual = img - cv2.GaussianBlur(img, (ksize, ksize), 0, borderType=_BORDER)
    mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
    soft_mask = cv2.GaussianBlur(mask, (ksize, ksize), 0, borderType=_BORDER)
    sharp = np.clip(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


def quantize(img: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to 8-bit levels (the reference's final clamp-and-round)."""
    return from_uint8(to_uint8(img))
