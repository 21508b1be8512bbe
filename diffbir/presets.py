"""Presets: the sampling settings the official inference uses for each DiffBIR release, as
RestoreOptions fields (README: the table preset -> settings).

* v2.1: the defaults of the reference HEAD's inference.py (EDM DPM++ 3M SDE, 10 steps, cfg 6, its
  long default prompts). Its captioner is off by default (the positive prompt is the default alone);
  with `--captioner` each image's caption leads that prompt, as in the reference.
* v2: the README's "DiffBIR v2 (ECCV paper version)" commands (spaced DDPM, 50 steps, cfg 4, empty
  positive prompt, the short negative prompt).
* v1: the v1 release's inference.py (spaced DDPM, 50 steps, no classifier-free guidance, empty prompts).
* paper: the paper's sampling (= v2's settings) without a schedule, so it runs on any weights with
  their own; e.g. v2.1 weights sampled the paper's way.

Every release applies the wavelet colour fix. A preset with a schedule names the noise schedule of
its weights; RestorationPipeline refuses it on a model that records another version.
"""

from __future__ import annotations

from typing import Any, Literal

Version = Literal["v1", "v2", "v2.1"]
Preset = Literal["v2.1", "v2", "v1", "paper"]

V21_POSITIVE = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, "
    "hyper detailed photo - realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, "
    "skin pore detailing, hyper sharpness, perfect without deformations."
)
V21_NEGATIVE = (
    "painting, oil painting, illustration, drawing, art, sketch, oil painting, cartoon, "
    "CG Style, 3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, watermark, "
    "signature, jpeg artifacts, deformed, lowres, over-smooth."
)
PAPER_NEGATIVE = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"

_PAPER = dict(sampler="ddpm", steps=50, cfg_scale=4.0, prompt="", negative_prompt=PAPER_NEGATIVE, color_fix="wavelet")
PRESETS: dict[str, dict[str, Any]] = {
    "v2.1": dict(
        schedule="v2.1",
        sampler="edm_dpm++_3m_sde",
        steps=10,
        cfg_scale=6.0,
        prompt=V21_POSITIVE,
        negative_prompt=V21_NEGATIVE,
        color_fix="wavelet",
    ),
    "v2": dict(schedule="v2", **_PAPER),
    "v1": dict(
        schedule="v1", sampler="ddpm", steps=50, cfg_scale=1.0, prompt="", negative_prompt="", color_fix="wavelet"
    ),
    "paper": _PAPER,
}
