"""The data pipeline's overhead over plain img2dataset, on the same input.

A LAION-style parquet of N rows points at N ~1 MP JPEGs like a crawl's (`crawl_like_jpegs`, made
from scikit-image's and scikit-learn's photos) served on 127.0.0.1. Three runs over it, each repeated:
- plain: `img2dataset.download` (its multiprocessing distributor, one process per core, original
  bytes kept), the tool people would otherwise use;
- download: this platform's download stage alone (img2dataset's downloader in per-shard Ray
  tasks, atomic and resumable), the like-for-like comparison;
- pipeline: every stage (prefilter, download, quality filter, global dedup, final shards, report).
A local Ray is started once before timing (a cluster is up already in real use). Wall-clock
medians; a quiet machine is needed for meaningful figures.

    .venv/bin/python benchmarks/pipeline_overhead.py --rows 256 --repeats 3
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality_filter import cpu_model, photos
from diffbir.config import parse_config
from pipelines.sample import SCHEMA, SampleServer

SHARD_SIZE = 64


def crawl_like_jpegs(n: int, seed: int = 0, duplicate_share: float = 0.03) -> list[bytes]:
    """n ~1 MP JPEGs (q=92), half a crawl's good images and half its bad ones, plus a few copies:
    - even rows: mosaics of 256² tiles cut at native resolution from random photos, positions and
      orientations: sharp, clean, no two alike (they pass the quality checks);
    - odd rows: crops of a photo reduced to a 300 px short side and upscaled 4×: soft, rejected
      for their effective resolution, as web upscales are;
    - `duplicate_share` of the rows: an earlier row shrunk by 10% and re-encoded at q=85 (a near
      duplicate; LAION has a few % of them)."""
    rng = np.random.default_rng(seed)
    sources = photos()
    upscaled = []
    for img in sources:
        f = 300 / min(img.shape[:2])
        size = (round(img.shape[1] * f), round(img.shape[0] * f))
        small = Image.fromarray(img).resize(size, Image.Resampling.LANCZOS)
        upscaled.append(np.asarray(small.resize((small.width * 4, small.height * 4), Image.Resampling.BICUBIC)))
    out = []
    for i in range(n):
        w, h = 1024, 1024 if i % 4 < 2 else 768
        if i and rng.random() < duplicate_share:
            img = Image.open(io.BytesIO(out[rng.integers(0, i)]))
            img, quality = img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.Resampling.LANCZOS), 85
        elif i % 2 == 0:
            canvas = np.empty((h + 256, w + 256, 3), np.uint8)  # cut 3 px in: seams off the 8×8 JPEG grid
            for y in range(0, h + 1, 256):
                for x in range(0, w + 1, 256):
                    src = sources[rng.integers(0, len(sources))]
                    sy, sx = rng.integers(0, src.shape[0] - 255), rng.integers(0, src.shape[1] - 255)
                    tile = np.rot90(src[sy : sy + 256, sx : sx + 256], rng.integers(0, 4))
                    canvas[y : y + 256, x : x + 256] = tile[:, ::-1] if rng.random() < 0.5 else tile
            img, quality = Image.fromarray(canvas[3 : h + 3, 3 : w + 3]), 92
        else:
            src = upscaled[rng.integers(0, len(upscaled))]
            y, x = rng.integers(0, src.shape[0] - h + 1), rng.integers(0, src.shape[1] - w + 1)
            img, quality = Image.fromarray(src[y : y + h, x : x + w]), 92
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def write_metadata(root: Path, base_url: str, images: list[bytes]) -> Path:
    rows = []
    for i, data in enumerate(images):
        (root / "www" / f"{i:06d}.jpg").write_bytes(data)
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        rows.append(
            dict(
                URL=f"{base_url}/img/{i:06d}.jpg",
                TEXT=f"photo {i}",
                WIDTH=w,
                HEIGHT=h,
                similarity=0.3,
                hash=i,
                punsafe=0.01,
                pwatermark=0.01,
                AESTHETIC_SCORE=6.0,
            )
        )
    path = root / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def run_plain(metadata: Path, out: Path) -> None:
    from img2dataset import download

    download(
        url_list=str(metadata),
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        output_format="webdataset",
        output_folder=str(out),
        processes_count=os.cpu_count(),
        thread_count=16,
        resize_mode="no",
        number_sample_per_shard=SHARD_SIZE,
        distributor="multiprocessing",
        timeout=10,
        retries=0,
    )


def run_download(metadata: Path, out: Path) -> None:
    from pipelines.download import DownloadConfig, download

    download([str(metadata)], out, DownloadConfig(shard_size=SHARD_SIZE, thread_count=16))


def run_pipeline(metadata: Path, out: Path) -> None:
    from pipelines.filter_laion import FilterLaionConfig, run

    run(
        FilterLaionConfig(
            metadata=[str(metadata)], output=str(out), download={"shard_size": SHARD_SIZE, "thread_count": 16}
        )
    )


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = Field(256, ge=1, le=100_000, description="metadata rows, each a ~1 MP JPEG")
    repeats: int = Field(3, ge=1, description="runs of each kind (median taken)")


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/pipeline_overhead.py")

    from pipelines.ray_env import ensure_ray

    ensure_ray()
    runs = {"plain img2dataset": run_plain, "download stage": run_download, "whole pipeline": run_pipeline}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "www").mkdir()
        with SampleServer(root / "www") as server:
            metadata = write_metadata(root, server.base_url, crawl_like_jpegs(args.rows))
            for r in range(args.repeats):
                for name, fn in runs.items():  # interleaved, so drifting load hits all alike
                    out = root / f"out-{r}-{name.split()[0]}"
                    t = time.perf_counter()
                    fn(metadata, out)
                    times[name].append(time.perf_counter() - t)
                    shutil.rmtree(out)
    print(f"{args.rows} rows of ~1 MP JPEG on {os.cpu_count()} cores ({cpu_model()}), {args.repeats} repeats")
    base = statistics.median(times["plain img2dataset"])
    print("| run | median s | images/s | vs plain img2dataset |\n|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(
            f"| {name} | {m:.1f} | {args.rows / m:.1f} | {m / base:.2f}x |  (all: {', '.join(f'{t:.1f}' for t in ts)})"
        )


if __name__ == "__main__":
    main()
