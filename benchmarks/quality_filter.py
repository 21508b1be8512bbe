"""Quality-filter throughput per core on ~1 MP JPEGs.

Real photos (scikit-image's and scikit-learn's bundled ones) resized to ~1 MP with Lanczos and
encoded at JPEG q=90; each repeat runs `assess` (decode, every measurement, pHash, decision) over
all of them in one thread; the median repeat gives ms/image. With --ray, the same images are
also written to webdataset tars and run through `filter_quality` on a local Ray with every core.

    .venv/bin/python benchmarks/quality_filter.py --images 40 --repeats 5 [--ray]
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffbir.config import parse_config
from pipelines.quality import QualityConfig, assess


def photos() -> list[np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_image

    return [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.stereo_motorcycle()[0],
        data.hubble_deep_field(),
        data.retina(),
        load_sample_image("china.jpg"),
        load_sample_image("flower.jpg"),
    ]


def one_megapixel_jpegs(n: int) -> list[bytes]:
    sources, out = photos(), []
    for i in range(n):
        img = sources[i % len(sources)]
        h, w = img.shape[:2]
        f = (1e6 / (h * w)) ** 0.5
        resized = Image.fromarray(img).resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        resized.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def bench_assess(images: list[bytes], repeats: int, config: QualityConfig) -> tuple[float, float, int]:
    """Median per-image (wall, CPU) seconds. CPU time is the per-core cost even when other jobs
    share the machine; wall time equals it only on an idle one."""
    cv2.setNumThreads(1)  # one core, as each Ray actor runs
    for img in images[:3]:
        assess(img, config=config)  # warm-up: imports, FFT plans
    wall, cpu, passed = [], [], 0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        passed = sum(assess(img, config=config).passed for img in images)
        wall.append((time.perf_counter() - start) / len(images))
        cpu.append((time.process_time() - start_cpu) / len(images))
    return statistics.median(wall), statistics.median(cpu), passed


def bench_ray(images: list[bytes], repeats: int) -> float:
    import json

    import ray

    from pipelines.quality import filter_quality
    from pipelines.ray_env import ensure_ray
    from pipelines.shards import write_tar

    ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        for shard in range(4):
            with open(f"{tmp}/{shard:05d}.tar", "wb") as f:
                write_tar(
                    f,
                    [
                        (f"{shard:05d}{i:04d}", {"jpg": img, "txt": b"", "json": json.dumps({}).encode()})
                        for i, img in enumerate(images[shard::4])
                    ],
                )
        filter_quality(tmp)  # warm-up: actor start-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            filter_quality(tmp)
            times.append((time.perf_counter() - start) / len(images))
    ray.shutdown()
    return statistics.median(times)


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: int = Field(40, ge=1, description="~1 MP JPEGs per pass")
    repeats: int = Field(5, ge=1, description="timed passes (median taken)")
    ray: bool = Field(False, description="also time filter_quality on a local Ray (all cores)")


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/quality_filter.py")

    images = one_megapixel_jpegs(args.images)
    runs = {
        "quality assess, stops at the first failed check (default)": QualityConfig(),
        "quality assess, every score (`measure_all`)": QualityConfig(measure_all=True),
    }
    results = {name: bench_assess(images, args.repeats, config) for name, config in runs.items()}
    cpu, cores = cpu_model(), os.cpu_count()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    passed = next(iter(results.values()))[2]
    print(
        f"load average at end: {os.getloadavg()[0]:.1f} on {cores} cores; "
        f"{passed}/{len(images)} images pass the defaults"
    )
    print("| benchmark | images | size | median CPU ms/image | median wall ms/image | images/s per core | CPU |")
    print("|---|---:|---|---:|---:|---:|---|")
    for name, (wall, cpu_time, _) in results.items():
        print(
            f"| {name} (1 thread) | {len(images)} | ~1 MP JPEG q=90 | {cpu_time * 1e3:.1f} | {wall * 1e3:.1f} "
            f"| {1 / cpu_time:.1f} | {cpu} |"
        )
    if args.ray:
        per_image_ray = bench_ray(images, args.repeats)
        print(
            f"| filter_quality on Ray ({cores} cores) | {len(images)} | ~1 MP JPEG q=90 | – "
            f"| {per_image_ray * 1e3:.1f} "
            f"| {1 / per_image_ray / cores:.1f} (wall) | {cpu} |"
        )


if __name__ == "__main__":
    main()
