"""Seconds per sampling step of full-size SD 2.1 + IRControlNet at 512x512 (latent 64x64), with
and without restoration guidance, in fp32 and bf16; plus VAE encode, decode, decode forward +
backward (the floor of an RGB-guidance repeat) and peak memory. Per-image set-up (the latent
guidance target's encode) is timed apart from the steps. "guidance_update": one RGB-guidance
update alone (decode, loss, vector-Jacobian product) with its memory above the resident weights
(the process's peak RSS is reset just before it: /proc/self/clear_refs). "preset_v2.1" /
"preset_paper": seconds per image with that preset's sampler, steps and cfg (diffbir.presets):
condition encode, sampling (two network calls a step with cfg), decode - what a user of the preset
waits for at 512x512, less stage 1 and the text tower (prompts' contexts are cached).

Random weights (diffusers' default initialisation) at the real sizes: speed does not depend on
the values. Each configuration runs in a fresh process (peak RSS / CUDA peak per configuration).

    python benchmarks/sampling_speed.py [--dtypes fp32 bf16] [--steps 2] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from diffbir.config import MATMUL_PRECISION_HELP, Dtype, MatmulPrecision, parse_config

VARIANTS = ("unguided", "guided_rgb", "guided_latent", "vae", "guidance_update", "preset_v2.1", "preset_paper")

CHILD = r"""
import json, statistics, sys, time, torch
from diffbir.config import DiffusionConfig
from diffbir.models.cldm import ControlLDM
from diffbir.models.unet import IRControlNet, UNetConfig, build_unet
from diffbir.models.vae import VAEConfig, build_vae
from diffbir.pipeline import DTYPES, RestoreOptions
from diffbir.sampling import Denoiser, RestorationGuidance, cfg_model, sample

variant, dtype_name, steps, repeats, device, size, warmup, matmul_precision = sys.argv[1:9]
steps, repeats, size, warmup = int(steps), int(repeats), int(size), int(warmup)
torch.set_float32_matmul_precision(matmul_precision)
dtype = DTYPES[dtype_name]
torch.manual_seed(0)
ucfg = UNetConfig()
cldm = ControlLDM(build_unet(ucfg), IRControlNet.from_unet_config(ucfg), build_vae(VAEConfig()))
cldm = cldm.to(device, dtype).eval()
cldm.requires_grad_(False)
image = torch.rand(1, 3, size, size, device=device, dtype=dtype) * 2 - 1
ctx = torch.randn(1, 77, ucfg.context_dim, device=device, dtype=dtype)

def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize()

def rss_gb(field="VmRSS"):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024 / 1e9

def hwm_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else rss_gb("VmHWM")

def decode_fwd_bwd(z):
    # what RGB guidance needs once per repeat at least: the decoder forward with grad, then backward
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        cldm.vae_decode(z).float().square().mean().backward()

times, setups, above = [], [], []
with torch.no_grad():
    c_img = cldm.vae_encode(image)
    if variant.startswith("preset_"):
        opts = RestoreOptions(preset=variant.removeprefix("preset_"))
        config = DiffusionConfig.preset(opts.schedule) if opts.schedule else DiffusionConfig()
        for r in range(repeats + warmup):
            sync(); t = time.perf_counter()
            c = cldm.vae_encode(image)
            den = Denoiser(cfg_model(cldm, c, ctx, -ctx, opts.cfg_scale), config)
            cldm.vae_decode(sample(den, torch.randn_like(c), opts.sampler, opts.steps, edm=opts.edm))
            sync()
            if r >= warmup: times.append(time.perf_counter() - t)
    if variant == "guidance_update":
        hook = RestorationGuidance(cldm, image, 0.01)
        for r in range(repeats + warmup):
            resident = rss_gb()
            open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
            sync(); t = time.perf_counter()
            hook.update(c_img, 0.05)
            sync()
            if r >= warmup: times.append(time.perf_counter() - t); above.append(rss_gb("VmHWM") - resident)
    for r in range(repeats + warmup):  # the first `warmup` runs warm up
        sync(); t = time.perf_counter()
        if variant == "guidance_update" or variant.startswith("preset_"):
            break
        if variant == "vae":
            cldm.vae_encode(image); sync(); enc = time.perf_counter() - t
            t = time.perf_counter(); cldm.vae_decode(c_img); sync(); dec = time.perf_counter() - t
            t = time.perf_counter(); decode_fwd_bwd(c_img); sync(); fb = time.perf_counter() - t
            if r >= warmup: times.append((enc, dec, fb))
            continue
        den = Denoiser(cfg_model(cldm, c_img, ctx), DiffusionConfig())
        hook = None
        if variant != "unguided":  # once per image, not per step (latent space: encodes the target)
            hook = RestorationGuidance(cldm, image, 0.01, space=variant.split("_")[1])
        sync(); setup = time.perf_counter() - t; t = time.perf_counter()
        sample(den, torch.randn_like(c_img), "ddpm", steps, x0_hook=hook)
        sync()
        if r >= warmup: times.append((time.perf_counter() - t) / steps); setups.append(setup)
out = {"variant": variant, "dtype": dtype_name, "peak_gb": hwm_gb()}
if variant.startswith("preset_"):
    out["image_s"] = statistics.median(times)
elif variant == "guidance_update":
    out["update_s"], out["above_weights_gb"] = statistics.median(times), max(above)
elif variant == "vae":
    for i, key in enumerate(("encode_s", "decode_s", "decode_fwd_bwd_s")):
        out[key] = statistics.median(x[i] for x in times)
else:
    out["step_s"], out["setup_s"] = statistics.median(times), statistics.median(setups)
print(json.dumps(out))
"""


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtypes: list[Dtype] = Field(["fp32", "bf16"], description="precisions to time")
    variants: list[Literal[VARIANTS]] = Field(list(VARIANTS), description="what to time")
    steps: int = Field(2, ge=1, description="sampling steps per timed run")
    repeats: int = Field(3, ge=1, description="timed runs (median)")
    warmup: int = Field(1, ge=0, le=3, description="untimed runs first")
    device: str = Field("cpu", description="torch device")
    size: int = Field(512, ge=64, description="image side in pixels (latent: /8)")
    matmul_precision: MatmulPrecision = Field("highest", description=MATMUL_PRECISION_HELP)


def main(argv: list[str] | None = None) -> None:
    args = parse_config(BenchConfig, argv, __doc__, "python benchmarks/sampling_speed.py")
    print(
        f"| variant | dtype | s/step (median of {args.repeats}) | once per image s "
        "| VAE enc / dec / dec fwd+bwd s | guidance update s / GB above the weights | peak GB |"
    )
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        for variant in args.variants:
            cmd = [
                sys.executable,
                "-c",
                CHILD,
                variant,
                dtype,
                str(args.steps),
                str(args.repeats),
                args.device,
                str(args.size),
                str(args.warmup),
                args.matmul_precision,
            ]
            res = json.loads(
                subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            )
            step, setup = (f"{res['step_s']:.2f}", f"{res['setup_s']:.2f}") if "step_s" in res else ("–", "–")
            if "image_s" in res:  # a preset: the whole image
                step = f"{res['image_s']:.1f} per image"
            vae = (
                " / ".join(f"{res[k]:.2f}" for k in ("encode_s", "decode_s", "decode_fwd_bwd_s"))
                if "encode_s" in res
                else "–"
            )
            update = f"{res['update_s']:.2f} / {res['above_weights_gb']:.2f}" if "update_s" in res else "–"
            print(f"| {variant} | {dtype} | {step} | {setup} | {vae} | {update} | {res['peak_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
