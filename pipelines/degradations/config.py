"""Typed configurations of the degradation models; defaults are the published values.

Each model's YAML file in pipelines/configs/degradations/ states the same values; its ``model``
key selects the class (``load_degradation``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from .kernels import KERNEL_TYPES, KernelType

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "degradations"


def _ordered(r: tuple) -> tuple:
    if r[0] > r[1]:
        raise ValueError(f"range {list(r)} must be [low, high] with low <= high")
    return r


def _odd_sizes(sizes: list[int]) -> list[int]:
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel sizes must be positive odd numbers, got {sizes}")
    return sizes


def _weights(p: tuple | list) -> tuple | list:
    if any(x < 0 for x in p) or sum(p) <= 0:
        raise ValueError(f"probabilities must be non-negative with a positive sum, got {list(p)}")
    return p


NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
PositiveRange = Annotated[tuple[Positive, Positive], AfterValidator(_ordered)]
NoiseRange = Annotated[tuple[NonNegative, NonNegative], AfterValidator(_ordered)]
Quality = Annotated[int, Field(ge=0, le=100)]
JpegRange = Annotated[tuple[Quality, Quality], AfterValidator(_ordered)]
KernelSizes = Annotated[list[int], AfterValidator(_odd_sizes)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class KernelConfig(_Config):
    """A random blur kernel (BasicSR's random_mixed_kernels, plus a sinc filter with sinc_prob).

    Defaults: the first Real-ESRGAN stage (Real-ESRGAN options/train_realesrgan_x4plus.yml).
    """

    sizes: KernelSizes = [7, 9, 11, 13, 15, 17, 19, 21]
    """Kernel sizes, one drawn uniformly."""
    kernel_list: list[KernelType] = list(KERNEL_TYPES)
    """Kernel types to draw from."""
    kernel_prob: Annotated[list[float], AfterValidator(_weights)] = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    """Probability of each type in kernel_list."""
    sigma_range: PositiveRange = (0.2, 3.0)
    """Standard deviation along each principal axis, pixels."""
    rotation_range: Range = (-math.pi, math.pi)
    """Rotation of anisotropic kernels, radians."""
    betag_range: PositiveRange = (0.5, 4.0)
    """Shape of generalized Gaussian kernels (1 = Gaussian)."""
    betap_range: PositiveRange = (1.0, 2.0)
    """Shape of plateau kernels."""
    sinc_prob: Probability = 0.1
    """Probability of a sinc kernel instead (cut-off in [pi/3, pi] below size 13, else [pi/5, pi])."""

    @model_validator(mode="after")
    def _one_prob_per_type(self) -> KernelConfig:
        if len(self.kernel_prob) != len(self.kernel_list):
            raise ValueError(f"kernel_prob has {len(self.kernel_prob)} entries, kernel_list {len(self.kernel_list)}")
        return self


def _gaussian_kernel_config(sigma_range: tuple[float, float]) -> KernelConfig:
    # DiffBIR/CodeFormer: one 41x41 kernel, isotropic or anisotropic Gaussian with equal odds
    return KernelConfig(
        sizes=[41], kernel_list=["iso", "aniso"], kernel_prob=[0.5, 0.5], sigma_range=sigma_range, sinc_prob=0.0
    )


class FirstOrderConfig(_Config):
    """DiffBIR's wide-range first-order model (paper Appendix 6.2, eq. 9):
    LQ = resize_back(JPEG_q(resize_down_r(HQ * k_sigma) + n_delta)), bilinear resizes.

    Defaults: XPixelGroup/DiffBIR configs/dataset/general_deg_codeformer_train.yaml.
    """

    model: Literal["first_order"] = "first_order"
    blur: KernelConfig = Field(default_factory=lambda: _gaussian_kernel_config((0.1, 12.0)))
    """Blur kernel: 41x41, iso/aniso Gaussian, sigma in [0.1, 12]."""
    downsample_range: PositiveRange = (1.0, 12.0)
    """Downsampling factor r; values below 1 upsample."""
    noise_range: NoiseRange = (0.0, 15.0)
    """Gaussian noise sigma on the 0-255 scale (colour noise)."""
    jpeg_range: JpegRange = (30, 100)
    """JPEG quality, integer, both ends included."""


class CodeFormerFaceConfig(FirstOrderConfig):
    """The first-order model with the face ranges DiffBIR trains its face model on
    (XPixelGroup/DiffBIR configs/dataset/face_train.yaml; GFPGAN's ranges, used by CodeFormer's
    FFHQ-blind dataset code): sigma [0.1, 10], r [0.8, 8], noise [0, 20], JPEG [60, 100].
    """

    model: Literal["codeformer_face"] = "codeformer_face"  # type: ignore[assignment]
    blur: KernelConfig = Field(default_factory=lambda: _gaussian_kernel_config((0.1, 10.0)))
    downsample_range: PositiveRange = (0.8, 8.0)
    noise_range: NoiseRange = (0.0, 20.0)
    jpeg_range: JpegRange = (60, 100)


class StageConfig(_Config):
    """One stage of the Real-ESRGAN model: blur, random resize, noise, JPEG.

    Defaults: the first stage of Real-ESRGAN options/train_realesrgan_x4plus.yml.
    """

    blur_prob: Probability = 1.0
    """Probability of blurring (second_blur_prob for stage 2)."""
    blur: KernelConfig = Field(default_factory=KernelConfig)
    resize_prob: Annotated[tuple[NonNegative, NonNegative, NonNegative], AfterValidator(_weights)] = (0.2, 0.7, 0.1)
    """Probabilities of resizing up, down, or keeping the size."""
    resize_range: PositiveRange = (0.15, 1.5)
    """Resize factor range: up draws from [1, high], down from [low, 1]."""
    gaussian_noise_prob: Probability = 0.5
    """Probability of Gaussian noise; Poisson noise otherwise."""
    noise_range: NoiseRange = (1.0, 30.0)
    """Gaussian noise sigma on the 0-255 scale."""
    poisson_scale_range: NoiseRange = (0.05, 3.0)
    """Poisson noise scale."""
    gray_noise_prob: Probability = 0.4
    """Probability that the noise is gray (shared by the channels)."""
    jpeg_range: JpegRange = (30, 95)
    """JPEG quality, integer, both ends included."""

    @model_validator(mode="after")
    def _range_brackets_one(self) -> StageConfig:
        if not self.resize_range[0] <= 1 <= self.resize_range[1]:
            raise ValueError(f"resize_range {list(self.resize_range)} must contain 1 (down from low, up to high)")
        return self


def _second_stage() -> StageConfig:
    return StageConfig(
        blur_prob=0.8,
        blur=KernelConfig(sigma_range=(0.2, 1.5)),
        resize_prob=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        noise_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )


class RealESRGANConfig(_Config):
    """Real-ESRGAN's second-order model (Wang et al. 2021; BasicSR RealESRGANModel).

    Two stages, then [resize to HQ/scale + sinc filter] and the second stage's JPEG in random
    order, then (DiffBIR) a bicubic resize back to the HQ size. Defaults: XPixelGroup/DiffBIR
    configs/train/train_stage2_v2.1.yaml (its RealESRGANDataset and RealESRGANBatchTransform
    parameters), the values of Real-ESRGAN options/train_realesrgan_x4plus.yml.
    """

    model: Literal["realesrgan"] = "realesrgan"
    stage1: StageConfig = Field(default_factory=StageConfig)
    stage2: StageConfig = Field(default_factory=_second_stage)
    final_sinc_prob: Probability = 0.8
    """Probability of the final sinc filter (cut-off in [pi/3, pi])."""
    final_sinc_sizes: KernelSizes = [7, 9, 11, 13, 15, 17, 19, 21]
    """Sizes of the final sinc kernel, one drawn uniformly."""
    scale: Positive = 4.0
    """The LQ is degraded down to HQ size / scale."""
    resize_back: bool = True
    """Resize the LQ back to the HQ size (bicubic), as DiffBIR feeds LQ at HQ resolution."""
    usm_sharpen: bool = True
    """Sharpen the ground truth first (BasicSR's USMSharp): the LQ is degraded from the sharpened
    HQ, which is also the training target (degrade_pair). Real-ESRGAN and DiffBIR v2.1's stage 2
    (use_sharpener: true); DiffBIR v2's general_deg_realesrgan_train.yaml has it off."""
    usm_weight: NonNegative = 0.5
    usm_radius: Annotated[int, Field(ge=1)] = 50
    usm_threshold: NonNegative = 10.0


DegradationConfig = Annotated[FirstOrderConfig | CodeFormerFaceConfig | RealESRGANConfig, Field(discriminator="model")]
_ADAPTER: TypeAdapter = TypeAdapter(DegradationConfig)


def load_degradation(source: str | Path) -> FirstOrderConfig | RealESRGANConfig:
    """Load a YAML file, or a bundled one by name: "first_order", "realesrgan", "codeformer_face"."""
    path = Path(source)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{source}.yaml"
    return _ADAPTER.validate_python(yaml.safe_load(path.read_text()))
