"""What evaluation costs: seconds per image of each metric at 512x512, and the evaluation job's
overhead over restoration alone on the same images.

    python benchmarks/evaluate_overhead.py [--images 8] [--steps 10] [--metrics psnr ssim ...] [--model DIR]
        [--weights '{"lpips": FILE}' | --random-weights]

Metrics: each built once (diffbir.metrics.build_metric, learned ones from --weights), warmed up,
then timed over `images` crops of real photos against their degraded copies (no-reference
metrics ignore the target), one image per call, in this process on one thread: the median of
`repeats` passes, per image.

Overhead: the same crops as a synthetic benchmark (Real-ESRGAN degradation, 1x restoration at
512x512, `steps` sampling steps). Restoration alone: a RestorationPipeline over the job's LQ
inputs in this process on one thread, the model loaded before the clock starts. The job:
training.evaluate on a fresh output each pass, one restoration actor of one CPU, one metric actor
(Ray is started before timing, as a cluster is up already in real use; the actors' start-up and
model loading are counted). Reported: the job's wall time over restoration alone, and the metrics'
share of restoration time. The default model is the tiny one of `diffbir init-tiny` (made under
runs/tiny), whose restoration is cheap, so every overhead looks large; --model a converted
full-size model directory measures what the issue's target is about (metrics under 20% of a
10-step restoration). Prints a markdown table; writes only under a temporary folder.
"""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from skimage import data

from diffbir.checkpoints.loading import load_model
from diffbir.checkpoints.platform import is_model_dir, save_model_dir
from diffbir.checkpoints.tiny import write_keyed_files
from diffbir.config import load_config, parse_config
from diffbir.image_io import decode_image, encode_image
from diffbir.metrics import MetricsConfig, build_metric, random_weights
from diffbir.pipeline import RestorationPipeline, RestoreOptions, name_seed
from pipelines.degradations import degrade, load_degradation
from pipelines.ray_env import ensure_ray
from training.evaluate import EvalConfig, evaluate

TINY_DIR = Path("runs/tiny")


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: int = Field(8, ge=1, le=64, description="512x512 crops to score and restore")
    size: int = Field(512, ge=64, le=2048, multiple_of=64, description="crop side")
    steps: int = Field(10, ge=1, le=100, description="sampling steps of the restoration")
    repeats: int = Field(3, ge=1, le=10, description="timed passes (median taken)")
    metrics: list[str] = Field(["psnr", "ssim"], description="metrics to time (learned ones need --weights)")
    weights: dict[str, str] = Field(default_factory=dict, description="learned metric -> local weights file")
    model: str | None = Field(None, description="platform model directory (default: the tiny model, made if missing)")
    random_weights: bool = Field(
        False, description="learned metrics without --weights get seeded random weights of their own network"
    )


def photo_crops(n: int, size: int) -> list[np.ndarray]:
    """n size x size uint8 crops of real photos (upscaled first where smaller), from varied places."""
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        scale = max(1.0, size / min(img.shape[:2]))
        img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) if scale > 1 else img
        y, x = (int(rng.integers(s - size + 1)) for s in img.shape[:2])
        crops.append(np.ascontiguousarray(img[y : y + size, x : x + size]))
    return crops


def tiny_model() -> Path:
    target = TINY_DIR / "platform"
    if not is_model_dir(target):
        bundle = load_model(write_keyed_files(TINY_DIR), num_head_channels=16)
        save_model_dir(target, {n: (p.module, p.config) for n, p in bundle.parts.items()}, diffusion=bundle.diffusion)
    return target


def metric_seconds(cfg: BenchConfig, hq: list[np.ndarray], lq: list[np.ndarray]) -> dict[str, float]:
    """Median seconds per image of each metric, one image per call."""

    def tensor(img: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255

    pairs = [(tensor(a), tensor(b)) for a, b in zip(lq, hq)]
    config = MetricsConfig(names=cfg.metrics, weights=cfg.weights)
    out = {}
    for name in cfg.metrics:
        metric = build_metric(name, config)
        metric(*pairs[0])  # warm-up: lazy initialisation, allocator
        times = []
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            for pred, target in pairs:
                metric(pred, target)
            times.append((time.perf_counter() - start) / len(pairs))
        out[name] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchConfig, argv, __doc__, "python benchmarks/evaluate_overhead.py")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    model = Path(cfg.model) if cfg.model else tiny_model()
    hq = photo_crops(cfg.images, cfg.size)
    degradation = load_degradation("realesrgan")
    lq = [degrade(img, i, degradation)[0] for i, img in enumerate(hq)]
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.random_weights:  # a metric's cost does not depend on its weights' values
            missing = [n for n in cfg.metrics if n not in ("psnr", "ssim", *cfg.weights)]
            cfg = cfg.model_copy(update={"weights": cfg.weights | {n: str(random_weights(n, tmp)) for n in missing}})
        per_metric = metric_seconds(cfg, hq, lq)
        ensure_ray()
        folder = Path(tmp) / "hq"
        folder.mkdir()
        for i, img in enumerate(hq):
            (folder / f"{i:03d}.png").write_bytes(encode_image(img / 255.0))
        options = dict(task="sr", upscale=1, min_side=cfg.size, steps=cfg.steps)
        job = dict(
            models=[str(model)],
            benchmarks=[dict(name="crops", hq=str(folder), degradation="realesrgan", seed=0)],
            options=options,
            metrics=dict(names=cfg.metrics, weights=cfg.weights),
            tracking_dir=str(Path(tmp) / "mlflow"),
            cpus_per_actor=1,
            grid_images=0,
        )
        job_s, summaries = [], []
        for r in range(cfg.repeats):
            start = time.perf_counter()
            summaries.append(evaluate(load_config(EvalConfig, None, **job, output=str(Path(tmp) / f"out{r}"))))
            job_s.append(time.perf_counter() - start)

        # restoration alone: the job's own LQ inputs, options and seeds
        pipe = RestorationPipeline.from_pretrained(str(model))
        inputs = sorted((Path(tmp) / "out0" / "inputs" / "crops" / "lq").glob("*.png"))
        images = [decode_image(p.read_bytes())[0] for p in inputs]
        opts = RestoreOptions(**options)
        restore_s = []
        for _ in range(cfg.repeats):
            start = time.perf_counter()
            for path, image in zip(inputs, images):
                pipe([image], opts, seeds=[name_seed(path.name, opts.seed)])
            restore_s.append(time.perf_counter() - start)

    n, restore, total = cfg.images, statistics.median(restore_s), statistics.median(job_s)
    metrics_total = sum(per_metric.values()) * n
    in_job = {k: statistics.median(s["metric_s"][k] for s in summaries) / n for k in cfg.metrics}
    command = " ".join(["python", "benchmarks/evaluate_overhead.py", *map(shlex.quote, sys.argv[1:])])
    print(f"model {model}, {n} images of {cfg.size}x{cfg.size}, {cfg.steps} steps, {os.cpu_count()} CPUs: `{command}`")
    print()
    print("| metric | s/image (this process) | s/image (in the job's actor) |")
    print("|---|---|---|")
    for name in cfg.metrics:
        print(f"| {name} | {per_metric[name]:.4f} | {in_job[name]:.4f} |")
    print()
    print("| restoration alone s/image | job s/image | job overhead | metrics / restoration |")
    print("|---|---|---|---|")
    print(f"| {restore / n:.3f} | {total / n:.3f} | {total / restore - 1:+.1%} | {metrics_total / restore:.1%} |")


if __name__ == "__main__":
    main()
