"""Synthetic degradations for training DiffBIR: HQ image -> (LQ image, params).

Models (typed configs, YAML in pipelines/configs/degradations/):
- FirstOrderConfig: DiffBIR's wide-range first-order model (blur, downsample, noise, JPEG, resize back);
- CodeFormerFaceConfig: the same with DiffBIR's face ranges;
- RealESRGANConfig: Real-ESRGAN's second-order model, resized back to the HQ size.

    lq, params = degrade(hq, seed, load_degradation("realesrgan"))
    target, lq, params = degrade_pair(hq, seed, load_degradation("realesrgan"))  # training: sharpened GT

Images are HWC RGB: uint8 [0, 255] or float [0, 1] in, the same kind out (float as float32);
the operations work on float32 [0, 1]. params is JSON-able; apply_params(hq, params) replays it.
"""

from .config import (
    CONFIG_DIR,
    CodeFormerFaceConfig,
    DegradationConfig,
    FirstOrderConfig,
    KernelConfig,
    RealESRGANConfig,
    StageConfig,
    load_degradation,
)
from .kernels import (
    KERNEL_TYPES,
    gaussian_kernel,
    generalized_kernel,
    make_kernel,
    plateau_kernel,
    sample_mixed_kernel,
    sample_sinc_kernel,
    sinc_kernel,
)
from .models import (
    OPS,
    apply_ops,
    apply_params,
    degrade,
    degrade_pair,
    sample_first_order,
    sample_kernel,
    sample_params,
    sample_realesrgan,
)
from .ops import (
    INTERPOLATIONS,
    add_gaussian_noise,
    add_poisson_noise,
    blur,
    encode_jpeg,
    filter2d,
    from_float,
    gaussian_blur,
    jpeg,
    quantize,
    resize,
    to_float_rgb,
    usm_sharp,
)

__all__ = [
    "CONFIG_DIR",
    "CodeFormerFaceConfig",
    "DegradationConfig",
    "FirstOrderConfig",
    "KernelConfig",
    "RealESRGANConfig",
    "StageConfig",
    "load_degradation",
    "KERNEL_TYPES",
    "gaussian_kernel",
    "generalized_kernel",
    "make_kernel",
    "plateau_kernel",
    "sample_mixed_kernel",
    "sample_sinc_kernel",
    "sinc_kernel",
    "OPS",
    "apply_ops",
    "apply_params",
    "degrade",
    "degrade_pair",
    "sample_first_order",
    "sample_kernel",
    "sample_params",
    "sample_realesrgan",
    "INTERPOLATIONS",
    "add_gaussian_noise",
    "add_poisson_noise",
    "blur",
    "encode_jpeg",
    "filter2d",
    "from_float",
    "gaussian_blur",
    "jpeg",
    "quantize",
    "resize",
    "to_float_rgb",
    "usm_sharp",
]
