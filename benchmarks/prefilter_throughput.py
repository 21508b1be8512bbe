"""The metadata prefilter's throughput (rows/s) on synthetic laion2B-en-shaped metadata.

N rows with LAION's columns and value ranges (URL lengths and shapes of real CDN URLs, captions
of 3-15 words, sizes 100-2000 px, uniform watermark/unsafe probabilities, aesthetic ~ N(5, 1)),
a fraction of them repeating an earlier row's URL (LAION's URL duplicates), written as snappy
parquet files of about 1M rows each. `prefilter()` runs on a local Ray started once before
timing (a cluster is up already in real use); wall-clock medians over the repeats, and rows/s per
vCPU. A quiet machine is needed for meaningful figures.

    .venv/bin/python benchmarks/prefilter_throughput.py --rows 1000000 --repeats 3
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quality_filter import cpu_model
from diffbir.config import parse_config
from pipelines.prefilter import PrefilterConfig, prefilter
from pipelines.ray_env import ensure_ray

ROWS_PER_FILE = 1_000_000


def synthetic_metadata(n: int, duplicate_fraction: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    urls = np.array(
        [
            f"https://img{h}.example-cdn.com/wp-content/uploads/2019/05/photo-{i:09d}-{t:x}.jpg"
            for i, (h, t) in enumerate(zip(rng.integers(0, 10**6, n), rng.integers(0, 10**9, n)))
        ]
    )
    repeats = rng.random(n) < duplicate_fraction
    urls[repeats] = urls[rng.integers(0, n, repeats.sum())]
    return pd.DataFrame(
        {
            "SAMPLE_ID": np.arange(n),
            "URL": urls,
            "TEXT": ["a photo of a " + "word " * int(w) for w in rng.integers(1, 13, n)],
            "WIDTH": rng.integers(100, 2000, n),
            "HEIGHT": rng.integers(100, 2000, n),
            "similarity": rng.random(n),
            "hash": rng.integers(-(2**63), 2**63 - 1, n),
            "pwatermark": rng.random(n),
            "punsafe": rng.random(n),
            "AESTHETIC_SCORE": rng.normal(5, 1, n),
        }
    )


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = Field(1_000_000, ge=1, description="synthetic metadata rows")
    duplicate_fraction: float = Field(0.05, ge=0, lt=1, description="rows repeating another row's URL")
    repeats: int = Field(3, ge=1, description="prefilter runs (median taken)")


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/prefilter_throughput.py")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "meta").mkdir()
        df = synthetic_metadata(args.rows, args.duplicate_fraction)
        for i, start in enumerate(range(0, args.rows, ROWS_PER_FILE)):
            pq.write_table(
                pa.Table.from_pandas(df.iloc[start : start + ROWS_PER_FILE], preserve_index=False),
                root / "meta" / f"part-{i:05d}.parquet",
                compression="snappy",
            )
        del df
        ensure_ray()
        walls, result = [], None
        for r in range(args.repeats):
            t = time.perf_counter()
            result = prefilter(root / "meta", root / f"out{r}", PrefilterConfig())
            walls.append(time.perf_counter() - t)
    wall = statistics.median(walls)
    cores = os.cpu_count()
    print(f"machine: {cores} vCPU {cpu_model()}")
    print(f"rows {result.total}, kept {result.kept}, rejected {result.rejected}")
    print(f"wall (s) per run: {', '.join(f'{w:.1f}' for w in walls)}; median {wall:.1f}")
    print(f"throughput: {result.total / wall:,.0f} rows/s, {result.total / wall / cores:,.0f} rows/s per vCPU")


if __name__ == "__main__":
    main()
