"""Move the `champion` alias to a candidate version when it restores a held-out set no worse than
the current champion (within a margin), or when there is no champion yet.

    python training/promote.py --config training/configs/promote.yaml [--candidate 7 ...]

Held-out set: a directory of HQ images and/or WebDataset .tar shards (or one shard), read in
name order. Each image is centre-cropped to whole 64-pixel SwinIR windows and degraded by the
training degradation model (pipelines.degradations; DiffBIR's first-order model by default)
with a seed fixed per image, so every run sees the same LQ images. The model's stage 1 (the
SwinIR restoration module) restores them, or with `sampling_steps` > 0 the whole diffusion
pipeline (a short sampling run), and PSNR and SSIM are taken against the HQ images in
diffbir.metrics' platform convention (RGB, no border crop, 8-bit: the one training validation logs).
Candidate and champion are scored in the same run on the same inputs, so scores from other held-out
sets never decide.

Only the alias moves: no version is deleted. Both versions get a `promotion.<time>.v<c>_vs_v<p>`
tag holding the comparison (scores, margins, decision) as JSON. Exit status 0 when it ran
(promoted or not), 1 on an error, 2 on bad flags.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from diffbir.checkpoints.loading import load_model
from diffbir.checkpoints.platform import read_manifest
from diffbir.config import parse_config
from diffbir.image_io import READABLE_SUFFIXES, decode_image
from diffbir.metrics import image_metrics
from diffbir.pipeline import RestorationPipeline, RestoreOptions
from diffbir.sampling.tiling import tiled_stage1
from pipelines.degradations import DegradationConfig, degrade, load_degradation
from training import registry

WINDOW = 64  # DiffBIR SwinIR needs sides in multiples of sf * window_size = 8 * 8
RestoreFn = Callable[[np.ndarray, int], np.ndarray]  # (LQ image, its index in the set) -> restored image


class PromoteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("diffbir", description="registered model name")
    candidate: int | None = Field(None, description="version to evaluate (default: the latest)")
    alias: str = Field("champion", description="the alias the candidate may take over")
    heldout: str = Field(description="directory of HQ images and/or WebDataset .tar shards, or one shard")
    tracking_dir: str = Field(registry.DEFAULT_DIR, description="local MLflow store (MLFLOW_TRACKING_URI wins)")
    cache_dir: str | None = Field(None, description=f"downloaded versions (default ${registry.CACHE_ENV} or ~/.cache)")
    max_images: int | None = Field(None, ge=1, description="score only the first N images")
    crop_size: int = Field(256, ge=WINDOW, multiple_of=WINDOW, description="centre crop, at most this side")
    degradation: str = Field("first_order", description="pipelines.degradations config: a bundled name or a YAML file")
    seed: int = Field(0, description="degradation seed (image i uses [seed, i])")
    sampling_steps: int = Field(0, ge=0, description="0: score stage 1 alone; N: the full pipeline, N sampling steps")
    margin_db: float = Field(0.1, ge=0, description="largest PSNR drop (dB) that still promotes")
    margin_ssim: float = Field(0.005, ge=0, description="largest SSIM drop that still promotes")
    tile_size: int = Field(512, gt=WINDOW, multiple_of=WINDOW, description="tile size (bounds memory on large crops)")
    device: str = Field("cpu", description="torch device")
    dry_run: bool = Field(False, description="score and report only: move no alias, write no tags")


class PromotionError(Exception):
    """Promotion cannot run: missing held-out data, a model without a SwinIR stage 1, a race."""


@dataclass(frozen=True)
class Scores:
    psnr: float
    ssim: float


@dataclass
class Promotion:
    model: str
    alias: str
    candidate: str
    champion: str | None  # the version the alias named before
    decision: str  # promoted | rejected | unchanged
    reason: str
    scores: dict[str, Scores] = field(default_factory=dict)  # input (the degraded LQ), champion, candidate
    images: int = 0
    dry_run: bool = False


def promote(cfg: PromoteConfig) -> Promotion:
    registry.configure(cfg.tracking_dir)
    name, alias = cfg.model_name, cfg.alias
    candidate = str(cfg.candidate) if cfg.candidate is not None else registry.latest_version(name)
    champion = registry.alias_version(name, alias)
    if candidate == champion:
        return Promotion(name, alias, candidate, champion, "unchanged", f"v{candidate} already is @{alias}")
    versions = {"candidate": candidate} | ({"champion": champion} if champion else {})
    files = _heldout_files(cfg.heldout)  # fail on a missing set or degradation before downloading models
    degradation = load_degradation(cfg.degradation)
    restorers = {
        role: _restorer(registry.resolve(f"models:/{name}/{v}", cfg.cache_dir), cfg) for role, v in versions.items()
    }
    scores, count = evaluate(restorers, files, degradation, cfg)
    promoted, reason = decide(scores, champion, cfg)
    decision = "promoted" if promoted else "rejected"
    result = Promotion(name, alias, candidate, champion, decision, reason, scores, count, cfg.dry_run)
    if cfg.dry_run:
        return result
    if promoted:
        if registry.alias_version(name, alias) != champion:  # another promotion ran meanwhile
            raise PromotionError(f"@{alias} moved while scoring (it was v{champion}); nothing changed, run again")
        registry.set_alias(name, alias, candidate)
    now = datetime.now(timezone.utc)
    record = dict(
        decision=result.decision,
        reason=reason,
        alias=alias,
        **{role: {"version": v, **vars(scores[role])} for role, v in versions.items()},
        input=vars(scores["input"]),
        margin_db=cfg.margin_db,
        margin_ssim=cfg.margin_ssim,
        heldout=cfg.heldout,
        images=count,
        **cfg.model_dump(include={"degradation", "seed", "crop_size", "sampling_steps"}),
        timestamp=now.isoformat(),
    )
    key = f"promotion.{now:%Y%m%dT%H%M%S}Z.v{candidate}_vs_{f'v{champion}' if champion else 'none'}"
    for v in versions.values():
        registry.set_tags(name, v, {key: json.dumps(record)})
    return result


def decide(scores: dict[str, Scores], champion: str | None, cfg: PromoteConfig) -> tuple[bool, str]:
    if champion is None:
        return True, "no champion yet"
    cand, champ = scores["candidate"], scores["champion"]
    worse = []
    if cand.psnr < champ.psnr - cfg.margin_db:
        worse.append(f"PSNR {cand.psnr - champ.psnr:+.3f} dB vs v{champion}, allowed -{cfg.margin_db} dB")
    if cand.ssim < champ.ssim - cfg.margin_ssim:
        worse.append(f"SSIM {cand.ssim - champ.ssim:+.4f} vs v{champion}, allowed -{cfg.margin_ssim}")
    return not worse, "; ".join(worse) or f"no worse than v{champion} within the margins"


def evaluate(
    restorers: dict[str, RestoreFn], files: list[Path], degradation: DegradationConfig, cfg: PromoteConfig
) -> tuple[dict[str, Scores], int]:
    """Mean PSNR/SSIM of each model's restoration, and of the degraded input itself, over the set."""
    sums = {role: Counter() for role in ("input", *restorers)}  # metric -> sum over the images
    count = 0
    for count, hq in enumerate(islice(heldout_images(files), cfg.max_images), 1):
        hq = center_crop(hq, cfg.crop_size)
        lq, _ = degrade(hq, np.random.default_rng([cfg.seed, count]), degradation)
        if lq.shape != hq.shape:
            raise PromotionError(f"degradation {cfg.degradation} must give LQ images at the HQ size (resize back)")
        sums["input"].update(image_metrics(lq, hq))
        for role, restorer in restorers.items():
            sums[role].update(image_metrics(restorer(lq, count), hq))
    if count == 0:
        raise PromotionError(f"held-out set {cfg.heldout} holds no images (image files or WebDataset .tar shards)")
    return {role: Scores(**{k: v / count for k, v in s.items()}) for role, s in sums.items()}, count


def _heldout_files(path: str) -> list[Path]:
    root = Path(path)
    if not root.exists():
        raise PromotionError(f"held-out set {root} does not exist")
    return sorted(root.iterdir()) if root.is_dir() else [root]


def heldout_images(files: list[Path]) -> Iterator[np.ndarray]:
    """HQ images (RGB float32 in [0, 1]) of image files and WebDataset shards, in name order."""
    for f in files:
        if f.suffix == ".tar":
            with tarfile.open(f) as tar:
                images = [m for m in tar if m.isfile() and Path(m.name).suffix.lower() in READABLE_SUFFIXES]
                for m in sorted(images, key=lambda m: m.name):
                    yield decode_image(tar.extractfile(m).read(), f"{f}:{m.name}")[0]
        elif f.suffix.lower() in READABLE_SUFFIXES:
            yield decode_image(f.read_bytes(), str(f))[0]


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The centre, each side the largest multiple of WINDOW up to `size`."""
    h, w = (min(size, s // WINDOW * WINDOW) for s in img.shape[:2])
    if not h or not w:
        raise PromotionError(f"a held-out image of {img.shape[1]}x{img.shape[0]} is smaller than {WINDOW} pixels")
    y, x = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[y : y + h, x : x + w]


def restore_stage1(net: nn.Module, lq: np.ndarray, cfg: PromoteConfig) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(lq)).permute(2, 0, 1)[None].to(cfg.device)
    with torch.inference_mode():
        y = tiled_stage1(net, x, tile_size=cfg.tile_size, multiple=net.config.pad_multiple)
    return y.clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()


def _restorer(model_dir: Path, cfg: PromoteConfig) -> RestoreFn:
    if cfg.sampling_steps:
        pipe = RestorationPipeline(load_model(model_dir), cfg.device)
        # denoise: restore at the input size; min_side 64: no working upscale of the crops
        opts = RestoreOptions(
            task="denoise",
            steps=cfg.sampling_steps,
            min_side=WINDOW,
            tile_size=cfg.tile_size,
            tile_stride=cfg.tile_size // 2,
        )
        return lambda lq, i: pipe([lq], opts, seeds=[cfg.seed + i])[0]
    parts = read_manifest(model_dir).parts
    if "swinir" not in parts:
        raise PromotionError(f"{model_dir}: no DiffBIR SwinIR stage 1 to score (parts: {', '.join(parts)})")
    net = load_model(model_dir, parts=["swinir"]).stage1.to(cfg.device)
    return lambda lq, i: restore_stage1(net, lq, cfg)


def format_summary(p: Promotion) -> str:
    lines = [f"{p.model}: candidate v{p.candidate} vs @{p.alias} " + (f"v{p.champion}" if p.champion else "(none)")]
    if p.scores:
        lines.append(f"{p.images} held-out images")
        lines.append(f"  {'':<10} {'version':>7} {'PSNR dB':>8} {'SSIM':>7}")
        versions = {"input": "-", "champion": f"v{p.champion}", "candidate": f"v{p.candidate}"}
        for role, version in versions.items():
            if s := p.scores.get(role):
                lines.append(f"  {role:<10} {version:>7} {s.psnr:8.3f} {s.ssim:7.4f}")
    lines.append(f"decision: {p.decision} ({p.reason})")
    if p.dry_run:
        lines.append("dry run: no alias moved, no tags written")
    elif p.decision == "promoted":
        lines.append(f"@{p.alias} -> v{p.candidate}")
    else:
        lines.append(f"@{p.alias} stays at v{p.champion}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the summary readable
    try:
        result = promote(parse_config(PromoteConfig, argv, __doc__.split("\n\n")[0], prog="promote"))
    # ValueError also covers bad configs (pydantic), unreadable images and checkpoints
    except (PromotionError, registry.RegistryError, MlflowException, OSError, ValueError) as e:
        print(f"promote: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
