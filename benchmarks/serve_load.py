"""Load test of the restoration API: N requests from C concurrent clients, each a different crop
of a real photo; counts failures, reports latency percentiles, throughput and the batch sizes the
server formed (each response's X-Batch-Size, and the replicas' GET /v1/stats).

    python benchmarks/serve_load.py --model /tmp/diffbir-tiny                 # starts the app here
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/ --token ...  # a running app

With --model (a model URI or platform directory) the app is started in this process from
--serve-config (serving/configs/serve.yaml) on a free port. Exit status 1 when any request failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections import Counter
from typing import Annotated, Literal

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from skimage import data

from diffbir.config import Arg, load_config, parse_config
from diffbir.image_io import encode_image
from serving.config import TOKEN_ENV, ServeConfig

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def crops(count: int, size: int, seed: int) -> list[bytes]:
    """`count` PNG crops of size x size at random places in the bundled photos."""
    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)() for name in PHOTOS]
    out = []
    for i in range(count):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        out.append(encode_image(img[y : y + size, x : x + size].astype(np.float32) / 255))
    return out


async def load(url: str, token: str | None, images: list[bytes], params: list[dict], concurrency: int) -> list[dict]:
    """Send every request, `concurrency` at a time; one record per request, in order."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(images)):
        queue.put_nowait(i)
    records: list[dict] = [{} for _ in images]

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            start = time.perf_counter()
            try:
                r = await http.post("v1/restore", params=params[i], content=images[i], headers=headers)
                ok = r.status_code == 200
                records[i] = dict(
                    status=r.status_code,
                    ok=ok,
                    error=None if ok else r.text[:200],
                    batch_size=int(r.headers.get("X-Batch-Size", 0)),
                    version=r.headers.get("X-Model-Version"),
                )
            except httpx.HTTPError as e:
                records[i] = dict(status=None, ok=False, error=repr(e), batch_size=0, version=None)
            records[i]["seconds"] = time.perf_counter() - start

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return records


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(records: list[dict], wall: float, stats: dict | None) -> dict:
    seconds = [r["seconds"] for r in records if r["ok"]]
    sizes = Counter(r["batch_size"] for r in records if r["ok"])
    return dict(
        requests=len(records),
        failures=sum(not r["ok"] for r in records),
        errors=[r["error"] for r in records if not r["ok"]][:5],
        wall_s=round(wall, 2),
        requests_per_s=round(len(records) / wall, 3),
        latency_s={
            q: round(percentile(seconds, p), 3) for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        mean_latency_s=round(statistics.fmean(seconds), 3) if seconds else None,
        # requests by the size of the batch they were in; batches = sum(count / size)
        requests_by_batch_size={str(k): v for k, v in sorted(sizes.items())},
        batches=round(sum(v / k for k, v in sizes.items() if k)),
        versions=dict(Counter(r["version"] for r in records)),
        server_stats=stats,
    )


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(None, description="a running app (None: start one here with --model)")
    model: str | None = Field(None, description="model URI or platform directory for the app started here")
    serve_config: str = Field("serving/configs/serve.yaml", description="ServeConfig YAML for the app started here")
    token: str | None = Field(None, description=f"bearer token (None: ${TOKEN_ENV})")
    requests: int = Field(200, ge=1, description="requests measured")
    concurrency: int = Field(16, ge=1, description="clients sending at once")
    warmup: int = Field(2, ge=0, description="requests sent (one by one) before measuring")
    size: int = Field(64, ge=8, description="side of the square input crops")
    tasks: list[Literal["sr", "face", "denoise"]] = Field(["denoise", "sr"], description="cycled over the requests")
    upscale: float = Field(2, gt=0, description="for sr requests")
    steps: int = Field(2, ge=1, description="sampling steps per request")
    min_side: int = Field(64, ge=64, description="the requests' min_side")
    seed: int = Field(0, description="crop placement; request i uses seed + i")
    # not `json`, which would shadow BaseModel.json
    json_path: Annotated[str | None, Arg("--json")] = Field(None, description="also write the summary here")


def main(argv: list[str] | None = None) -> int:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/serve_load.py")
    args.token = args.token or os.environ.get(TOKEN_ENV)
    if not args.url and not args.model:
        print("serve_load: give --url (a running app) or --model (start one here)", file=sys.stderr)
        return 2

    images = crops(args.warmup + args.requests, args.size, args.seed)
    params = []
    for i in range(len(images)):
        task = args.tasks[i % len(args.tasks)]
        upscale = {"upscale": args.upscale} if task == "sr" else {}
        params.append(dict(task=task, steps=args.steps, min_side=args.min_side, seed=args.seed + i, **upscale))
    if args.url:
        return measure(args.url.rstrip("/") + "/", args, images, params)
    from ray import serve  # the app runs here: Ray and Serve only then

    from pipelines.ray_env import ensure_ray, free_port
    from serving.app import run

    cfg = load_config(ServeConfig, args.serve_config, model_uri=args.model, port=free_port(), auth_token=args.token)
    ensure_ray()
    url = run(cfg)
    print(
        f"started {args.model} at {url}: max_batch_size {cfg.max_batch_size}, "
        f"batch_wait_timeout_s {cfg.batch_wait_timeout_s}, replicas {cfg.num_replicas}",
        flush=True,
    )
    try:
        return measure(url, args, images, params)
    finally:
        serve.shutdown()


def measure(url: str, args: BenchConfig, images: list[bytes], params: list[dict]) -> int:
    warm = asyncio.run(load(url, args.token, images[: args.warmup], params[: args.warmup], 1))
    if not all(r["ok"] for r in warm):
        print(f"warm-up failed: {[r['error'] for r in warm]}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    records = asyncio.run(load(url, args.token, images[args.warmup :], params[args.warmup :], args.concurrency))
    wall = time.perf_counter() - start
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    stats = httpx.get(url + "v1/stats", headers=headers, timeout=30).json()  # one replica's, warm-up included
    summary = summarize(records, wall, stats) | dict(
        concurrency=args.concurrency, size=args.size, tasks=args.tasks, steps=args.steps, upscale=args.upscale
    )
    print(json.dumps(summary, indent=2))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(summary | {"records": records}, f, indent=1)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
