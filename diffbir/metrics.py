"""Image metrics, the one place they are computed: PSNR and SSIM under stated conventions, and the
learned metrics of the papers (LPIPS, DISTS, MUSIQ, MANIQA, CLIP-IQA, NIQE, FID) through pyiqa.

Restoration papers measure the same images in different ways, so every number here comes with a
`MetricConvention`:

- `space`: "rgb" (all three channels, SSIM averaged over them) or "y", the luma of ITU-R BT.601
  YCbCr as BasicSR computes it: Y = 16 + 65.481 R + 128.553 G + 24.966 B for R, G, B in [0, 1]
  (Y on [16, 235], not rounded), the usual convention of super-resolution papers.
- `crop`: pixels cut from each border before measuring (SR papers crop the scale factor).
- `uint8`: round the images to 8 bits first, as writing them to PNG would.

PSNR and SSIM are taken on the [0, 255] scale (data_range 255). SSIM is Wang et al. 2004's, as
restoration papers and BasicSR report it: an 11x11 Gaussian window with sigma 1.5 and population
covariances (scikit-image's `structural_similarity` with those settings).

`PLATFORM` (RGB, no crop, uint8 rounding) is the convention of the platform's own numbers:
training validation (training/train_rm.py, train_gm.py) and promotion (training/promote.py) both
use it, so the PSNR a training run logs is the PSNR promotion compares, and both are what the
restored images measure once written to disk.

Inputs are HxWxC arrays, float in [0, 1] or uint8 in [0, 255]; the two images of a pair must
have the same shape and kind. PSNR of identical images (after the convention's rounding and
crop) is `math.inf`, returned as is: a mean over a set that holds one is inf as well.

Learned metrics (`build_metric(name, config)` with pyiqa's names; `FID` for sets) are pyiqa's
networks with pyiqa's default options for each metric: the library the papers report with.
Nothing is fetched at run time. pyiqa's constructors download their weights and ImageNet or CLIP
backbones; here each network is built untrained (`learned_network`) and then filled strictly
(every key, every shape) from the local file `config.weights[name]`, read with safetensors or
`torch.load(weights_only=True)` (no code is unpickled). The files, by pyiqa's published names:

- lpips (AlexNet) and lpips-vgg, lower is better: LPIPS_v0.1_alex-df73285e.pth and
  LPIPS_v0.1_vgg-a78928a0.pth hold only the linear layers, and pyiqa adds torchvision's ImageNet
  AlexNet or VGG16 (IMAGENET1K_V1): the file here is the state dict of the whole network.
- dists, lower is better: DISTS_weights-f5e65c96.pth holds alpha and beta, the VGG16 is
  torchvision's: the file here is the state dict of the whole network.
- musiq (KonIQ-10k), higher is better: musiq_koniq_ckpt-e95806b9.pth as published.
- maniqa (KonIQ-10k), higher is better: ckpt_koniq10k.pt as published (its ViT-B/8 included).
- clipiqa, higher is better: OpenAI's CLIP RN50 (pyiqa's clipiqa has no other weights). OpenAI's
  RN50.pt is a TorchScript archive, which runs code and is not loaded here: save
  `torch.jit.load("RN50.pt", map_location="cpu").state_dict()` with safetensors.
- niqe, lower is better: niqe_modelparameters.mat as published (two arrays; scipy reads it).
- FID, lower is better: pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception).

A whole-network file is made once where pyiqa can download:
`safetensors.torch.save_model(pyiqa.create_metric("lpips", device="cpu").net, "lpips.safetensors")`
(save_model, as LPIPS registers its linear layers under two names), and likewise for "lpips-vgg",
"dists", and "clipiqa" (`.net.clip_model[0]`: the CLIP). A metric whose file is not configured,
missing, unreadable or not its network's raises MetricWeightsError naming the metric and the file.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import tempfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal
from unittest import mock

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffbir.checkpoints.io import CheckpointError, preview_keys, read_state_dict
from diffbir.image_io import write_image

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])  # BT.601 luma of [0, 1] RGB, scaled to [16, 235]
_WANG_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


class MetricConvention(BaseModel):
    """How a pair of images is measured (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: Literal["rgb", "y"] = Field("rgb", description="rgb: all channels; y: BT.601 luma (BasicSR)")
    crop: int = Field(0, ge=0, description="pixels cut from each border before measuring")
    uint8: bool = Field(True, description="round to 8 bits before measuring, as an image written to disk")


PLATFORM = MetricConvention()


def psnr(pred: np.ndarray, target: np.ndarray, convention: MetricConvention = PLATFORM) -> float:
    """PSNR in dB (inf for identical images)."""
    return _psnr(*_prepare(pred, target, convention))


def ssim(pred: np.ndarray, target: np.ndarray, convention: MetricConvention = PLATFORM) -> float:
    """SSIM (1 for identical images)."""
    return _ssim(*_prepare(pred, target, convention))


class Metric(ABC):
    """One image metric as evaluation, promotion and validation use it: batches of NCHW images in
    [0, 1] in, one score per image out. Full-reference metrics ("fr") need the target; no-reference
    ones ("nr") ignore it. `lower_is_better` gives the direction tables and gates compare in."""

    name: str
    kind: Literal["fr", "nr"]
    lower_is_better: bool

    @abstractmethod
    def __call__(self, pred: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) float64 scores of N images (N,3,H,W) in [0, 1] against `target` (same shape) or None."""


class MetricsConfig(BaseModel):
    """Which metrics to compute and where their weights lie (nothing is fetched at run time)."""

    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(default_factory=lambda: ["psnr", "ssim"], description="metrics to compute")
    convention: MetricConvention = Field(default_factory=MetricConvention, description="PSNR/SSIM convention")
    weights: dict[str, str] = Field(
        default_factory=dict,
        description="learned metric or fid -> local weights file (the module docstring says which)",
    )

    @field_validator("names")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        # at config time: a typo must not wait for the first build_metric, hours into a run
        if unknown := [n for n in names if n not in cls.known_names()]:
            fid = " (fid is a set metric: the evaluation job's, not a per-image one)" if "fid" in unknown else ""
            raise ValueError(
                f"unknown metric {', '.join(map(repr, unknown))}{fid}; known: {', '.join(cls.known_names())}"
            )
        return names

    @classmethod
    def known_names(cls) -> tuple[str, ...]:
        """What `names` may hold: the per-image metrics build_metric builds (a job that also
        computes set metrics, FID, extends it)."""
        return METRIC_NAMES


class _Classic(Metric):
    """PSNR or SSIM (scikit-image) under a convention, image by image."""

    def __init__(self, name: Literal["psnr", "ssim"], convention: MetricConvention):
        self.name, self.kind, self.lower_is_better = name, "fr", False
        self._fn, self._convention = (psnr if name == "psnr" else ssim), convention

    def __call__(self, pred: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        if target is None:
            raise ValueError(f"{self.name} is a full-reference metric: it needs the target images")
        hwc = [x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() for x in (pred, target)]
        return torch.tensor([self._fn(p, t, self._convention) for p, t in zip(*hwc)], dtype=torch.float64)


# learned metric (pyiqa's name) -> (kind, the file config.weights[name] must name: see the module docstring)
LEARNED_WEIGHTS: dict[str, tuple[Literal["fr", "nr"], str]] = {
    "lpips": ("fr", "the state dict of pyiqa's whole LPIPS-AlexNet (LPIPS_v0.1_alex-df73285e.pth + AlexNet)"),
    "lpips-vgg": ("fr", "the state dict of pyiqa's whole LPIPS-VGG (LPIPS_v0.1_vgg-a78928a0.pth + VGG16)"),
    "dists": ("fr", "the state dict of pyiqa's whole DISTS (DISTS_weights-f5e65c96.pth + VGG16)"),
    "musiq": ("nr", "musiq_koniq_ckpt-e95806b9.pth, pyiqa's MUSIQ (KonIQ-10k)"),
    "maniqa": ("nr", "ckpt_koniq10k.pt, pyiqa's MANIQA (KonIQ-10k)"),
    "clipiqa": ("nr", "the state dict of OpenAI's CLIP RN50 (RN50.pt converted to safetensors)"),
    "niqe": ("nr", "niqe_modelparameters.mat, NIQE's pristine-image model"),
}
FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth, the FID Inception of pytorch-fid"
METRIC_NAMES = ("psnr", "ssim", *LEARNED_WEIGHTS)  # every name build_metric builds (FID, a set metric: FID)


def build_metric(name: str, config: MetricsConfig | None = None, device: str | torch.device = "cpu") -> Metric:
    """The metric `name`, built once (a learned one loads its network from config.weights[name])."""
    config = config or MetricsConfig()
    if name in ("psnr", "ssim"):
        return _Classic(name, config.convention)
    if name in LEARNED_WEIGHTS:
        return _build_learned(name, config, device)
    raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)}")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    if np.array_equal(a, b):
        return math.inf  # explicit: skimage would divide by zero, with a RuntimeWarning
    return float(peak_signal_noise_ratio(b, a, data_range=255))


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(structural_similarity(b, a, data_range=255, channel_axis=2 if a.ndim == 3 else None, **_WANG_SSIM))


def _prepare(pred: np.ndarray, target: np.ndarray, convention: MetricConvention) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float64 on [0, 255] (RGB, or Y as HxW), rounded and cropped as the convention says."""
    if pred.shape != target.shape:
        raise ValueError(f"images differ in shape: {pred.shape} vs {target.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected HxWxC images, got shape {pred.shape}")
    if convention.space == "y" and pred.shape[2] != 3:
        raise ValueError(f"the y convention needs RGB images, got {pred.shape[2]} channels")
    if 2 * convention.crop >= min(pred.shape[:2]):
        raise ValueError(f"a border crop of {convention.crop} pixels leaves nothing of a {pred.shape[:2]} image")
    if pred.dtype == target.dtype == np.uint8:
        images = [x.astype(np.float64) for x in (pred, target)]
    elif np.issubdtype(pred.dtype, np.floating) and np.issubdtype(target.dtype, np.floating):
        for x in (pred, target):
            if not (x.min() >= 0 and x.max() <= 1):  # also false for NaN
                raise ValueError(f"float images must lie in [0, 1], got values in [{x.min()}, {x.max()}]")
        images = [x.astype(np.float64) * 255 for x in (pred, target)]
        if convention.uint8:
            images = [np.round(x) for x in images]
    else:
        raise ValueError(f"expected two uint8 or two float images, got {pred.dtype} and {target.dtype}")
    if c := convention.crop:
        images = [x[c:-c, c:-c] for x in images]
    if convention.space == "y":
        images = [16 + x @ _Y_WEIGHTS / 255 for x in images]
    return images[0], images[1]


# Learned metrics, through pyiqa (see "Learned metrics" in the module docstring). pyiqa is imported
# only when one is built: it takes seconds and brings timm, scipy and CLIP.


class MetricWeightsError(ValueError):
    """A learned metric's weights file is not configured, missing, unreadable or not its network's."""


class _Untrained:
    """Stands for torchvision.models or timm inside a pyiqa module while it builds a network: pyiqa
    asks them for ImageNet backbones whatever `pretrained` says (a download); the metric's own file
    sets every weight afterwards."""

    def __init__(self, module: object):
        self._module = module

    def __getattr__(self, name: str):
        build = getattr(self._module, name)
        return lambda *args, weights=None, pretrained=False, **kwargs: build(*args, **kwargs)


# OpenAI's CLIP RN50, the backbone of pyiqa's clipiqa (its dimensions, as clip_model.build_model reads them)
_CLIP_RN50 = dict(
    embed_dim=1024,
    image_resolution=224,
    vision_layers=(3, 4, 6, 3),
    vision_width=64,
    vision_patch_size=None,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=12,
)
_CLIP_SCALARS = ("input_resolution", "context_length", "vocab_size")  # in OpenAI's files; build_model drops them


def learned_network(name: str) -> torch.nn.Module:
    """The untrained network whose state dict is the weights file of learned metric `name` (or
    "fid"), built by pyiqa with the metric's default options and nothing fetched; in eval mode.
    Fill it with `load_state_dict` to check a file, or save a random one for tests. It swaps
    attributes of pyiqa's modules while building: build from one thread at a time."""
    if name == "clipiqa":
        from pyiqa.archs.clip_model import CLIP

        return CLIP(**_CLIP_RN50).eval()
    if name == "fid":
        from pyiqa.archs import inception

        with mock.patch.object(inception, "load_pretrained_network", lambda *_: None), warnings.catch_warnings():
            # pyiqa's `pretrained=False` to torchvision's inception_v3 is deprecated, and means what we want
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            return inception.fid_inception_v3().eval()
    if name not in _PYIQA_ARCHS:
        raise ValueError(f"no network file for {name!r}; networks: {', '.join([*_PYIQA_ARCHS, 'clipiqa', 'fid'])}")
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    opts = dict(DEFAULT_CONFIGS[name]["metric_opts"], pretrained=False)
    arch = importlib.import_module(f"pyiqa.archs.{_PYIQA_ARCHS[name]}")
    with contextlib.ExitStack() as stack:
        for backbones in ("models", "timm"):  # torchvision.models (LPIPS, DISTS), timm (MANIQA)
            if hasattr(arch, backbones):
                stack.enter_context(mock.patch.object(arch, backbones, _Untrained(getattr(arch, backbones))))
        return getattr(arch, opts.pop("type"))(**opts).eval()


_PYIQA_ARCHS = {
    "lpips": "lpips_arch",
    "lpips-vgg": "lpips_arch",
    "dists": "dists_arch",
    "musiq": "musiq_arch",
    "maniqa": "maniqa_arch",
}


class _Learned(Metric):
    """A pyiqa network, built once, scoring batches as pyiqa's InferenceModel does (no gradients,
    deterministic cuDNN), with pyiqa's own preprocessing inside the network: MUSIQ takes any size
    (its multi-scale patches); MANIQA averages 20 uniform 224x224 crops (images under 224 are
    upscaled first); CLIP-IQA, LPIPS and DISTS take the image as it is; NIQE reads 96x96 blocks."""

    def __init__(self, name: str, net: torch.nn.Module, device: str | torch.device):
        from pyiqa.default_model_configs import DEFAULT_CONFIGS

        self.name, self.kind = name, LEARNED_WEIGHTS[name][0]
        self.lower_is_better = DEFAULT_CONFIGS[name].get("lower_better", False)
        self._net, self._device = net.to(device), torch.device(device)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        inputs = [pred]
        if self.kind == "fr":
            if target is None:
                raise ValueError(f"{self.name} is a full-reference metric: it needs the target images")
            if target.shape != pred.shape:
                raise ValueError(f"{self.name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
            inputs.append(target)
        for x in inputs:
            if x.ndim != 4 or x.shape[1] != 3:
                raise ValueError(f"{self.name}: expected RGB batches (N,3,H,W), got {tuple(x.shape)}")
        if self.name == "niqe" and min(pred.shape[2:]) < 96:
            raise ValueError(f"niqe needs images of at least 96x96 pixels (its blocks), got {tuple(pred.shape[2:])}")
        inputs = [x.detach().float().clamp(0, 1).to(self._device) for x in inputs]
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
            return self._net(*inputs).reshape(-1).double().cpu()


def _build_learned(name: str, config: MetricsConfig, device: str | torch.device) -> Metric:
    path = _weights_file(name, config)
    if name == "niqe":
        from pyiqa.archs.niqe_arch import NIQE
        from scipy.io.matlab import MatReadError

        try:  # a MATLAB file of two arrays: scipy reads it without running anything
            return _Learned(name, NIQE(test_y_channel=True, pretrained_model_path=str(path)), device)
        except (MatReadError, ValueError, KeyError, OSError) as e:
            raise _weights_error(name, f"cannot read {path} ({type(e).__name__}: {e})") from e
    net = _load(learned_network(name), name, path)
    if name == "clipiqa":
        from pyiqa.archs import clipiqa_arch

        # pyiqa's CLIPIQA loads CLIP by name (a download); it gets this one instead
        with mock.patch.object(clipiqa_arch, "load", lambda *_: net):
            net = clipiqa_arch.CLIPIQA().eval()
    return _Learned(name, net, device)


def _weights_file(name: str, config: MetricsConfig) -> Path:
    if name not in config.weights:
        raise _weights_error(name, f"no weights file configured (metrics config: weights.{name})")
    path = Path(config.weights[name]).expanduser()
    if not path.is_file():
        raise _weights_error(name, f"weights file {path} not found")
    return path


def _weights_error(name: str, problem: str) -> MetricWeightsError:
    expected = LEARNED_WEIGHTS[name][1] if name in LEARNED_WEIGHTS else FID_WEIGHTS
    return MetricWeightsError(f"{name}: {problem}; it expects {expected} (see diffbir.metrics)")


def _load(net: torch.nn.Module, name: str, path: Path) -> torch.nn.Module:
    """`net` with every weight from `path` (safetensors or a torch pickle of tensors; nothing else
    is unpickled), key for key and shape for shape."""
    try:
        state = read_state_dict(path)
    except CheckpointError as e:
        raise _weights_error(name, str(e)) from e
    if name == "clipiqa":
        state = {k: v for k, v in state.items() if k not in _CLIP_SCALARS}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ
        raise _weights_error(name, f"{path} does not fit the network: {e}") from e
    # a module registered under two names (LPIPS's lin0 and lins.0) needs one of them in the file
    # (safetensors' save_model keeps one)
    own = net.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise _weights_error(
            name,
            f"{path} does not fit the network (missing: {preview_keys(missing) or '-'}; "
            f"unexpected: {preview_keys(unexpected) or '-'})",
        )
    return net


class FID:
    """Fréchet Inception Distance of a set of images to a reference folder (the paper's face
    benchmarks: restored faces against real faces), lower is better. pyiqa's FID, clean-fid's way:
    each image resized to 299x299 by PIL bicubic per channel, the FID Inception's 2048-d pool
    features, the Fréchet distance of their Gaussians. The network is built once, from
    config.weights["fid"] (FID_WEIGHTS), and a reference folder's statistics are computed once per
    instance. `images`: a folder (its images, recursively), a list of image files, or an NCHW batch
    in [0, 1], which is measured as the 8-bit PNGs it would be written as. Both sets need at least
    two images."""

    name, lower_is_better = "fid", True

    def __init__(self, config: MetricsConfig | None = None, device: str | torch.device = "cpu"):
        from pyiqa.archs import fid_arch, inception

        path = _weights_file("fid", config or MetricsConfig())  # before building the network: fail fast
        net = _load(learned_network("fid"), "fid", path)
        with mock.patch.object(inception, "fid_inception_v3", lambda: net):
            self._inception = fid_arch.FID(dims=2048).model.to(device)
        self._device = torch.device(device)
        self._references: dict[str, FeatureGaussian] = {}

    def __call__(self, images: str | Path | Sequence[str | Path] | torch.Tensor, reference: str | Path) -> float:
        key = str(Path(reference).resolve())
        if key not in self._references:
            self._references[key] = FeatureGaussian(self._features(reference))
        return frechet_distance(self._features(images), self._references[key])

    def _features(self, images: str | Path | Sequence[str | Path] | torch.Tensor) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            with tempfile.TemporaryDirectory() as folder:
                for i, img in enumerate(images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()):
                    write_image(Path(folder) / f"{i:06d}.png", img)
                return self._features(folder)
        if not isinstance(images, (str, Path)):  # files: measured as a folder of links to them
            with tempfile.TemporaryDirectory() as folder:
                for i, path in enumerate(map(Path, images)):
                    if not path.is_file():
                        raise ValueError(f"fid: {path} is not a file")
                    (Path(folder) / f"{i:06d}{path.suffix.lower()}").symlink_to(path.resolve())
                return self._features(folder)
        from pyiqa.archs.fid_arch import get_folder_features
        from pyiqa.utils.img_util import scandir_images

        if not Path(images).is_dir():
            raise ValueError(f"fid: {images} is not a folder")
        if (n := len(scandir_images(str(images)))) < 2:
            raise ValueError(f"fid: {images} holds {n} image(s); a covariance needs at least two")
        features = get_folder_features(
            str(images), self._inception, num_workers=0, device=self._device, mode="clean", verbose=False
        )
        return features.astype(np.float64)


class FeatureGaussian:
    """The Gaussian of a reference set's features (n x d): mean, covariance, and the root of the
    covariance, computed once a set larger than d is measured against it."""

    def __init__(self, features: np.ndarray):
        self.mu, self.sigma = features.mean(axis=0), np.cov(features, rowvar=False)

    @functools.cached_property
    def root(self) -> np.ndarray:
        w, v = np.linalg.eigh(self.sigma)
        return (v * np.sqrt(w.clip(0))) @ v.T


def frechet_distance(features: np.ndarray, reference: FeatureGaussian) -> float:
    """pyiqa's (clean-fid's) Fréchet distance ||mu - mu_r||^2 + Tr(S + S_r - 2 (S_r S)^1/2) of a set's
    features (n x d; S, their covariance) to a reference Gaussian. The trace of the root is taken
    from a symmetric eigenproblem: with X the centred features over sqrt(n - 1) (S = X^T X), the
    nonzero eigenvalues of S_r S are those of X S_r X^T (n x n) and of R S R (d x d, R = S_r^1/2), and
    the smaller one is solved. The same value as the scipy sqrtm of S_r S that pyiqa takes, faster,
    and real for the singular covariances of sets smaller than d (2048 for FID)."""
    n, d = features.shape
    mu = features.mean(axis=0)
    x = (features - mu) / np.sqrt(n - 1)
    m = x @ reference.sigma @ x.T if n <= d else reference.root @ (x.T @ x) @ reference.root
    tr_root = np.sqrt(np.linalg.eigvalsh(m).clip(0)).sum()
    return float(((mu - reference.mu) ** 2).sum() + (x**2).sum() + np.trace(reference.sigma) - 2 * tr_root)


def random_weights(name: str, folder: str | Path) -> Path:
    """A weights file of learned metric `name` (or "fid") with seeded random weights in its own
    network (learned_network), written into `folder`: what tests and benchmarks use where the
    published files cannot be had (the cost of a metric does not depend on its weights)."""
    import scipy.io
    from safetensors.torch import save_model

    folder = Path(folder)

    torch.manual_seed(0)
    if name == "niqe":  # a pristine-image model: a mean and a covariance of NIQE's 36 features
        rng = np.random.default_rng(0)
        a = rng.normal(size=(36, 36))
        path = folder / "niqe_modelparameters.mat"
        scipy.io.savemat(path, {"mu_prisparam": rng.normal(size=(1, 36)), "cov_prisparam": a @ a.T / 36 + np.eye(36)})
        return path
    net = learned_network(name)
    with torch.no_grad():
        if name.startswith("lpips"):
            for lin in net.lins:  # trained LPIPS weighs feature distances, never negatively
                lin.model[-1].weight.abs_()
        if name == "fid":  # torchvision's default init fades to nothing over Inception's depth
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight)
    path = folder / f"{name}.safetensors"
    save_model(net, str(path))  # save_model: LPIPS holds its linear layers under two names
    return path
