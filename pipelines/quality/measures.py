"""Pure image-quality measures: small functions over a decoded numpy image (H×W×3 RGB or H×W
gray, uint8), no I/O and no decisions.

Units: pixel values are 8-bit levels (0..255); `mean_luminance` and the fractions are in [0, 1];
`entropy` is in bits (0..8). Measurements that would otherwise scale with the image size
(sharpness, flat fraction) are taken on the gray image resized to a short side of `NORM_SIDE`;
the ones that describe pixel-level structure (effective resolution, noise, blockiness) are taken
at native resolution. `measure_stages` yields them in groups, cheapest first (`STAGES`), so that a
judge can stop early.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import cv2
import numpy as np
import pyarrow as pa
import scipy.fft
from PIL import Image

NORM_SIDE = 512  # short side at which size-dependent measurements are taken
DARK_LEVEL, BRIGHT_LEVEL = 8, 247  # gray levels counted as clipped shadows / highlights
FLAT_STD = 2.0  # a pixel is "flat" when the std of its 7×7 neighbourhood is below this (levels)
# Fraction of spectral energy above 0.25 cycles/px that a detailed image keeps at full resolution.
# Measured on the bundled photos: sharp ones 0.045–0.17 (0.03 after a 1.7× upscale); a 2× upscale
# of a sharp photo 0.0085, a 4× upscale 0.0007, Gaussian blur σ=1 0.002.
DETAIL_LEVEL = 0.015


# --------------------------------------------------------------------------- measurements


def to_gray(img: np.ndarray) -> np.ndarray:
    """uint8 luminance (ITU-R 601 weights, as OpenCV); gray input is returned unchanged."""
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def _normalised(gray: np.ndarray, side: int = NORM_SIDE) -> np.ndarray:
    """float32 gray resized to `side` on the short side with PIL's Lanczos, whose kernel widens
    with the reduction factor, so the result has the same response on the new pixel grid
    whatever the source size. (OpenCV's area and bicubic do not: one retina photo measured
    Laplacian variance 68 from 1411 px and 43 from 600 px; with this, 91 and 90.)"""
    h, w = gray.shape
    if min(h, w) != side:  # `measure_stages` normalises once and passes the result on
        f = side / min(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        gray = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.LANCZOS))
    return gray.astype(np.float32)


def _center_crop(img: np.ndarray, side: int = 1024) -> np.ndarray:
    """At most side×side from the centre, origin on the 8×8 JPEG grid; local statistics (noise,
    blockiness) do not need more pixels, and this bounds their cost on 12 MP originals."""
    h, w = img.shape[:2]
    y, x = max(0, (h - side) // 2) // 8 * 8, max(0, (w - side) // 2) // 8 * 8
    return img[y : y + side, x : x + side]


def sharpness(img: np.ndarray) -> float:
    """Variance of the 3×3 Laplacian (levels²) at `NORM_SIDE` short side; ≥ 0. Clean photos here:
    60–2500; Gaussian blur σ=4 → 3. Small images are upscaled first, which lowers it: chelsea
    (300 px) measures 66, against a raw Laplacian variance of 400 at its native size."""
    return float(cv2.Laplacian(_normalised(to_gray(img)), cv2.CV_32F).var())


def flat_fraction(img: np.ndarray) -> float:
    """Fraction in [0, 1] of pixels whose 7×7 neighbourhood std is below `FLAT_STD`, at
    `NORM_SIDE` short side: large uniform areas (sky, studio backdrops, graphics)."""
    g = _normalised(to_gray(img))
    mean = cv2.blur(g, (7, 7))
    var = cv2.blur(g * g, (7, 7)) - mean * mean
    return float((var < FLAT_STD**2).mean())


def hf_energy_ratio(img: np.ndarray, tile: int = 256, tiles: int = 4) -> float:
    """Share in [0, 1] of spectral energy above 0.25 cycles/px (the octave only a full-resolution
    image fills), over energy above 1/32 cycles/px (lower bins mostly hold window leakage and
    shading). Taken on the `tiles` most varied tile×tile crops at native resolution, so a flat
    background does not dilute it; 0 for featureless images."""
    g = to_gray(img).astype(np.float32)
    t = min(tile, *g.shape)
    if t < 16:
        return 0.0
    ny, nx = g.shape[0] // t, g.shape[1] // t
    grid = g[: ny * t, : nx * t].reshape(ny, t, nx, t)  # tile (i, j) is grid[i, :, j, :], no copy
    most_varied = np.argsort(-grid.var(axis=(1, 3)).ravel(), kind="stable")[:tiles]
    crops = np.stack([grid[i // nx, :, i % nx, :] for i in most_varied])
    window = np.outer(np.hanning(t), np.hanning(t)).astype(np.float32)
    power = (np.abs(scipy.fft.rfft2((crops - crops.mean(axis=(1, 2), keepdims=True)) * window)) ** 2).sum(axis=0)
    power[:, 1 : (t + 1) // 2] *= 2  # rfft keeps one of each conjugate pair of columns
    radius = np.hypot(*np.meshgrid(np.fft.rfftfreq(t), np.fft.fftfreq(t)))
    total = power[radius > 1 / 32].sum()
    return float(power[radius > 0.25].sum() / total) if total > 1e-6 * power.size else 0.0


def effective_short_side(img: np.ndarray) -> int:
    """Estimate of the resolution the pixels really carry, in pixels on the short side: halve the
    image until its top octave holds `DETAIL_LEVEL` of the energy. An image upscaled 4× from
    128 px reports ~128; a large but slightly soft original still reports most of its size."""
    g = to_gray(img)
    short, scale = min(g.shape), 1
    while min(g.shape) >= 32:
        if hf_energy_ratio(g) >= DETAIL_LEVEL:
            return short // scale
        g = cv2.resize(g, (g.shape[1] // 2, g.shape[0] // 2), interpolation=cv2.INTER_AREA)
        scale *= 2
    return 0


_D2 = np.array([1, -2, 1], np.float32)  # Immerkær's mask [[1,-2,1],[-2,4,-2],[1,-2,1]] is D2ᵀ·D2


def noise_sigma(img: np.ndarray) -> float:
    """Gaussian noise std in 8-bit levels, the mean over colour channels. Immerkær's estimator
    (mean |I ∗ N| · √(π/2) / 6, N = the Laplacian difference above) restricted to the flattest
    half of the image (gradient of a σ=2 blur, so the mask ignores the noise itself) and to
    unclipped pixels: texture otherwise reads as noise. Clean photos here: 0.3–3.2; added
    σ=25 noise → ~22 (clipping at 0/255 removes some)."""
    crop = _center_crop(img)
    gray = to_gray(crop)
    dx, dy = cv2.spatialGradient(cv2.GaussianBlur(gray, (0, 0), 2))
    grad = np.abs(dx) + np.abs(dy)
    mask = cv2.inRange(gray, 3, 252)  # 255 where unclipped
    mask[[0, -1], :] = mask[:, [0, -1]] = 0  # the 3×3 filter is undefined on the border
    sample = grad.ravel()[::7][mask.ravel()[::7] > 0]  # every 7th pixel gives the same median, 7× cheaper
    if not sample.size:
        return 0.0
    mask &= (grad <= np.median(sample)).view(np.uint8)
    if not mask.any():
        return 0.0
    # exact in int16 (|residual| ≤ 16·255 per channel); one masked mean of the channels' sum is
    # the mean of their masked means, and OpenCV's is ~3× faster than a numpy boolean mask
    channels = cv2.split(crop)
    residual = sum(np.abs(cv2.sepFilter2D(c, cv2.CV_16S, _D2, _D2)) for c in channels)
    return float(cv2.mean(residual, mask=mask)[0] / len(channels) * math.sqrt(math.pi / 2) / 6)


def blockiness(img: np.ndarray) -> float:
    """Mean absolute step across 8×8 block boundaries over the mean step inside blocks (native
    resolution, centre crop, both directions averaged). ≈1 for clean images (0.97–1.04 here);
    JPEG q=75 → 1.2, q=50 → 1.34, q=10 → 2.3. Catches JPEG damage that a later PNG/WebP
    re-save hid from the quantisation tables."""
    g = to_gray(_center_crop(img))
    ratios = []
    for axis in (1, 0):
        if g.shape[axis] < 17:
            continue
        d = cv2.absdiff(g[:, 1:], g[:, :-1]) if axis else cv2.absdiff(g[1:], g[:-1])
        edge = d[:, 7::8] if axis else d[7::8]
        edge_sum, total = int(edge.sum(dtype=np.int64)), int(d.sum(dtype=np.int64))
        inner = (total - edge_sum) / (d.size - edge.size)
        ratios.append(edge_sum / edge.size / inner if inner > 1e-3 else 1.0)
    return float(np.mean(ratios)) if ratios else 1.0


def luminance_stats(img: np.ndarray) -> dict[str, float]:
    """From one 256-bin gray histogram: `entropy` (bits, 0..8; a constant image is 0, photos
    ≈ 6.5–7.8), `dark_fraction` (≤ `DARK_LEVEL`), `bright_fraction` (≥ `BRIGHT_LEVEL`) and
    `mean_luminance` (0..1)."""
    gray = to_gray(img)
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.float64) / gray.size
    p = hist[hist > 0]
    return {
        "entropy": float((p * np.log2(1 / p)).sum()),
        "dark_fraction": float(hist[: DARK_LEVEL + 1].sum()),
        "bright_fraction": float(hist[BRIGHT_LEVEL:].sum()),
        "mean_luminance": float(hist @ np.arange(256) / 255),
    }


# IJG (libjpeg) base tables, JPEG standard Annex K, natural (row-major) order as PIL reports them.
_LUMA = np.array(
    [
        16,
        11,
        10,
        16,
        24,
        40,
        51,
        61,
        12,
        12,
        14,
        19,
        26,
        58,
        60,
        55,
        14,
        13,
        16,
        24,
        40,
        57,
        69,
        56,
        14,
        17,
        22,
        29,
        51,
        87,
        80,
        62,
        18,
        22,
        37,
        56,
        68,
        109,
        103,
        77,
        24,
        35,
        55,
        64,
        81,
        104,
        113,
        92,
        49,
        64,
        78,
        87,
        103,
        121,
        120,
        101,
        72,
        92,
        95,
        98,
        112,
        100,
        103,
        99,
    ]
)
_CHROMA = np.full(64, 99)
_CHROMA[[0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 24, 25]] = [17, 18, 24, 47, 18, 21, 26, 66, 24, 26, 56, 47, 66]


def _ijg_tables() -> np.ndarray:
    """(100, 2, 64): libjpeg's luma/chroma tables for quality 1..100 (baseline, clamped to 1..255)."""
    q = np.arange(1, 101)[:, None, None]
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)
    return np.clip((np.stack([_LUMA, _CHROMA])[None] * scale + 50) // 100, 1, 255)


_IJG = _ijg_tables()


def jpeg_quality(quantization: Mapping[int, Sequence[int]] | None) -> int | None:
    """IJG quality (1..100) whose scaled standard tables are closest (L1) to the file's luma and
    chroma tables (PIL's `Image.quantization`); None when there are none (not a JPEG). Exact for
    libjpeg/PIL encoders; for custom tables (cameras, Photoshop) the nearest IJG equivalent."""
    if not quantization:
        return None
    tables = np.array([list(quantization[k]) for k in sorted(quantization)][:2])
    errors = np.abs(_IJG[:, : len(tables)] - tables[None]).sum(axis=(1, 2))
    return int(np.argmin(errors)) + 1


class _Views:
    """The derived images several measures share, each made once, when first needed."""

    def __init__(self, px: np.ndarray):
        self.px = px

    @functools.cached_property
    def gray(self) -> np.ndarray:
        return to_gray(self.px)

    @functools.cached_property
    def norm(self) -> np.ndarray:
        return _normalised(self.gray)


def _resolution(v: _Views) -> dict[str, float | int]:
    hf = hf_energy_ratio(v.gray)
    effective = min(v.gray.shape) if hf >= DETAIL_LEVEL else effective_short_side(v.gray)
    return {"hf_energy_ratio": hf, "effective_short_side": effective}


# The measures in groups, cheapest first (per ~1 MP image on one core: luminance ~0.5 ms,
# resolution ~2 ms, blockiness ~1.6 ms, detail ~5 ms, noise ~4 ms). The judge checks each group's
# scores as they come and, unless told to measure everything, stops at the first failed check:
# the rejected majority of a web crawl then costs a fraction of a full measurement.
STAGES: tuple[Callable[[_Views], dict[str, float | int]], ...] = (
    lambda v: luminance_stats(v.gray),
    _resolution,
    lambda v: {"blockiness": blockiness(v.gray)},
    lambda v: {"sharpness": sharpness(v.norm), "flat_fraction": flat_fraction(v.norm)},
    lambda v: {"noise_sigma": noise_sigma(v.px)},
)


def measure_stages(
    px: np.ndarray, quantization: Mapping[int, Sequence[int]] | None = None
) -> Iterator[dict[str, float | int | None]]:
    """The pixel scores of one image (SCORE_TYPES without `learned_iqa`, which the scorer adds),
    group by group in `STAGES` order; the first group also holds what the header gives (size,
    `jpeg_quality`). `px` is H×W×3 RGB uint8 as `decode_image(..., dtype=np.uint8)` gives it,
    `quantization` its ImageInfo's JPEG tables."""
    h, w = px.shape[:2]
    views = _Views(px)
    header = {"width": w, "height": h, "short_side": min(w, h), "jpeg_quality": jpeg_quality(quantization)}
    for i, stage in enumerate(STAGES):
        yield (header if i == 0 else {}) | stage(views)


SCORE_TYPES: dict[str, pa.DataType] = {
    "width": pa.int64(),
    "height": pa.int64(),
    "short_side": pa.int64(),
    "effective_short_side": pa.int64(),
    "hf_energy_ratio": pa.float64(),
    "sharpness": pa.float64(),
    "noise_sigma": pa.float64(),
    "jpeg_quality": pa.int64(),
    "blockiness": pa.float64(),
    "flat_fraction": pa.float64(),
    "entropy": pa.float64(),
    "dark_fraction": pa.float64(),
    "bright_fraction": pa.float64(),
    "mean_luminance": pa.float64(),
    "learned_iqa": pa.float64(),
}
SCORE_NAMES = tuple(SCORE_TYPES)
