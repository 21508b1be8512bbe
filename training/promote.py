"""Move the `champion` alias to a candidate version when it passes every promotion gate.

    python training/promote.py --config training/configs/promote.yaml [--candidate 7 ...]

Held-out set: a directory of HQ images and/or WebDataset .tar shards (or one shard), read in
name order. Each image is centre-cropped to whole 64-pixel SwinIR windows and degraded by the
training degradation model (pipelines.degradations; DiffBIR's first-order model by default)
with a seed fixed per image, so every run sees the same LQ images. The model's stage 1 (the
SwinIR restoration module) restores them, or with `sampling_steps` > 0 the whole diffusion
pipeline (a short sampling run). Each metric (diffbir.metrics.build_metric: PSNR, SSIM, LPIPS,
MANIQA, ...; built once) scores every restoration, and the degraded input itself, as training
validation does (`val_metrics`, the same MetricsConfig). Candidate and champion are scored in the
same run on the same inputs, so scores from other held-out sets never decide.

A gate is a metric, a margin and an optional absolute limit; the direction is the metric's own
(`lower_is_better`). The candidate is rejected, with or without a champion, when any measured
metric's mean is not a score (NaN, or infinitely bad: -inf for higher-is-better metrics) or when
it is beyond a gate's limit; with a champion it must also be no worse than it by more than each
gate's margin. An infinitely *good* mean stands: PSNR is +inf for an image restored exactly (the
metric's definition), so a set mean of +inf is a perfect score, not a failure, and only another
+inf matches it. A restoration holding NaN or inf pixels is no image: every metric scores it NaN.
A champion's NaN score holds no candidate back.

Only the alias moves, and only if it still names the champion the candidate was compared against
(registry.move_alias, a compare-and-set): of two concurrent promotions against the same champion,
the second to move fails with PromotionError, changing nothing. No version is deleted. Both
versions get a `promotion.<time>.v<c>_vs_v<p>` tag holding the comparison table (per metric:
input, champion and candidate means, margin, limit, verdict and its reason) and the decision as
JSON; non-finite numbers are written as the strings "nan", "inf", "-inf". The table and the
decision are printed, and logged (logger `training.promote`). Exit status 0 when it ran (promoted
or not), 1 on an error, 2 on bad flags.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from diffbir.checkpoints.loading import load_model
from diffbir.checkpoints.platform import read_manifest
from diffbir.config import parse_config
from diffbir.image_io import READABLE_SUFFIXES, decode_image
from diffbir.metrics import METRIC_NAMES, Metric, MetricsConfig, build_metric
from diffbir.pipeline import RestorationPipeline, RestoreOptions
from diffbir.sampling.tiling import tiled_stage1
from pipelines.degradations import DegradationConfig, degrade, load_degradation
from pipelines.tars import iter_samples, read_members
from training import registry

WINDOW = 64  # DiffBIR SwinIR needs sides in multiples of sf * window_size = 8 * 8
RestoreFn = Callable[[np.ndarray, int], np.ndarray]  # (LQ image, its index in the set) -> restored image
ROLES = ("input", "champion", "candidate")  # the table's columns: the degraded input, then the two versions
log = logging.getLogger(__name__)


class Gate(BaseModel):
    """One promotion rule: a metric, how much worse than the champion it may get, and an optional
    absolute limit. Which way is worse is the metric's own direction (Metric.lower_is_better)."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description=f"a diffbir.metrics name: {', '.join(METRIC_NAMES)}")
    margin: float = Field(0.0, ge=0, description="largest loss against the champion that still promotes, in its units")
    limit: float | None = Field(
        None,
        description="absolute bound, checked also without a champion: the least a higher-is-better metric "
        "may score (psnr: 20), the most a lower-is-better one may (lpips: 0.4)",
    )

    @field_validator("metric")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in METRIC_NAMES:  # when the config is read, not when scoring starts
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)}")
        return name


def _default_gates() -> list[Gate]:
    return [Gate(metric="psnr", margin=0.1), Gate(metric="ssim", margin=0.005)]


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
    gates: list[Gate] = Field(
        default_factory=_default_gates,
        min_length=1,
        description="the rules the candidate must pass, one per metric (JSON: [{metric, margin, limit}, ...])",
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig,
        description="how metrics are computed (PSNR/SSIM convention, learned metrics' weight files); its names "
        "are measured and reported beside the gates' metrics, rejecting only when not a score",
    )
    tile_size: int = Field(512, gt=WINDOW, multiple_of=WINDOW, description="tile size (bounds memory on large crops)")
    device: str = Field("cpu", description="torch device")
    dry_run: bool = Field(False, description="score and report only: move no alias, write no tags")

    @model_validator(mode="after")
    def _one_gate_per_metric(self) -> PromoteConfig:
        names = [g.metric for g in self.gates]
        if repeated := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"one gate per metric: {', '.join(repeated)} has several")
        return self

    def measured(self) -> list[str]:
        """The gates' metrics, then the further ones metrics.names asks for."""
        gated = [g.metric for g in self.gates]
        return gated + [n for n in self.metrics.names if n not in gated]


class PromotionError(Exception):
    """Promotion cannot run: missing held-out data, a model without a SwinIR stage 1, a race."""


@dataclass(frozen=True)
class Verdict:
    """One row of the comparison table: a metric's means over the held-out set and its verdict."""

    metric: str
    lower_is_better: bool
    scores: dict[str, float]  # role (input, champion, candidate) -> mean; no champion: no entry
    gate: Gate | None  # None: measured and reported, not gated
    passed: bool
    reason: str

    def record(self) -> dict:
        """The row as JSON-safe values (non-finite numbers as strings)."""
        return dict(
            metric=self.metric,
            better="lower" if self.lower_is_better else "higher",
            **{role: _number(v) for role, v in self.scores.items()},
            margin=self.gate.margin if self.gate else None,
            limit=self.gate.limit if self.gate else None,
            verdict="pass" if self.passed else "fail",
            reason=self.reason,
        )


@dataclass
class Promotion:
    model: str
    alias: str
    candidate: str
    champion: str | None  # the version the alias named before
    decision: str  # promoted | rejected | unchanged
    reason: str
    table: list[Verdict] = field(default_factory=list)
    images: int = 0
    dry_run: bool = False

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """role -> metric -> mean over the held-out set."""
        roles = [r for r in ROLES if self.table and r in self.table[0].scores]
        return {role: {v.metric: v.scores[role] for v in self.table} for role in roles}


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
    metrics = {n: build_metric(n, cfg.metrics, cfg.device) for n in cfg.measured()}  # a missing weight file fails here
    restorers = {
        role: _restorer(registry.resolve(f"models:/{name}/{v}", cfg.cache_dir), cfg) for role, v in versions.items()
    }
    scores, count = heldout_means(restorers, files, degradation, metrics, cfg)
    table = decide(scores, metrics, cfg.gates, champion)
    failed = [v.reason for v in table if not v.passed]
    if failed:
        reason = "; ".join(failed)
    else:
        reason = f"no worse than v{champion} within the margins" if champion else "no champion yet"
    decision = "rejected" if failed else "promoted"
    result = Promotion(name, alias, candidate, champion, decision, reason, table, count, cfg.dry_run)
    log.info("%s", format_summary(result))
    if cfg.dry_run:
        return result
    if not failed:
        try:  # compare-and-set: a promotion that ran meanwhile is not overwritten
            registry.move_alias(name, alias, candidate, expected=champion)
        except registry.AliasMovedError as e:
            raise PromotionError(
                f"v{candidate} was compared against {'v' + champion if champion else 'no champion'}, but {e} "
                "(another promotion moved it meanwhile); nothing changed: run again to compare against it"
            ) from e
    now = datetime.now(timezone.utc)
    record = dict(
        decision=decision,
        reason=reason,
        alias=alias,
        candidate=candidate,
        champion=champion,
        table=[v.record() for v in table],
        heldout=cfg.heldout,
        images=count,
        **cfg.model_dump(mode="json", include={"metrics", "degradation", "seed", "crop_size", "sampling_steps"}),
        timestamp=now.isoformat(),
    )
    key = f"promotion.{now:%Y%m%dT%H%M%S%f}Z.v{candidate}_vs_{f'v{champion}' if champion else 'none'}"
    for v in versions.values():
        registry.set_tags(name, v, {key: json.dumps(record, allow_nan=False)})
    return result


def decide(
    scores: dict[str, dict[str, float]], metrics: dict[str, Metric], gates: list[Gate], champion: str | None
) -> list[Verdict]:
    """The verdict on every measured metric (see the module docstring for the rules)."""
    by_metric = {g.metric: g for g in gates}
    table = []
    for name, metric in metrics.items():
        row = {role: s[name] for role, s in scores.items()}
        passed, reason = judge(
            name, metric.lower_is_better, row["candidate"], row.get("champion"), by_metric.get(name), champion
        )
        table.append(Verdict(name, metric.lower_is_better, row, by_metric.get(name), passed, reason))
    return table


def judge(
    name: str, lower_is_better: bool, cand: float, champ: float | None, gate: Gate | None, champion: str | None
) -> tuple[bool, str]:
    """Whether the candidate's mean passes, and why."""
    sign = -1.0 if lower_is_better else 1.0  # compare as higher-is-better
    if math.isnan(cand) or sign * cand == -math.inf:
        return False, f"{name} is {cand}: not a score"
    if gate is None:
        return True, f"{name} measured, not gated"
    if gate.limit is not None and sign * cand < sign * gate.limit:
        return False, f"{name} {cand:.4f} is beyond the limit {'<=' if lower_is_better else '>='} {gate.limit}"
    if champ is None:
        within = "" if gate.limit is None else f", within the limit {gate.limit}"
        return True, f"{name} {cand:.4f}{within}; no champion to compare with"
    compared = f"{name} {cand:.4f} vs v{champion}'s {champ:.4f} ({cand - champ:+.4f})"
    # false when the champion's score is NaN: a broken champion holds no candidate back
    if sign * cand < sign * champ - gate.margin:
        return False, f"{compared}: worse by more than the margin {gate.margin}"
    return True, f"{compared}: within the margin {gate.margin}"


def heldout_means(
    restorers: dict[str, RestoreFn],
    files: list[Path],
    degradation: DegradationConfig,
    metrics: dict[str, Metric],
    cfg: PromoteConfig,
) -> tuple[dict[str, dict[str, float]], int]:
    """Each metric's mean over the set, of each model's restoration and of the degraded input itself."""
    sums = {role: dict.fromkeys(metrics, 0.0) for role in ("input", *restorers)}
    count = 0
    for count, hq in enumerate(islice(heldout_images(files), cfg.max_images), 1):
        hq = center_crop(hq, cfg.crop_size)
        lq, _ = degrade(hq, np.random.default_rng([cfg.seed, count]), degradation)
        if lq.shape != hq.shape:
            raise PromotionError(f"degradation {cfg.degradation} must give LQ images at the HQ size (resize back)")
        target = _nchw(hq, cfg.device)
        outputs = {"input": lq} | {role: restore(lq, count) for role, restore in restorers.items()}
        for role, image in outputs.items():
            for metric, score in score_image(metrics, image, target).items():
                sums[role][metric] += score
    if count == 0:
        raise PromotionError(f"held-out set {cfg.heldout} holds no images (image files or WebDataset .tar shards)")
    return {role: {k: v / count for k, v in s.items()} for role, s in sums.items()}, count


def score_image(metrics: dict[str, Metric], image: np.ndarray, target: torch.Tensor) -> dict[str, float]:
    """Every metric of one restored image (HxWx3 in [0, 1]) against its HQ target (1x3xHxW)."""
    if not np.isfinite(image).all():  # a diverged model's output is no image: no metric is defined on it
        return dict.fromkeys(metrics, math.nan)
    x = _nchw(image, target.device)
    return {name: float(m(x, target if m.kind == "fr" else None)[0]) for name, m in metrics.items()}


def _nchw(image: np.ndarray, device: str | torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None].to(device)


def _number(x: float | None) -> float | str | None:
    """JSON has no NaN or infinity: those become strings."""
    return x if x is None or math.isfinite(x) else str(x)


def _heldout_files(path: str) -> list[Path]:
    root = Path(path)
    if not root.exists():
        raise PromotionError(f"held-out set {root} does not exist")
    return sorted(root.iterdir()) if root.is_dir() else [root]


def heldout_images(files: list[Path]) -> Iterator[np.ndarray]:
    """HQ images (RGB float32 in [0, 1]) of image files and WebDataset shards, in name order."""
    for f in files:
        if f.suffix == ".tar":  # headers first, then each image in name order
            images = [
                (f"{key}.{ext}", member)
                for key, members in iter_samples(str(f), read=lambda ext: False)
                for ext, member in members.items()
                if f".{ext.rsplit('.', 1)[-1]}" in READABLE_SUFFIXES
            ]
            for name, member in sorted(images, key=lambda item: item[0]):
                (data,) = read_members([str(f)], [member.offset], [member.size])
                yield decode_image(data, f"{f}:{name}")[0]
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
    if p.table:
        roles = [r for r in ROLES if r in p.table[0].scores]
        heads = {"input": "input", "champion": f"champion v{p.champion}", "candidate": f"candidate v{p.candidate}"}
        lines.append(f"{p.images} held-out images")
        lines.append("| metric | " + " | ".join(heads[r] for r in roles) + " | margin | limit | verdict |")
        lines.append("|---" * (len(roles) + 4) + "|")
        for v in p.table:
            arrow = "↓" if v.lower_is_better else "↑"
            margin = "-" if v.gate is None else f"{v.gate.margin:g}"
            limit = (
                "-"
                if v.gate is None or v.gate.limit is None
                else f"{'<=' if v.lower_is_better else '>='} {v.gate.limit:g}"
            )
            cells = [f"{v.metric} {arrow}", *(f"{v.scores[r]:.4f}" for r in roles), margin, limit]
            lines.append("| " + " | ".join(cells) + f" | {'pass' if v.passed else 'FAIL'}: {v.reason} |")
    lines.append(f"decision: {p.decision} ({p.reason})")
    if p.dry_run:
        lines.append("dry run: no alias moved, no tags written")
    elif p.decision == "promoted":
        lines.append(f"@{p.alias} -> v{p.candidate}")
    else:
        lines.append(f"@{p.alias} stays at v{p.champion}" if p.champion else f"@{p.alias} names no version yet")
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
