"""Image-quality filter: is a downloaded image genuinely sharp, clean and large enough to be a
restoration *target*?

Every measurement is a small pure function over a decoded numpy image (H×W×3 RGB or H×W gray,
uint8). Units: pixel values are 8-bit levels (0..255); `mean_luminance` and the fractions are in
[0, 1]; `entropy` is in bits (0..8). Measurements that would otherwise scale with the image size
(sharpness, flat fraction) are taken on the gray image resized to a short side of `NORM_SIDE`;
the ones that describe pixel-level structure (effective resolution, noise, blockiness) are taken
at native resolution.

`assess(bytes, meta)` scores one image; `filter_quality(tars, config)` runs the same code over
img2dataset's webdataset tars on Ray Data. Rows keep a reference to their bytes (tar URL, offset,
size) instead of the bytes themselves, so everything after this stage moves kilobytes per image;
`pipelines.shards` reads the bytes back when it writes the final shards.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import posixpath
import tarfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np
import pyarrow as pa
import scipy.fft
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from diffbir.image_io import READABLE_SUFFIXES, ImageError, decode_image
from pipelines.arrow import batched_tables
from pipelines.dedup import phash_hex

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

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
    if min(h, w) != side:  # `measure` normalises once and passes the result on
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
    crops = [g[y : y + t, x : x + t] for y in range(0, g.shape[0] - t + 1, t) for x in range(0, g.shape[1] - t + 1, t)]
    crops = np.stack(sorted(crops, key=lambda c: -float(c.var()))[:tiles])
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


_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)


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
    mask = (gray > 2) & (gray < 253)
    mask[[0, -1], :] = mask[:, [0, -1]] = False  # the 3×3 filter is undefined on the border
    if not mask.any():
        return 0.0
    mask &= grad <= np.median(grad[mask][::7])  # a subsample gives the same median, 7× cheaper
    channels = crop.reshape(*crop.shape[:2], -1).transpose(2, 0, 1)
    residual = [np.abs(cv2.filter2D(c.astype(np.float32), -1, _IMMERKAER))[mask].mean() for c in channels]
    return float(np.mean(residual) * math.sqrt(math.pi / 2) / 6)


def blockiness(img: np.ndarray) -> float:
    """Mean absolute step across 8×8 block boundaries over the mean step inside blocks (native
    resolution, centre crop, both directions averaged). ≈1 for clean images (0.97–1.04 here);
    JPEG q=75 → 1.2, q=50 → 1.34, q=10 → 2.3. Catches JPEG damage that a later PNG/WebP
    re-save hid from the quantisation tables."""
    g = to_gray(_center_crop(img))
    ratios = []
    for a in (g, np.ascontiguousarray(g.T)):
        if a.shape[1] < 17:
            continue
        d = cv2.absdiff(a[:, 1:], a[:, :-1])
        edge = d[:, 7::8]
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


# --------------------------------------------------------------------------- decision


def measure(px: np.ndarray, quantization: Mapping[int, Sequence[int]] | None = None) -> dict[str, float | int | None]:
    """Every pixel score of one image (SCORE_TYPES without `learned_iqa`, which the scorer adds):
    `px` is H×W×3 RGB uint8 as `decode_image(..., dtype=np.uint8)` gives it, `quantization` its
    ImageInfo's JPEG tables."""
    gray = to_gray(px)
    norm = _normalised(gray)  # shared by the size-normalised measurements
    h, w = gray.shape
    hf = hf_energy_ratio(gray)
    return {
        "width": w,
        "height": h,
        "short_side": min(w, h),
        "effective_short_side": min(w, h) if hf >= DETAIL_LEVEL else effective_short_side(gray),
        "hf_energy_ratio": hf,
        "sharpness": sharpness(norm),
        "noise_sigma": noise_sigma(px),
        "jpeg_quality": jpeg_quality(quantization),
        "blockiness": blockiness(gray),
        "flat_fraction": flat_fraction(norm),
        **luminance_stats(gray),
    }


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

# (reason, score, "min"|"max", config field) in priority order: the first failure is the primary
# reason a sample is counted under; all failures are kept in `reasons`.
CHECKS = (
    ("too_small", "short_side", "min", "min_short_side"),
    ("low_effective_resolution", "effective_short_side", "min", "min_effective_short_side"),
    ("blurry", "sharpness", "min", "min_sharpness"),
    ("noisy", "noise_sigma", "max", "max_noise_sigma"),
    ("low_jpeg_quality", "jpeg_quality", "min", "min_jpeg_quality"),
    ("blocky", "blockiness", "max", "max_blockiness"),
    ("low_entropy", "entropy", "min", "min_entropy"),
    ("flat", "flat_fraction", "max", "max_flat_fraction"),
    ("underexposed", "mean_luminance", "min", "min_mean_luminance"),
    ("underexposed", "dark_fraction", "max", "max_dark_fraction"),
    ("overexposed", "mean_luminance", "max", "max_mean_luminance"),
    ("overexposed", "bright_fraction", "max", "max_bright_fraction"),
)


class LearnedIQAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="a name registered with register_learned_iqa, or 'module:Class'")
    weights_path: str = Field(description="local weights file; nothing is downloaded")
    min_score: float


class QualityConfig(BaseModel):
    """Thresholds; None disables a check. Defaults are for restoration *targets* (DiffBIR trains
    on 512×512 crops and synthesises every degradation itself, so the targets must carry none):
    values from the measurements documented on each function."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_short_side: int | None = 512  # a full 512 training crop without upscaling
    min_effective_short_side: int | None = 512  # ...also in real detail: rejects ≥2× upscales
    min_sharpness: float | None = 40.0  # clean photos ≥ 63 (chelsea after 1.7× upscale); blur σ=4: 3
    max_noise_sigma: float | None = 6.0  # clean ≤ 3.2; σ=5 noise reads 5.4, σ=10 reads 9.7
    min_jpeg_quality: int | None = 75  # below ~75 ringing and blocks are visible at 100 %
    max_blockiness: float | None = 1.3  # clean ≤ 1.04, JPEG q=75 1.2, q=50 1.34
    min_entropy: float | None = 4.0  # photos ≥ 5 bits; logos, blank and 2-tone images lower
    max_flat_fraction: float | None = 0.8  # photos with sky or dark backdrops reach 0.65
    min_mean_luminance: float | None = 0.10
    max_mean_luminance: float | None = 0.90
    max_dark_fraction: float | None = 0.25  # clean ≤ 0.17; 2.7 stops underexposed 0.30
    max_bright_fraction: float | None = 0.20  # clean ≤ 0.05; +1.6 stops overexposed 0.56
    learned_iqa: LearnedIQAConfig | None = None

    def thresholds(self) -> dict[str, list[tuple[str, float]]]:
        """score → [(bound, value)] for every enabled check (for reports and plots)."""
        out: dict[str, list[tuple[str, float]]] = {}
        for _, score, bound, name in CHECKS:
            if getattr(self, name) is not None:
                out.setdefault(score, []).append((bound, getattr(self, name)))
        if self.learned_iqa:
            out["learned_iqa"] = [("min", self.learned_iqa.min_score)]
        return out


@dataclass
class QualityResult:
    scores: dict[str, float | int | None]
    passed: bool
    reasons: list[str]
    phash: str | None = None  # 64-bit pHash (hex) for dedup, computed here so each image is decoded once


def judge(scores: Mapping[str, Any], config: QualityConfig, meta: Mapping[str, Any] | None = None) -> list[str]:
    """Reasons (priority order, no repeats) the scores fail the config; [] means keep."""
    reasons = []
    declared = meta and (meta.get("width"), meta.get("height"))
    if (
        declared
        and all(isinstance(v, int) for v in declared)
        and sorted(declared) != sorted((scores["width"], scores["height"]))
    ):
        reasons.append("size_mismatch")  # the bytes are not the image the downloader recorded
    checks = list(CHECKS)
    if config.learned_iqa:
        checks.append(("low_learned_iqa", "learned_iqa", "min", None))
    for reason, score, bound, name in checks:
        limit = config.learned_iqa.min_score if name is None else getattr(config, name)
        value = scores.get(score)
        if limit is None or value is None or reason in reasons:
            continue
        if value < limit if bound == "min" else value > limit:
            reasons.append(reason)
    return reasons


def assess_batch(
    items: Sequence[tuple[bytes, Mapping[str, Any] | None]], config: QualityConfig, iqa: LearnedIQA | None = None
) -> list[QualityResult]:
    """`assess` over a batch, so a learned scorer sees the decodable images in one call."""
    results, kept_pixels = [], {}  # index of each decodable item → its pixels (only for the scorer)
    for i, (image_bytes, _) in enumerate(items):
        try:
            pixels, info = decode_image(image_bytes, dtype=np.uint8)
        except ImageError:
            results.append(QualityResult({}, False, ["decode_error"]))
            continue
        results.append(QualityResult(measure(pixels, info.quantization), True, [], phash_hex(pixels)))
        kept_pixels[i] = pixels if iqa is not None else None
    if iqa is not None and kept_pixels:
        values = np.asarray(iqa.score(list(kept_pixels.values())), dtype=float).reshape(-1)
        for i, value in zip(kept_pixels, values):
            results[i].scores["learned_iqa"] = float(value)
    for i in kept_pixels:
        results[i].reasons = judge(results[i].scores, config, items[i][1])
        results[i].passed = not results[i].reasons
    return results


def assess(
    image_bytes: bytes,
    meta: Mapping[str, Any] | None = None,
    config: QualityConfig | None = None,
    *,
    iqa: LearnedIQA | None = None,
) -> QualityResult:
    """Score one image. Never raises on bad bytes: undecodable → reasons ["decode_error"]. With
    `config.learned_iqa` set and no `iqa` given, the scorer is loaded for this call (pass `iqa=`
    to reuse one). `meta` is the sample's JSON: its width/height must match the decoded size."""
    config = config or QualityConfig()
    if iqa is None and config.learned_iqa:
        iqa = load_learned_iqa(config.learned_iqa)
    return assess_batch([(image_bytes, meta)], config, iqa)[0]


# --------------------------------------------------------------------------- learned IQA


class LearnedIQA(Protocol):
    """A no-reference quality model (MUSIQ, MANIQA, CLIP-IQA, ...) wrapped for the filter."""

    def load(self, weights_path: str) -> None: ...

    def score(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 images of any size → one score each (higher is better)."""
        ...


LEARNED_IQA: dict[str, type] = {}


def register_learned_iqa(name: str):
    """Class decorator. Ray workers only see registrations made on import, so a scorer defined
    outside `pipelines` is better named by import path ('package.module:Class')."""

    def add(cls: type) -> type:
        LEARNED_IQA[name] = cls
        return cls

    return add


def load_learned_iqa(config: LearnedIQAConfig) -> LearnedIQA:
    if config.name in LEARNED_IQA:
        cls = LEARNED_IQA[config.name]
    elif ":" in config.name:
        module, _, attr = config.name.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    else:
        raise KeyError(f"unknown learned IQA {config.name!r}: registered {sorted(LEARNED_IQA)}, or give 'module:Class'")
    path = Path(config.weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"learned IQA {config.name!r}: weights file {path} does not exist. Weights are never "
            "downloaded: copy the file there or fix learned_iqa.weights_path."
        )
    scorer = cls()
    scorer.load(str(path))
    return scorer


class TorchIQA(ABC):
    """Base for torch scorers: a subclass gives `build()` (the untrained network, mapping an
    N×3×S×S float batch in [0, 1] to N scores) and `input_size`; `load` fills it from a state
    dict in .safetensors or a torch.save file (read with weights_only=True: never unpickles code)."""

    input_size = 224

    @abstractmethod
    def build(self):
        """The untrained scoring network."""

    def load(self, weights_path: str) -> None:
        import torch

        if weights_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights_path)
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        self.model = self.build().eval()
        self.model.load_state_dict(state)

    def score(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        s = self.input_size
        x = np.stack([cv2.resize(im, (s, s), interpolation=cv2.INTER_AREA) for im in batch])
        with torch.inference_mode():
            out = self.model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
        return out.reshape(len(batch)).float().numpy()


# --------------------------------------------------------------------------- webdataset input

# a sample of an img2dataset download tar, as iter_tar_samples reads it
DOWNLOADED_SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("ext", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("meta", pa.string()),
        ("error", pa.string()),
    ]
)
SCORED_SCHEMA = pa.schema(
    [f for f in DOWNLOADED_SAMPLE_SCHEMA if f.name != "image"]
    + [("sha256", pa.string()), ("phash", pa.string())]
    + [(name, t) for name, t in SCORE_TYPES.items()]
    + [("reasons", pa.list_(pa.string())), ("reason", pa.string()), ("passed", pa.bool_())]
)


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Stream one img2dataset tar (fsspec URL) as DOWNLOADED_SAMPLE_SCHEMA rows, members grouped
    by key. A sample without an image gets error 'missing_image'; a malformed or truncated tar
    ends with one row with error 'tar_error' (its last, possibly incomplete, sample is dropped)."""
    import fsspec

    def row(key: str, members: dict) -> dict:
        ext = next((s[1:] for s in READABLE_SUFFIXES if s[1:] in members), None)
        offset, data = members.get(ext, (None, None))
        txt = members.get("txt", (0, b""))[1]
        return {
            "key": key,
            "source": url,
            "offset": offset,
            "size": None if data is None else len(data),
            "ext": ext,
            "image": data,
            "caption": txt.decode("utf-8", "replace"),
            "meta": members.get("json", (0, b""))[1].decode("utf-8", "replace"),
            "error": None if ext else "missing_image",
        }

    key, members = None, {}
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = posixpath.basename(member.name).partition(".")
                if stem != key and members:
                    yield row(key, members)
                    members = {}
                key = stem
                members[ext.lower()] = (member.offset_data, tar.extractfile(member).read())
        if members:
            yield row(key, members)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        log.warning("unreadable tar %s: %s", url, exc)
        yield {
            "key": f"{posixpath.basename(url)}:tar_error",
            "source": url,
            "offset": None,
            "size": None,
            "ext": None,
            "image": None,
            "caption": "",
            "meta": "",
            "error": "tar_error",
        }


def _parse_meta(text: str) -> dict | None:
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def score_rows(rows: Sequence[Mapping[str, Any]], config: QualityConfig, iqa: LearnedIQA | None = None) -> list[dict]:
    """DOWNLOADED_SAMPLE_SCHEMA rows → SCORED_SCHEMA rows (bytes replaced by their SHA-256)."""
    out, todo = [], []
    for row in rows:
        rec = {k: row[k] for k in DOWNLOADED_SAMPLE_SCHEMA.names if k != "image"}
        rec |= dict.fromkeys(SCORE_NAMES) | {
            "sha256": None,
            "phash": None,
            "reasons": [],
            "reason": None,
            "passed": False,
        }
        meta = None if row["error"] else _parse_meta(row["meta"])
        if meta is None and not rec["error"]:
            rec["error"] = "bad_metadata"
        if rec["error"]:
            rec["reasons"] = [rec["error"]]
        else:
            rec["sha256"] = hashlib.sha256(row["image"]).hexdigest()
            todo.append((rec, row["image"], meta))
        out.append(rec)
    for (rec, _, _), result in zip(todo, assess_batch([(img, meta) for _, img, meta in todo], config, iqa)):
        rec |= result.scores
        rec |= {"phash": result.phash, "reasons": result.reasons}
    for rec in out:
        rec["passed"] = not rec["reasons"]
        rec["reason"] = rec["reasons"][0] if rec["reasons"] else None
    return out


class _Scorer:
    """Ray Data actor: loads the learned scorer (if any) once per worker."""

    def __init__(self, config: QualityConfig):
        cv2.setNumThreads(1)  # parallelism comes from the actors; OpenCV threads would oversubscribe
        self.config = config
        self.iqa = load_learned_iqa(config.learned_iqa) if config.learned_iqa else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(score_rows(batch.to_pylist(), self.config, self.iqa), schema=SCORED_SCHEMA)


def _read_tar_batch(batch: pa.Table, rows_per_block: int = 32) -> Iterator[pa.Table]:
    for url in batch["path"].to_pylist():
        yield from batched_tables(iter_tar_samples(url), DOWNLOADED_SAMPLE_SCHEMA, rows_per_block)


def list_tars(source: str | Sequence[str]) -> list[str]:
    """A directory (local or fsspec URL) → its *.tar, a glob → its matches, a list → itself."""
    import fsspec

    if not isinstance(source, str):
        return list(source)
    fs, path = fsspec.core.url_to_fs(source)
    pattern = path if any(c in path for c in "*?[") else (path.rstrip("/") + "/*.tar" if fs.isdir(path) else path)
    found = sorted(fs.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no tar files at {source}")
    has_protocol = fsspec.core.split_protocol(source)[0] is not None
    return [fs.unstrip_protocol(p) if has_protocol else p for p in found]


def read_tars(source: str | Sequence[str], *, num_cpus: float = 0.25) -> ray.data.Dataset:
    """Streaming read of webdataset tars: one read task per tar, blocks of 32 samples.
    Reads take a fraction of a CPU (they wait on I/O) so they still get scheduled beside the
    scoring actors on a 2-core machine."""
    import ray.data

    paths = list_tars(source)
    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)).map_batches(
        _read_tar_batch, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus
    )


def score_quality(
    source: str | Sequence[str] | ray.data.Dataset,
    config: QualityConfig | None = None,
    *,
    concurrency: int | None = None,
    num_cpus: float = 0.5,
) -> ray.data.Dataset:
    """Lazy dataset of every sample (kept and rejected) with scores, `reasons` and `passed`.
    `source` is what `list_tars` accepts, or a dataset from `read_tars`. Scoring actors take
    `num_cpus` each (fractional: whole-CPU actors starve the reads on small machines), one per
    cluster CPU by default."""
    import ray

    from pipelines.ray_env import ensure_ray

    ensure_ray()
    ds = source if isinstance(source, ray.data.Dataset) else read_tars(source)
    concurrency = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ds.map_batches(
        _Scorer,
        fn_constructor_args=(config or QualityConfig(),),
        batch_size=16,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
    )


def split_quality(scored: ray.data.Dataset) -> tuple[ray.data.Dataset, dict[str, int]]:
    """(kept rows, rejected counts by primary reason) of a materialised `score_quality` result."""
    counts = Counter()
    for batch in scored.select_columns(["reason"]).iter_batches(batch_format="pyarrow"):
        counts.update(r for r in batch["reason"].to_pylist() if r)
    from ray.data.expressions import col

    return scored.filter(expr=col("passed")), dict(counts)


def filter_quality(
    source: str | Sequence[str] | ray.data.Dataset, config: QualityConfig | None = None, **kwargs
) -> tuple[ray.data.Dataset, dict[str, int]]:
    """Score every sample once (materialised: rows are small), then split. The counts sum to
    the rejected samples; a broken tar counts once as 'tar_error'. For score distributions over
    all samples, call `score_quality(...).materialize()` and `split_quality` yourself."""
    return split_quality(score_quality(source, config, **kwargs).materialize())
