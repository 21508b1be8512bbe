"""Load test of the restoration API: N requests from C concurrent clients, each a different crop
of a real photo; counts failures, reports latency percentiles, throughput and the batch sizes the
server formed (each response's X-Batch-Size, and the replicas' GET /v1/stats).

    python benchmarks/serve_load.py --model /tmp/diffbir-tiny                 # starts the app here
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/ --token ...  # a running app

With --model (a model URI or platform directory) the app is started in this process from
--serve-config (serving/configs/serve.yaml) on a free port. `--hostile 0.1` makes that share of
the requests hostile (HOSTILE: bad seeds, costly options, bombs, garbage bodies): each must be
refused with a 4xx, and the good ones must all succeed. Exit status 1 when a good request failed
or a hostile one got anything but a 4xx.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import struct
import sys
import time
import zlib
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


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height and holds no pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# name -> (body, or None for the good request's image; options over the good request's)
HOSTILE: dict[str, tuple[bytes | None, dict]] = {
    "seed_2^70": (None, {"seed": 2**70}),
    "guidance_repeat_100000": (None, {"guidance_scale": 0.1, "guidance_repeat": 100_000}),
    "tile_stride_8": (None, {"min_side": 1024, "tiled": "true", "tile_size": 64, "tile_stride": 8}),
    "untiled_4096": (None, {"min_side": 4096, "tiled": "false"}),
    "upscale_16": (None, {"upscale": 16}),
    "steps_1000": (None, {"steps": 1000}),
    "long_prompt": (None, {"prompt": "x" * 5000}),
    "unknown_option": (None, {"sharpen": 1}),
    "garbage_body": (b"\x00garbage" * 100, {}),
    "truncated_png": ("truncated", {}),  # the good image cut in half
    "bomb_header": (_png_header(100_000, 100_000), {}),
}


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


def make_hostile(images: list[bytes], params: list[dict], share: float, seed: int) -> list[str]:
    """Turn `share` of the requests (at random places) into hostile ones, in place; each
    request's kind: "good" or its HOSTILE name."""
    rng = np.random.default_rng(seed)
    kinds = ["good"] * len(images)
    chosen = rng.choice(len(images), size=round(share * len(images)), replace=False)
    names = list(HOSTILE)
    for n, i in enumerate(sorted(chosen)):
        name = names[n % len(names)]
        body, options = HOSTILE[name]
        images[i] = images[i][: len(images[i]) // 2] if body == "truncated" else (body or images[i])
        params[i] = params[i] | options
        kinds[i] = name
    return kinds


def summarize(records: list[dict], kinds: list[str], wall: float, stats: dict | None) -> dict:
    hostile = [(kind, r) for kind, r in zip(kinds, records) if kind != "good"]
    records = [r for kind, r in zip(kinds, records) if kind == "good"]
    seconds = [r["seconds"] for r in records if r["ok"]]
    sizes = Counter(r["batch_size"] for r in records if r["ok"])
    return dict(
        requests=len(records),
        failures=sum(not r["ok"] for r in records),
        errors=[r["error"] for r in records if not r["ok"]][:5],
        hostile_requests=len(hostile),
        # every hostile request must be refused with a 4xx: anything else is a failure too
        hostile_not_refused=sum(not (r["status"] and 400 <= r["status"] < 500) for _, r in hostile),
        hostile_statuses=dict(sorted(Counter(f"{kind} {r['status']}" for kind, r in hostile).items())),
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
    hostile: float = Field(0.0, ge=0, le=1, description="share of the measured requests made hostile (HOSTILE)")
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
    warm = images[: args.warmup], params[: args.warmup]
    measured = images[args.warmup :], params[args.warmup :]
    kinds = make_hostile(*measured, args.hostile, args.seed)
    if args.url:
        return measure(args.url.rstrip("/") + "/", args, warm, measured, kinds)
    from ray import serve  # the app runs here: Ray and Serve only then

    from pipelines.ray_env import ensure_ray, free_port
    from serving.app import run

    if args.token:  # the replicas, local Ray workers started below, read it from the environment
        os.environ[TOKEN_ENV] = args.token
    cfg = load_config(ServeConfig, args.serve_config, model_uri=args.model, port=free_port())
    ensure_ray()
    url = run(cfg)
    print(
        f"started {args.model} at {url}: max_batch_size {cfg.max_batch_size}, "
        f"batch_wait_timeout_s {cfg.batch_wait_timeout_s}, replicas {cfg.num_replicas}",
        flush=True,
    )
    try:
        return measure(url, args, warm, measured, kinds)
    finally:
        serve.shutdown()


Requests = tuple[list[bytes], list[dict]]  # bodies and their options


def measure(url: str, args: BenchConfig, warm: Requests, measured: Requests, kinds: list[str]) -> int:
    warm_records = asyncio.run(load(url, args.token, *warm, 1))
    if not all(r["ok"] for r in warm_records):
        print(f"warm-up failed: {[r['error'] for r in warm_records]}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    records = asyncio.run(load(url, args.token, *measured, args.concurrency))
    wall = time.perf_counter() - start
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    stats = httpx.get(url + "v1/stats", headers=headers, timeout=30).json()  # one replica's, warm-up included
    summary = summarize(records, kinds, wall, stats) | dict(
        concurrency=args.concurrency, size=args.size, tasks=args.tasks, steps=args.steps, upscale=args.upscale
    )
    print(json.dumps(summary, indent=2))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(summary | {"records": records, "kinds": kinds}, f, indent=1)
    return 1 if summary["failures"] or summary["hostile_not_refused"] else 0


if __name__ == "__main__":
    sys.exit(main())
