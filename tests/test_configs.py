"""Every shipped YAML under */configs/ loads into the model that reads it; a new YAML fails here
until MODELS names its model."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter
from ray.serve.schema import ServeDeploySchema

from pipelines.degradations import DegradationConfig, load_degradation
from pipelines.filter_laion import FilterLaionConfig
from serving.archive import ArchiveConfig
from serving.config import ServeConfig
from training.evaluate import EvalConfig
from training.promote import PromoteConfig
from training.train_gm import GMConfig
from training.train_rm import RMConfig

from conftest import infra_demo

ROOT = Path(__file__).resolve().parents[1]

# path pattern (from the repository root) -> the model its files load into
MODELS = {
    "infra/configs/demo.yaml": infra_demo().DemoConfig,
    "pipelines/configs/degradations/*.yaml": DegradationConfig,
    "pipelines/configs/filter_laion.yaml": FilterLaionConfig,
    "serving/configs/archive.yaml": ArchiveConfig,
    "serving/configs/serve.yaml": ServeConfig,
    "serving/configs/serve_deploy.yaml": ServeDeploySchema,
    "training/configs/degradation_tiny.yaml": DegradationConfig,
    "training/configs/eval_*.yaml": EvalConfig,
    "training/configs/gm_*.yaml": GMConfig,
    "training/configs/promote.yaml": PromoteConfig,
    "training/configs/rm_*.yaml": RMConfig,
}
# fields a file leaves to the command line (make restore-archive IN=... OUT=...)
FLAGS = {"serving/configs/archive.yaml": {"input": "in.tar", "output": "out.tar"}}
SHIPPED = sorted(str(p.relative_to(ROOT)) for ext in ("yaml", "yml") for p in ROOT.glob(f"*/configs/**/*.{ext}"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_loads_into_its_model(name, monkeypatch):
    (pattern,) = [p for p in MODELS if fnmatch(name, p)] or pytest.fail(f"{name}: register its model in MODELS")
    monkeypatch.chdir(ROOT)  # relative paths in the files are relative to the repository root
    data = yaml.safe_load((ROOT / name).read_text())
    TypeAdapter(MODELS[pattern]).validate_python({**data, **FLAGS.get(name, {})})


def test_every_registered_pattern_names_a_shipped_yaml():
    assert [p for p in MODELS if not any(fnmatch(name, p) for name in SHIPPED)] == []


# The official DiffBIR training values (XPixelGroup/DiffBIR; README "Degradation configs" lists
# each file, and every parameter the bundled configs set otherwise). Written out from the official
# files, not read from the code under test.
_DIFFBIR_KERNELS = ["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"]
OFFICIAL_DEGRADATIONS = {
    # configs/train/train_stage1.yaml, train_stage2.yaml: CodeformerDataset params
    "first_order": {
        "blur.sizes": [41],
        "blur.kernel_list": ["iso", "aniso"],
        "blur.kernel_prob": [0.5, 0.5],
        "blur.sigma_range": [0.1, 12],
        "downsample_range": [1, 12],
        "noise_range": [0, 15],
        "jpeg_range": [30, 100],
    },
    # configs/dataset/face_train.yaml
    "codeformer_face": {
        "blur.sizes": [41],
        "blur.kernel_list": ["iso", "aniso"],
        "blur.kernel_prob": [0.5, 0.5],
        "blur.sigma_range": [0.1, 10],
        "downsample_range": [0.8, 8],
        "noise_range": [0, 20],
        "jpeg_range": [60, 100],
    },
    # configs/train/train_stage2_v2.1.yaml: RealESRGANDataset + RealESRGANBatchTransform params;
    # kernel sizes 7..21 (kernel_range) and the final sinc sizes: diffbir/dataset/realesrgan.py
    "realesrgan": {
        "stage1.blur.sizes": [7, 9, 11, 13, 15, 17, 19, 21],
        "stage1.blur.kernel_list": _DIFFBIR_KERNELS,
        "stage1.blur.kernel_prob": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
        "stage1.blur.sinc_prob": 0.1,
        "stage1.blur.sigma_range": [0.2, 3],
        "stage1.blur.betag_range": [0.5, 4],
        "stage1.blur.betap_range": [1, 2],
        "stage1.resize_prob": [0.2, 0.7, 0.1],
        "stage1.resize_range": [0.15, 1.5],
        "stage1.gaussian_noise_prob": 0.5,
        "stage1.noise_range": [1, 30],
        "stage1.poisson_scale_range": [0.05, 3],
        "stage1.gray_noise_prob": 0.4,
        "stage1.jpeg_range": [30, 95],
        "stage2.blur_prob": 0.8,
        "stage2.blur.sizes": [7, 9, 11, 13, 15, 17, 19, 21],
        "stage2.blur.kernel_list": _DIFFBIR_KERNELS,
        "stage2.blur.kernel_prob": [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
        "stage2.blur.sinc_prob": 0.1,
        "stage2.blur.sigma_range": [0.2, 1.5],
        "stage2.blur.betag_range": [0.5, 4],
        "stage2.blur.betap_range": [1, 2],
        "stage2.resize_prob": [0.3, 0.4, 0.3],
        "stage2.resize_range": [0.3, 1.2],
        "stage2.gaussian_noise_prob": 0.5,
        "stage2.noise_range": [1, 25],
        "stage2.poisson_scale_range": [0.05, 2.5],
        "stage2.gray_noise_prob": 0.4,
        "stage2.jpeg_range": [30, 95],
        "final_sinc_prob": 0.8,
        "final_sinc_sizes": [7, 9, 11, 13, 15, 17, 19, 21],
        "scale": 4,  # stage2_scale
        "resize_back": True,  # "resize back to gt_size" whenever stage2_scale != 1
        "usm_sharpen": True,  # use_sharpener
        "usm_weight": 0.5,  # BasicSR USMSharp defaults
        "usm_radius": 50,
        "usm_threshold": 10,
    },
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_DEGRADATIONS))
def test_bundled_degradations_match_the_official_training_configs(name):
    config = load_degradation(name).model_dump()
    for key, official in OFFICIAL_DEGRADATIONS[name].items():
        value = config
        for part in key.split("."):
            value = value[part]
        assert (list(value) if isinstance(value, tuple) else value) == official, (name, key, value)
