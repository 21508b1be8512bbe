"""Peak memory of tiled restoration as the image grows (the whole RestorationPipeline: tiled
stage 1, tiled VAE encode, tiled denoiser, tiled decode, colour fix), one fresh process per size.

    python benchmarks/tiled_memory.py --weights full --sizes 1024 2048 --steps 1
    python benchmarks/tiled_memory.py --weights tiny --sizes 4096x3072 --steps 2

--weights full: SD 2.1 + IRControlNet + DiffBIR SwinIR at the real sizes, random weights.
--weights tiny: the tiny official-layout files of `diffbir init-tiny` (made in runs/tiny when missing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from diffbir.config import parse_config

CHILD = r"""
import json, os, sys, time
from pathlib import Path
import numpy as np, torch
from diffbir.checkpoints.loading import LoadedPart, ModelBundle, load_model
from diffbir.pipeline import RestorationPipeline, RestoreOptions

weights, size, steps, tile, stride = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
h, w = map(int, size.split("x")) if "x" in size else (int(size), int(size))

def hwm_gb():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024 / 1e9

if weights == "tiny":
    from diffbir.checkpoints.tiny import write_keyed_files

    bundle = load_model(write_keyed_files("runs/tiny"), num_head_channels=16)
else:
    from diffbir.models.swinir import SwinIR, SwinIRConfig
    from diffbir.models.unet import IRControlNet, UNetConfig, build_unet
    from diffbir.models.vae import VAEConfig, build_vae
    torch.manual_seed(0)
    u = UNetConfig()
    mods = {
        "unet": build_unet(u),
        "controlnet": IRControlNet.from_unet_config(u),
        "vae": build_vae(VAEConfig()),
        "swinir": SwinIR(SwinIRConfig()),
    }
    bundle = ModelBundle({k: LoadedPart(m.eval().requires_grad_(False), {}, "random") for k, m in mods.items()})
pipe = RestorationPipeline(bundle)
loaded = hwm_gb()
yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
image = np.stack([yy / h, xx / w, 0.5 + 0.1 * np.sin(xx / 37.0)], -1).astype(np.float32)
opts = RestoreOptions(task="denoise", steps=steps, cfg_scale=1.0, tiled=True, tile_size=tile, tile_stride=stride)
t = time.perf_counter()
out = pipe([image], opts)[0]
print(json.dumps({"size": f"{h}x{w}", "weights": weights, "out": list(out.shape), "after_load_gb": loaded,
                  "peak_gb": hwm_gb(), "seconds": time.perf_counter() - t}))
"""


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: Literal["full", "tiny"] = Field("full", description="real sizes (random weights) or the tiny files")
    sizes: list[str] = Field(["1024", "2048"], description="image sizes: N (square) or HxW")
    steps: int = Field(1, ge=1, description="sampling steps")
    tile_size: int = Field(512, ge=64, description="tile side in image pixels")
    tile_stride: int = Field(448, ge=8, description="tile stride in image pixels")


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/tiled_memory.py")
    print("| weights | image | steps | tile / stride | peak RSS GB | after loading GB | seconds |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cmd = [
            sys.executable,
            "-c",
            CHILD,
            args.weights,
            size,
            str(args.steps),
            str(args.tile_size),
            str(args.tile_stride),
        ]
        res = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        )
        print(
            f"| {args.weights} | {res['size']} | {args.steps} | {args.tile_size} / {args.tile_stride} | "
            f"{res['peak_gb']:.2f} | {res['after_load_gb']:.2f} | {res['seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
