"""The whole data pipeline against plain img2dataset on the same rows, at a size where per-image
costs dominate: images/s per core, storage and the driver's peak memory.

N ~1 MP JPEGs like a crawl's (`pipeline_overhead.crawl_like_jpegs`: half sharp mosaics of the
bundled photos, half soft upscales the quality filter rejects, 3% near-duplicates) are served on
127.0.0.1 and listed in a LAION-style parquet, for each size asked for. Each run is a fresh process joined to a
local Ray started once before timing (a cluster is up already in real use):
- plain: `img2dataset.download` (its multiprocessing distributor, one process per core, the
  original bytes of every image kept), what people would otherwise run;
- pipeline: `python -m pipelines.filter_laion` (prefilter, the streaming download+quality pass,
  dedup, final shards, report).
Per run: wall seconds, images/s per core (rows / wall / cores), the driver's peak RSS, and the
bytes it leaves: every intermediate file (plain: its whole output) and the final shards. With
two sizes or more, the per-image cost of each tool is the slope between the smallest and the
largest (what a run of millions of images pays; each run's fixed cost, Ray Data's planning and
start-up per stage, drops out). The pipeline's stage times come from its log. Needs a quiet
machine for meaningful figures.

    .venv/bin/python benchmarks/filter_throughput.py --images 2000 8000 [--repeats 3]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.pipeline_overhead import crawl_like_jpegs, write_metadata
from benchmarks.quality_filter import cpu_model
from diffbir.config import parse_config
from pipelines.sample import SampleServer

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: the driver's peak RSS is its own.
CHILD = """
import json, sys
kind, metadata, out, shard_size, threads = json.loads(sys.argv[1])
if kind == "plain":
    from img2dataset import download
    download(url_list=metadata, input_format="parquet", url_col="URL", caption_col="TEXT",
             output_format="webdataset", output_folder=out, processes_count=__import__("os").cpu_count(),
             thread_count=threads, resize_mode="no", number_sample_per_shard=shard_size,
             distributor="multiprocessing", timeout=10, retries=0)
else:
    from pipelines.filter_laion import main
    code = main(["--metadata", metadata, "--output", out, "--download.shard-size", str(shard_size),
                 "--download.thread-count", str(threads)])
    assert code == 0, code
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so it would report the parent's size
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"maxrss_kb": int(hwm.split()[1])}))
"""
_STAGE_TIME = re.compile(r" filter_laion ([\w+ ]+): .*?\((\d+) s")


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[int] = Field(
        [2000, 8000],
        min_length=1,
        max_length=4,
        description="metadata row counts to run (each a ~1 MP JPEG); two or more also give the per-image "
        "(marginal) rates, with the fixed costs of a run taken out",
    )
    repeats: int = Field(1, ge=1, le=10, description="runs of each kind (median taken)")
    shard_size: int = Field(100, ge=1, le=10_000, description="rows per download shard (both tools)")
    thread_count: int = Field(16, ge=1, le=256, description="download threads per shard task / process")


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _run(kind: str, metadata: Path, out: Path, args: BenchConfig, env: dict) -> dict:
    argv = json.dumps([kind, str(metadata), str(out), args.shard_size, args.thread_count])
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, argv], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    result = {"wall": wall, "rss_mb": json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kb"] / 1024}
    if kind == "plain":
        return result | {"intermediate": _bytes(out), "final": 0, "stages": {}}
    report = json.loads((out / "stats.json").read_text())
    stages = {name.strip(): int(s) for name, s in _STAGE_TIME.findall(proc.stderr)}
    return result | {
        "intermediate": _bytes(out / "_work"),
        "final": _bytes(out / "shards"),
        "stages": stages,
        "kept": report["total"]["out"],
        "counts": {s["name"]: s["n_out"] for s in report["stages"]},
        "candidate_tars": sum(p.stat().st_size for p in (out / "_work").rglob("*.tar")),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/filter_throughput.py")

    import ray

    from pipelines.ray_env import ensure_ray

    ensure_ray()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    sizes = sorted(set(args.images))
    if not all(1 <= n <= 100_000 for n in sizes):
        raise SystemExit("--images: each between 1 and 100000")
    runs: dict[int, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in sizes:
            runs[n] = {"plain img2dataset": [], "whole pipeline": []}
            www = root / "www"
            shutil.rmtree(www, ignore_errors=True)
            www.mkdir()
            with SampleServer(www) as server:
                metadata = write_metadata(root, server.base_url, crawl_like_jpegs(n))
                for r in range(args.repeats):
                    for name in runs[n]:  # interleaved, so drifting load hits both alike
                        out = root / f"out-{r}-{name.split()[0]}"
                        runs[n][name].append(_run(name.split()[0], metadata, out, args, env))
                        shutil.rmtree(out)
    cores = os.cpu_count()
    print(f"~1 MP JPEGs (crawl_like_jpegs), {args.shard_size} rows per shard, on {cores} cores ({cpu_model()})")
    print(f"`python benchmarks/filter_throughput.py --images {' '.join(map(str, sizes))} --repeats {args.repeats}`\n")
    print(
        "| images | run | median s | images/s per core | vs plain | driver peak RSS MB | intermediate MB | final MB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    walls = {n: {name: statistics.median(r["wall"] for r in rs) for name, rs in by.items()} for n, by in runs.items()}
    for n, by in runs.items():
        for name, results in by.items():
            wall, last = walls[n][name], results[-1]
            print(
                f"| {n} | {name} | {wall:.1f} | {n / wall / cores:.1f} | {wall / walls[n]['plain img2dataset']:.2f}x "
                f"| {max(r['rss_mb'] for r in results):.0f} | {last['intermediate'] / 1e6:.1f} "
                f"| {last['final'] / 1e6:.1f} |"
            )
    if len(sizes) > 1:  # the slope between the smallest and largest run: seconds per extra image
        lo, hi = sizes[0], sizes[-1]
        slope = {name: (walls[hi][name] - walls[lo][name]) / (hi - lo) for name in walls[hi]}
        print(f"\nper image, between {lo} and {hi} images (fixed costs of a run taken out):")
        for name, s in slope.items():
            fixed = walls[lo][name] - s * lo
            print(
                f"- {name}: {1000 * s * cores:.1f} core-ms per image ({1 / s / cores:.1f} images/s per core), "
                f"{s / slope['plain img2dataset']:.2f}x plain; fixed cost {fixed:.1f} s"
            )
    for n, by in runs.items():
        pipeline = by["whole pipeline"][-1]
        ratio = pipeline["intermediate"] / pipeline["final"] if pipeline["final"] else float("nan")
        tars = pipeline["candidate_tars"]
        print(f"\n{n} images: {pipeline['kept']} kept; intermediate/final storage {ratio:.2f}x")
        print("images after each stage: " + ", ".join(f"{k} {v}" for k, v in pipeline["counts"].items()))
        rest = pipeline["intermediate"] - tars
        print(f"intermediate: candidate tars {tars / 1e6:.1f} MB, the rest {rest / 1e6:.1f} MB")
        print("stage seconds (last run, from its log): " + ", ".join(f"{k} {v}" for k, v in pipeline["stages"].items()))


if __name__ == "__main__":
    main()
