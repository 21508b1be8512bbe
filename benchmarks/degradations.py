"""Throughput of the degradation models: images/s per core on 512x512 crops of real photos.

    python benchmarks/degradations.py [--images 100] [--repeats 5] [--models first_order ...]

Single-threaded (cv2.setNumThreads(1), torch.set_num_threads(1)), so the figure is per core.
Crops of scikit-image's bundled photos (uint8, as a decoder gives them), each degraded with its
own seed; one warm-up pass, then the median of --repeats timed passes over the same crops and
seeds, by the process's CPU time (steady on a shared machine) and by the wall clock. Prints a
markdown table, one row per model; writes nothing.
"""

from __future__ import annotations

import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from skimage import data

from diffbir.config import parse_config
from pipelines.degradations import degrade, load_degradation

MODELS = ("first_order", "codeformer_face", "realesrgan")


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: int = Field(100, ge=1, description="crops per timed pass")
    repeats: int = Field(5, ge=1, description="timed passes (median taken)")
    models: list[Literal[MODELS]] = Field(list(MODELS), description="degradation configs to time")


def photo_crops(n: int, size: int = 512, seed: int = 0) -> list[np.ndarray]:
    """n random size x size crops of real photos; photos smaller than size are upscaled first."""
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = size / min(h, w)
        if s > 1:
            h, w = math.ceil(h * s), math.ceil(w * s)
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
        y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        crops.append(np.ascontiguousarray(img[y : y + size, x : x + size]))
    return crops


def images_per_second(model: str, crops: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """Median (by CPU time, by wall clock) images/s of single-threaded degradation."""
    config = load_degradation(model)
    for seed, img in enumerate(crops):  # warm-up: caches, allocator, lazy OpenCV initialisation
        degrade(img, seed, config)
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for seed, img in enumerate(crops):
            degrade(img, seed, config)
        cpu.append(len(crops) / (time.process_time() - start_cpu))
        wall.append(len(crops) / (time.perf_counter() - start_wall))
    return statistics.median(cpu), statistics.median(wall)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/degradations.py")

    cv2.setNumThreads(1)
    torch.set_num_threads(1)  # in case anything in the process reaches torch
    crops, cpu_name = photo_crops(args.images), cpu_model()
    command = " ".join(["python", "benchmarks/degradations.py", *map(shlex.quote, sys.argv[1:])])
    print("| model | images/s/core (CPU time) | ms/image | images/s/core (wall) | images x repeats | CPU | command |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        cpu, wall = images_per_second(model, crops, args.repeats)
        cells = [model, f"{cpu:.1f}", f"{1000 / cpu:.1f}", f"{wall:.1f}", f"{args.images} x {args.repeats}", cpu_name]
        print("| " + " | ".join(cells) + f" | `{command}` |", flush=True)


if __name__ == "__main__":
    main()
