"""The quality judge: thresholds on the measures (`QualityConfig`), the decision with its reasons
(`judge`), and `assess`, which decodes, measures and judges one image (or a batch, so that a
learned scorer sees the passing images in one call), measuring group by group and stopping at the
first failed check unless `QualityConfig.measure_all`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from diffbir.image_io import ImageError, decode_image
from pipelines.dedup import phash_hex
from pipelines.quality.learned import LearnedIQA, LearnedIQAConfig, load_learned_iqa
from pipelines.quality.measures import measure_stages

# (reason, score, "min"|"max", config field) in the order the scores are measured
# (`measures.STAGES`, cheapest first): the first failure is the primary reason a sample is
# counted under, the same whether the measuring stopped there or went on (`measure_all`).
CHECKS = (
    ("too_small", "short_side", "min", "min_short_side"),
    ("low_jpeg_quality", "jpeg_quality", "min", "min_jpeg_quality"),
    ("low_entropy", "entropy", "min", "min_entropy"),
    ("underexposed", "mean_luminance", "min", "min_mean_luminance"),
    ("underexposed", "dark_fraction", "max", "max_dark_fraction"),
    ("overexposed", "mean_luminance", "max", "max_mean_luminance"),
    ("overexposed", "bright_fraction", "max", "max_bright_fraction"),
    ("low_effective_resolution", "effective_short_side", "min", "min_effective_short_side"),
    ("blocky", "blockiness", "max", "max_blockiness"),
    ("blurry", "sharpness", "min", "min_sharpness"),
    ("flat", "flat_fraction", "max", "max_flat_fraction"),
    ("noisy", "noise_sigma", "max", "max_noise_sigma"),
)


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
    measure_all: bool = Field(
        False,
        description="measure every score of every image and list every failed check (for calibrating "
        "thresholds); by default measuring stops at the first failed check, which leaves the later "
        "scores of a rejected image empty and costs a fraction",
    )
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


class Decoded(NamedTuple):
    """An image as the measures take it: H×W×3 RGB uint8 (`decode_image(..., dtype=np.uint8)`)
    and its JPEG quantization tables (None when not a JPEG)."""

    pixels: np.ndarray
    quantization: Mapping[int, Sequence[int]] | None


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


def _measure_and_judge(
    pixels: np.ndarray, quantization, meta: Mapping[str, Any] | None, config: QualityConfig
) -> QualityResult:
    """Measure group by group, judging after each; stop at the first failure unless
    `config.measure_all`."""
    scores: dict[str, float | int | None] = {}
    for group in measure_stages(pixels, quantization):
        scores |= group
        if not config.measure_all and (reasons := judge(scores, config, meta)):
            return QualityResult(scores, False, reasons)
    return QualityResult(scores, True, [])


def assess_batch(
    items: Sequence[tuple[bytes, Mapping[str, Any] | None]],
    config: QualityConfig,
    iqa: LearnedIQA | None = None,
    decoded: Sequence[Decoded | None] | None = None,
) -> list[QualityResult]:
    """`assess` over a batch, so a learned scorer sees in one call the images that passed the
    pixel checks (with `measure_all`: every decodable image). `decoded`: per item, its pixels
    and JPEG tables where the caller has decoded it already (None: decoded here)."""
    results, candidates = [], {}  # index of each image judged on its pixels → the pixels (for the scorer)
    for i, ((image_bytes, meta), done) in enumerate(zip(items, decoded or [None] * len(items))):
        if done is None:
            try:
                pixels, info = decode_image(image_bytes, dtype=np.uint8)
            except ImageError:
                results.append(QualityResult({}, False, ["decode_error"]))
                continue
            done = Decoded(pixels, info.quantization)
        result = _measure_and_judge(done.pixels, done.quantization, meta, config)
        if result.passed or config.measure_all:  # dedup and the learned scorer only see candidates
            result.phash, candidates[i] = phash_hex(done.pixels), done.pixels
        results.append(result)
    if iqa is not None and candidates:
        values = np.asarray(iqa.score(list(candidates.values())), dtype=float).reshape(-1)
        for i, value in zip(candidates, values):
            results[i].scores["learned_iqa"] = float(value)
    for i in candidates:
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
