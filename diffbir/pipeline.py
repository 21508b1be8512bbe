"""RestorationPipeline: stage 1 -> condition latent -> sampling (+ restoration guidance) ->
decode -> wavelet colour fix -> resize, for batches of images of any size.

The order is the official inference's (reference HEAD `diffbir/pipeline.py`): the colour fix takes
the decoded image cropped to the working size (not the padded canvas), unclamped, with the stage-1
image as its style, and the result is clamped only when it is resized to the output. Stage 1 gets
no clamp either. The DiffBIR SwinIR variant sees its input resized to the working size first (it
was trained on bicubic-upsampled LQ); every other stage-1 net (SCUNet, BSRNet, spandrel's) runs at
the input's own size and its output is resized, as the official SCUNet and BSRNet pipelines do.
One deliberate difference: a batch pads its canvas by replicating the border (the reference pads
with zeros), so no black frame leaks into the condition or the guidance target of a padded image.

Sizes follow the paper: the output is the input times `upscale`; when its short side is under
`min_side` (512) the work is done at a size scaled up to it, and the result resized back.
Everything large runs in tiles (stage 1, VAE, the denoiser), so memory stays flat as images grow.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffbir.captioning import Caption, Captioner, caption_batch, combine_prompt
from diffbir.checkpoints.loading import ModelBundle, load_model
from diffbir.colorfix import wavelet_reconstruction
from diffbir.config import DiffusionConfig, Dtype, MatmulPrecision
from diffbir.faces import FACE_SIZE, FaceConfig, FaceTools, align_matrix, check_landmarks, paste_face, warp_face
from diffbir.presets import PAPER_NEGATIVE, PRESETS, Preset, Version
from diffbir.sampling import SAMPLERS, Denoiser, RestorationGuidance, cfg_model, initial_latent, sample
from diffbir.sampling.edm import EDMOptions
from diffbir.sampling.tiling import cldm_tiled_denoiser, tiled_apply, tiled_stage1, tiled_vae_decode

DTYPES: dict[Dtype, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TASK_UPSCALE = {"sr": 4.0, "face": 1.0, "unaligned_face": 1.0, "denoise": 1.0}
MAX_FACES = 256  # the most faces a request may ask to restore (each is a 512² restoration)
Coordinate = Annotated[float, Field(allow_inf_nan=False)]
FaceLandmarks = Annotated[list[tuple[Coordinate, Coordinate]], Field(min_length=5, max_length=5)]
Progress = Callable[[int, int], None]  # (sampling steps done, steps in all), after every step


class RestoreOptions(BaseModel):
    """Every option of a restoration; the CLI flags and the HTTP API map onto these fields.
    `preset` fills the fields not given explicitly (model_fields_set) with that release's settings
    (diffbir.presets); without one, RestorationPipeline uses the preset of the model's version."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset | None = Field(None, description="the official settings of a release (default: the model's version)")
    schedule: Version | None = Field(
        None, description="noise schedule of the weights (v2.1: zero-terminal-SNR + v); default: the model's"
    )
    task: Literal["sr", "face", "unaligned_face", "denoise"] = Field(
        "sr",
        description="sr, face (an aligned 512² face), denoise, or unaligned_face (every face of a photo found, "
        "aligned, restored and pasted back: diffbir.faces)",
    )
    landmarks: list[FaceLandmarks] | None = Field(
        None,
        description="unaligned_face: five [x, y] input pixels per face (eyes, nose, mouth corners, image-left "
        "first), given instead of detecting (JSON); every image of a call shares them",
    )
    max_faces: int = Field(16, ge=0, le=MAX_FACES, description="unaligned_face: the largest faces restored")
    min_face_size: float = Field(
        5, ge=0, description="unaligned_face: faces whose eyes are closer than this many output pixels are left out"
    )
    upscale: float | None = Field(None, gt=0, le=16, description="output / input size; default: 4 for sr, else 1")
    min_side: int = Field(512, ge=64, description="work at least at this short side (the paper's 512)")
    sampler: Literal[SAMPLERS] = "ddpm"
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(4.0, ge=0)
    prompt: str = ""
    negative_prompt: str = PAPER_NEGATIVE
    caption: bool = Field(
        True, description="lead the prompt with the input's caption when the pipeline has a captioner (--captioner)"
    )
    rescale_cfg: bool = Field(False, description="raise the cfg scale from 1 (t = 1000) to 1 + cfg_scale (t = 0)")
    s_churn: float = Field(0.0, ge=0, description="edm_euler/heun/dpm_2: stochastic churn")
    s_tmin: float = Field(0.0, ge=0, description="edm_euler/heun/dpm_2: churn only for sigma >= this")
    s_tmax: float = Field(300.0, ge=0, description="edm_euler/heun/dpm_2: churn only for sigma <= this")
    s_noise: float = Field(1.0, ge=0, description="edm samplers: scale of the fresh noise")
    eta: float = Field(1.0, ge=0, description="edm ancestral and SDE samplers: amount of fresh noise")
    order: int = Field(1, ge=1, description="edm_lms: order")
    strength: float = Field(1.0, ge=0, description="control strength of IRControlNet")
    start_from: Literal["noise", "condition"] = "noise"
    guidance_scale: float = Field(0.0, ge=0, description="restoration guidance; 0 = off")
    guidance_space: Literal["rgb", "latent"] = "rgb"
    guidance_weighted: bool = True
    guidance_start: float = 1001
    guidance_stop: float = -1
    guidance_repeat: int = Field(1, ge=1)
    color_fix: Literal["wavelet", "none"] = "wavelet"
    tiled: bool | None = Field(None, description="None: tile when the image exceeds one tile")
    tile_size: int = Field(512, ge=64, description="image pixels (stage 1, VAE encode); latent tiles are /8")
    tile_stride: int = Field(256, ge=8)
    seed: int = Field(231, ge=0, lt=2**64, description="sampling seed (torch.Generator's range)")

    @model_validator(mode="after")
    def _apply_preset(self) -> RestoreOptions:
        if self.preset is not None:
            for name, value in PRESETS[self.preset].items():
                if name not in self.model_fields_set:
                    setattr(self, name, value)
        return self

    def with_preset(self, preset: Preset) -> RestoreOptions:
        """These options with `preset` filling the fields they were not given."""
        return RestoreOptions(**{**self.model_dump(include=self.model_fields_set), "preset": preset})

    @property
    def edm(self) -> EDMOptions:
        return EDMOptions(self.s_churn, self.s_tmin, self.s_tmax, self.s_noise, self.eta, self.order)

    @model_validator(mode="after")
    def _check(self) -> RestoreOptions:
        if self.tile_size % 64 or self.tile_stride % 8 or self.tile_stride > self.tile_size:
            raise ValueError("tile_size must be a multiple of 64 and tile_stride a multiple of 8, at most tile_size")
        if self.landmarks is not None and self.task != "unaligned_face":
            raise ValueError("landmarks: only task unaligned_face uses them")
        if self.landmarks is not None and len(self.landmarks) > self.max_faces:
            raise ValueError(f"landmarks: {len(self.landmarks)} faces, over max_faces ({self.max_faces})")
        return self

    @field_validator("landmarks", mode="before")
    @classmethod
    def _landmarks_json(cls, v):
        """A form field or query parameter brings the landmarks as JSON text."""
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not JSON: {e}") from e
        return v

    @property
    def scale(self) -> float:
        return self.upscale if self.upscale is not None else TASK_UPSCALE[self.task]


def plan_sizes(h: int, w: int, scale: float, min_side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(output size, working size) for an h x w input."""
    out = (max(1, round(h * scale)), max(1, round(w * scale)))
    up = max(1.0, min_side / min(out))
    return out, (math.ceil(out[0] * up), math.ceil(out[1] * up))


def canvas_size(h: int, w: int, opts: RestoreOptions) -> tuple[int, int]:
    """The padded size an h x w input is restored at: its working size in whole multiples of 64
    (stage 1, and latents / 8 for the UNet). A batch pads every image to its largest canvas, so
    images of one canvas restore together exactly as each would alone."""
    _, (wh, ww) = plan_sizes(h, w, opts.scale, opts.min_side)
    return math.ceil(wh / 64) * 64, math.ceil(ww / 64) * 64


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=True).to(x.dtype)


def _pad(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    ph, pw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


class RestorationPipeline:
    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if bundle.cldm is None or bundle.cldm.controlnet is None:
            raise ValueError("restoration needs a UNet, a VAE and an IRControlNet (see `diffbir convert`)")
        if bundle.stage1 is None:
            raise ValueError("restoration needs a stage-1 model (DiffBIR SwinIR or a spandrel net)")
        self.bundle = bundle.to(device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        self.cldm, self.stage1 = bundle.cldm, bundle.stage1
        # stage 1 stays float32, as in the reference (its precision cast covers the ControlLDM only):
        # a small share of the work, and spandrel's SwinIR blocks add float32 masks into their attention
        self.stage1.float()
        swinir = bundle.parts.get("swinir")
        self.stage1_scale = 1 if swinir else int(bundle.parts["stage1"].config.get("scale", 1))
        # DiffBIR SwinIR needs whole windows after unshuffling; spandrel nets pad themselves
        self.stage1_multiple = swinir.module.config.pad_multiple if swinir else 1
        self.stage1_resizes_first = swinir is not None
        self.contexts: OrderedDict[str, torch.Tensor] = OrderedDict()  # text contexts by prompt, LRU first
        self.context_cache_size = 64  # text contexts kept, least recently used dropped first
        self.captioner: Captioner | None = None  # off by default; entry points plug one in (CaptionerSettings)
        self.configure_faces(FaceConfig())

    @classmethod
    def from_pretrained(
        cls,
        paths: str | Path | Sequence[str | Path],
        device: str = "cpu",
        dtype: Dtype = "fp32",
        matmul_precision: MatmulPrecision = "highest",
        **load_kwargs,
    ) -> RestorationPipeline:
        """The pipeline of a model directory or official files; `matmul_precision` is set for the
        process (torch's setting: it applies to every model the process runs)."""
        torch.set_float32_matmul_precision(matmul_precision)
        return cls(load_model(paths, **load_kwargs), device, DTYPES[dtype])

    def configure_faces(self, cfg: FaceConfig) -> None:
        """The detector and parser of task unaligned_face, and the model that restores its faces: the
        stage-1 file `cfg.face_model` with this model's IRControlNet (the official v2.1 pairs the face
        SwinIR with the general ControlNet), or this pipeline as it is."""
        self.faces = FaceTools(cfg, self.device)
        self.face_pipeline = self
        if cfg.face_model:
            stage1 = {n: p for n, p in load_model(cfg.face_model).parts.items() if n in ("swinir", "stage1")}
            if not stage1:
                raise ValueError(f"faces.face_model {cfg.face_model}: holds no stage-1 model")
            parts = {n: p for n, p in self.bundle.parts.items() if n not in ("swinir", "stage1")} | stage1
            bundle = ModelBundle(parts, self.bundle.diffusion, self.bundle.latent_scale_factor, self.bundle.version)
            self.face_pipeline = RestorationPipeline(bundle, self.device, self.dtype)
            self.face_pipeline.context_cache_size = self.context_cache_size

    def options(self, opts: RestoreOptions | None = None) -> RestoreOptions:
        """The options a run uses: without a preset, the model's version fills what was not given."""
        opts = opts or RestoreOptions()
        version = self.bundle.version
        return opts.with_preset(version) if opts.preset is None and version is not None else opts

    def diffusion(self, opts: RestoreOptions) -> DiffusionConfig:
        """The noise schedule to sample with: the options' (a preset's) or the model's own. A model
        that records its version refuses another schedule: its weights would be read wrongly."""
        if opts.schedule is None:
            return self.bundle.diffusion
        version = self.bundle.version
        if version is not None and DiffusionConfig.preset(opts.schedule) != DiffusionConfig.preset(version):
            raise ValueError(
                f"this model is DiffBIR {version}; schedule {opts.schedule} (preset {opts.preset}) is another "
                "release's: use its own preset, or preset 'paper' for the paper's sampling on any weights"
            )
        return DiffusionConfig.preset(opts.schedule)

    @property
    def model_info(self) -> dict:
        return {name: {"source": p.source, "config": p.config} for name, p in self.bundle.parts.items()}

    def _context(self, prompt: str) -> torch.Tensor:
        """Text context; without a text tower (tiny test models) a null context of the UNet width."""
        if prompt in self.contexts:
            self.contexts.move_to_end(prompt)
            return self.contexts[prompt]
        if self.cldm.text_encoder is not None:
            ctx = self.cldm.text_context([prompt]).to(self.device, self.dtype)
        else:
            ctx = torch.zeros(1, 77, self.cldm.unet.config.cross_attention_dim, device=self.device, dtype=self.dtype)
        self.contexts[prompt] = ctx
        while len(self.contexts) > self.context_cache_size:
            self.contexts.popitem(last=False)
        return ctx

    @torch.no_grad()
    def run_stage1(self, lq: torch.Tensor, work: tuple[int, int], opts: RestoreOptions) -> torch.Tensor:
        """(1,3,h,w) in [0,1] -> the stage-1 restoration at the working size, unclamped (in lq's dtype)."""
        dtype, lq = lq.dtype, lq.float()
        if self.stage1_resizes_first:
            lq = _resize(lq, work)
        tile = opts.tiled if opts.tiled is not None else max(lq.shape[-2:]) > opts.tile_size
        if tile:
            out = tiled_stage1(
                self.stage1,
                lq,
                opts.tile_size,
                opts.tile_size - opts.tile_stride,
                self.stage1_scale,
                self.stage1_multiple,
            )
        else:
            h, w = lq.shape[-2:]
            m = self.stage1_multiple
            out = self.stage1(_pad(lq, (math.ceil(h / m) * m, math.ceil(w / m) * m)))
            out = out[..., : h * self.stage1_scale, : w * self.stage1_scale]
        return _resize(out, work).to(dtype)

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[np.ndarray],
        opts: RestoreOptions | None = None,
        seeds: Sequence[int] | None = None,
        progress: Progress | None = None,
        captions: Sequence[Caption] | None = None,
    ) -> list[np.ndarray]:
        """Restore a batch: RGB float (H, W, 3) arrays in [0, 1] of any sizes -> restored arrays.
        Image i uses seed `seeds[i]` (default opts.seed + i), independent of its batch mates.
        `progress` hears of every sampling step. Image i's positive prompt is `captions[i]` (default:
        self.caption of the inputs) combined with opts.prompt."""
        opts = self.options(opts)
        captions = captions if captions is not None else self.caption(images, [opts] * len(images))
        prompts = [combine_prompt(c.text, opts.prompt) for c in captions]
        seeds = list(seeds) if seeds is not None else [(opts.seed + i) % 2**64 for i in range(len(images))]
        if opts.task == "unaligned_face":
            return self._restore_unaligned(images, opts, seeds, progress, captions)
        plans = [plan_sizes(im.shape[0], im.shape[1], opts.scale, opts.min_side) for im in images]
        canvases = [canvas_size(im.shape[0], im.shape[1], opts) for im in images]
        H, W = max(h for h, _ in canvases), max(w for _, w in canvases)  # the batch's common size
        clean = [self.run_stage1(self._tensor(im), work, opts) for im, (_, work) in zip(images, plans)]
        decoded = self._diffuse(torch.cat([_pad(c, (H, W)) for c in clean]), opts, seeds, prompts, progress)
        out = []
        for i, (size, work) in enumerate(plans):
            img = decoded[i : i + 1, :, : work[0], : work[1]]
            if opts.color_fix == "wavelet":
                img = wavelet_reconstruction(img, clean[i].float())
            out.append(_to_numpy(_resize(img, size)))
        return out

    def _restore_unaligned(
        self,
        images: Sequence[np.ndarray],
        opts: RestoreOptions,
        seeds: Sequence[int],
        progress: Progress | None,
        captions: Sequence[Caption],
    ) -> list[np.ndarray]:
        """Task unaligned_face, as the official v2.1: faces found on the input upscaled (bicubic) to the
        output size, aligned to 512², restored together as task `face` by the face pipeline; the
        background restored whole by the general path (tiled when large); the faces pasted back.
        Face k of image i samples with seed seeds[i] + 1 + k and image i's caption."""
        general = opts.model_copy(update=dict(task="sr", upscale=opts.scale, landmarks=None))
        face_opts = opts.model_copy(update=dict(task="face", upscale=1.0, min_side=FACE_SIZE, landmarks=None))
        crops, owners, matrices, face_seeds = [], [], [], []
        for i, im in enumerate(images):
            (oh, ow), _ = plan_sizes(im.shape[0], im.shape[1], opts.scale, opts.min_side)
            upscaled = np.clip(cv2.resize(im, (ow, oh), interpolation=cv2.INTER_CUBIC), 0, 1)
            if opts.landmarks is not None:
                points = check_landmarks(opts.landmarks, im.shape[0], im.shape[1])
                points = points * np.array([ow / im.shape[1], oh / im.shape[0]], np.float32)
            else:
                points = self.faces.detect(upscaled, opts.min_face_size, opts.max_faces)
            for k, landmarks in enumerate(points):
                matrices.append(align_matrix(landmarks))
                crops.append(warp_face(upscaled, matrices[-1]))
                owners.append(i)
                face_seeds.append((seeds[i] + 1 + k) % 2**64)
        size = self.faces.cfg.batch_size
        calls = math.ceil(len(crops) / size) + 1  # the face batches, then the background
        restored = []
        for n, start in enumerate(range(0, len(crops), size)):
            chunk = slice(start, start + size)
            heard = _progress_part(progress, n, calls)
            caps = [captions[i] for i in owners[chunk]]
            restored += self.face_pipeline(crops[chunk], face_opts, face_seeds[chunk], heard, caps)
        out = self(images, general, seeds, _progress_part(progress, calls - 1, calls), captions)
        for face, matrix, i, mask in zip(restored, matrices, owners, self.faces.parse_masks(restored)):
            out[i] = paste_face(out[i], face, matrix, mask)
        return out

    @torch.no_grad()
    def stage1_image(self, image: np.ndarray, opts: RestoreOptions) -> np.ndarray:
        """What stage 1 makes of `image` on its way through the pipeline (at the output size): the
        intermediate a contact sheet shows between the input and the final image."""
        size, work = plan_sizes(image.shape[0], image.shape[1], opts.scale, opts.min_side)
        return _to_numpy(_resize(self.run_stage1(self._tensor(image), work, opts), size))

    def caption(self, images: Sequence[np.ndarray], options: Sequence[RestoreOptions]) -> list[Caption]:
        """The captions of the low-quality inputs (as the official inference: before stage 1) whose
        options ask for one, in one captioner call; an empty Caption where none is asked for or
        there is no captioner. A failing captioner fails no image: its error is in the Caption."""
        captions = [Caption()] * len(images)
        wanted = [i for i, opts in enumerate(options) if opts.caption] if self.captioner else []
        for i, caption in zip(wanted, caption_batch(self.captioner, [images[i] for i in wanted])):
            captions[i] = caption
        return captions

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device, self.dtype)

    @staticmethod
    def canvas_groups(images: Sequence[np.ndarray], options: Sequence[RestoreOptions]) -> list[list[int]]:
        """Indices of the images that restore in one call: the same options but the seed, and the same
        working canvas (canvas_size), so no result depends on its batch mates. Groups in input order."""
        groups: dict[tuple, list[int]] = {}
        for i, (im, opts) in enumerate(zip(images, options, strict=True)):
            key = opts.model_dump_json(exclude={"seed"}), canvas_size(im.shape[0], im.shape[1], opts)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def restore_grouped(
        self,
        images: Sequence[np.ndarray],
        options: Sequence[RestoreOptions],
        progress: Callable[[list[int], int, int], None] | None = None,
        captions: Sequence[Caption] | None = None,
    ) -> list[np.ndarray | Exception]:
        """Restore images that each bring their own options and seed, one call per canvas group.
        One result per image, in order: the restored image, or the exception that failed its group.
        `progress(members, done, total)`: the sampling steps of the group of those indices.
        `captions` (default: self.caption of all the images, in one batch) lead their prompts."""
        results: list[np.ndarray | Exception] = [None] * len(images)  # type: ignore[list-item]
        captions = captions if captions is not None else self.caption(images, options)
        for members in self.canvas_groups(images, options):
            heard = functools.partial(progress, members) if progress else None
            try:
                batch = [images[i] for i in members]
                seeds = [options[i].seed for i in members]
                restored = self(batch, options[members[0]], seeds, heard, [captions[i] for i in members])
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory on a large canvas: the other groups go on
                restored = [e] * len(members)
            for i, image in zip(members, restored):
                results[i] = image
        return results

    def _diffuse(
        self,
        clean: torch.Tensor,
        opts: RestoreOptions,
        seeds: Sequence[int],
        prompts: Sequence[str],
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """Stage-1 images (N,3,H,W) in [0,1], H and W multiples of 64 -> decoded images, (x + 1) / 2
        unclamped (float32). Image i is prompted with prompts[i]."""
        cldm, n = self.cldm, clean.shape[0]
        tiled = opts.tiled if opts.tiled is not None else max(clean.shape[-2:]) > opts.tile_size
        latent_tile, latent_stride = opts.tile_size // 8, opts.tile_stride // 8
        image = clean * 2 - 1
        if tiled:  # condition_latent: v1 weights bring their own condition encoder
            c_img = tiled_apply(cldm.condition_latent, clean, opts.tile_size, opts.tile_size - opts.tile_stride, 1 / 8)
        else:
            c_img = cldm.condition_latent(clean)
        c_txt = torch.cat([self._context(prompt) for prompt in prompts])
        c_neg = self._context(opts.negative_prompt).expand(n, -1, -1)
        if tiled:
            model = cldm_tiled_denoiser(
                cldm,
                c_txt,
                c_img,
                latent_tile,
                latent_stride,
                opts.strength,
                uncond_txt=c_neg[:1] if opts.cfg_scale != 1 else None,
                cfg_scale=opts.cfg_scale,
                rescale_cfg=opts.rescale_cfg,
            )
        else:
            model = cfg_model(cldm, c_img, c_txt, c_neg, opts.cfg_scale, opts.strength, opts.rescale_cfg)
        den = Denoiser(model, self.diffusion(opts))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = per_image_noise(generators)
        # the sampler state and its arithmetic are float32 whatever the model's dtype (as the reference's
        # autocast): bf16 would round x (|x| up to ~1e4 at sigma_max) and fp16 could overflow
        start = c_img.float()
        x_T = initial_latent(den, noise(start, 0), start if opts.start_from == "condition" else None)
        hook = None
        if opts.guidance_scale > 0:
            hook = RestorationGuidance(
                cldm,
                image,
                opts.guidance_scale,
                space=opts.guidance_space,
                weighted=opts.guidance_weighted,
                repeat=opts.guidance_repeat,
                t_start=opts.guidance_start,
                t_stop=opts.guidance_stop,
                noise=noise,
                tiles=(latent_tile, latent_tile - latent_stride) if tiled else None,
            )
        heard = (lambda i, x: progress(i + 1, opts.steps)) if progress else None
        z = sample(den, x_T, opts.sampler, opts.steps, x0_hook=hook, noise=noise, callback=heard, edm=opts.edm)
        decoded = tiled_vae_decode(cldm, z, latent_tile, latent_tile - latent_stride) if tiled else cldm.vae_decode(z)
        return (decoded.float() + 1) / 2


def _progress_part(progress: Progress | None, part: int, parts: int) -> Progress | None:
    """`progress` told of one of `parts` equal runs of sampling steps as a share of them all."""
    if progress is None:
        return None
    return lambda done, total: progress(part * total + done, parts * total)


def name_seed(name: str, base: int) -> int:
    """The seed of the image called `name` (an archive member's path, a benchmark file's name): a
    function of the two only, so any run, batch or resume restores the image alike."""
    return (base + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")) % 2**32


def per_image_noise(generators: Sequence[torch.Generator]):
    """A NoiseFn drawing image i's noise from its own generator, in call order, so results do not
    depend on which images share a batch."""

    def draw(like: torch.Tensor, index: int) -> torch.Tensor:
        per = [torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators]
        return torch.stack(per).to(like.device, like.dtype)

    return draw


def _to_numpy(image: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) float32."""
    return image.clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()
