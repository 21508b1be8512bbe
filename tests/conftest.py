"""Shared fixtures: the golden reference set (tests/golden/shared, or the one DIFFBIR_GOLDEN names),
its tiny weights, a real MLflow store, and helpers the test modules share."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests" / "golden" / "manifests"
TINY_FILES = ("sd21_tiny.safetensors", "ircontrolnet_tiny.safetensors", "swinir_tiny.safetensors")


def golden_dir() -> Path:
    return Path(os.environ.get("DIFFBIR_GOLDEN", ROOT / "tests" / "golden" / "shared"))


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if not (path / "set.json").is_file():
        pytest.fail(f"golden fixture set not found at {path} (set DIFFBIR_GOLDEN)")
    return path


@pytest.fixture(scope="session")
def golden_weights(golden, golden_set, tmp_path_factory) -> Path:
    """The set's tiny weight files: stored in the set, or re-created from its weights manifest by
    the key-based initialisation (bit-identical; test_checkpoints checks the sha256), plus the
    `{"state_dict": {"module." + key}}` pickle of the SwinIR weights the set describes."""
    stored = golden / "weights"
    if all((stored / name).is_file() for name in TINY_FILES):
        return stored
    from diffbir.checkpoints.io import read_state_dict
    from diffbir.checkpoints.tiny import write_keyed_files

    out = tmp_path_factory.mktemp("golden_weights")
    write_keyed_files(out, stored / "weights_manifest.json", golden_set["tiny_weights_init_salt"])
    swinir = read_state_dict(out / "swinir_tiny.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in swinir.items()}}, out / "swinir_tiny_statedict_module.ckpt")
    return out


@pytest.fixture(scope="session")
def golden_set(golden) -> dict:
    return json.loads((golden / "set.json").read_text())


@pytest.fixture(scope="session")
def tiny_configs(golden) -> dict:
    return json.loads((golden / "configs" / "tiny_configs.json").read_text())


@pytest.fixture(scope="session")
def full_configs(golden) -> dict:
    return json.loads((golden / "configs" / "full_configs.json").read_text())


@pytest.fixture(scope="session")
def fixture_index(golden) -> dict:
    return json.loads((golden / "fixtures" / "INDEX.json").read_text())


def load_fixture(golden: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(golden / "fixtures" / f"{name}.safetensors"))


def assert_close_golden(
    actual: torch.Tensor, golden: torch.Tensor, rtol: float, atol_rel: float, name: str = ""
) -> None:
    """The README's acceptance rule: |a - g| <= atol + rtol*|g|, atol = atol_rel * max|g|."""
    actual = actual.detach().to(torch.float64).cpu()
    golden = golden.to(torch.float64)
    assert actual.shape == golden.shape, f"{name}: shape {tuple(actual.shape)} != golden {tuple(golden.shape)}"
    atol = atol_rel * golden.abs().max().item()
    err = (actual - golden).abs()
    bound = atol + rtol * golden.abs()
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, (
        f"{name}: max |diff| {err.max().item():.3e} exceeds tolerance (worst diff/bound {worst:.3f}, "
        f"max|golden| {golden.abs().max().item():.3e})"
    )


# Real photos (scikit-image's bundled set), upscaled to a short side of at least 512 where smaller:
# the quality filter and dedup measure them and variants made from them.
def at_least_512(img: np.ndarray, side: int = 512) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    f = side / min(h, w)
    return img if f <= 1 else cv2.resize(img, (round(w * f), round(h * f)), interpolation=cv2.INTER_CUBIC)


PHOTOS = {
    name: at_least_512(load())
    for name, load in {
        "astronaut": data.astronaut,
        "chelsea": data.chelsea,
        "coffee": data.coffee,
        "rocket": data.rocket,
        "motorcycle_left": lambda: data.stereo_motorcycle()[0],
    }.items()
}


def encode(img: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    """uint8 RGB -> image file bytes (PIL: PNG, or fmt with its save options, e.g. quality)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kwargs)
    return buf.getvalue()


# Serving tests: the bearer token, and tiny work per request (64-pixel canvases, 2 steps).
TOKEN = "s3cret-token"
DEFAULTS = {"min_side": 64, "steps": 2, "cfg_scale": 1.0}

# Tolerances from the golden README, section 7.
SINGLE_EVAL = dict(rtol=1e-3, atol_rel=1e-4)
SAMPLING = dict(rtol=1e-2, atol_rel=1e-3)


# Analytic denoisers (test_samplers, test_edm): data whose clean latent given x_t is known in closed
# form, so every sampler's exact answer is too.
def analytic_model(cfg, x0_of):
    """The exact network output (eps or v) of the DiffusionConfig `cfg` when the clean latent is
    x0_of(x_t, alpha_bar)."""
    from diffbir.sampling import NoiseSchedule

    schedule = NoiseSchedule.from_config(cfg)

    def model(x_t, t):
        ab = schedule.alpha_bar(t).item()
        x0 = x0_of(x_t, ab)
        eps = (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        return eps if cfg.parameterization == "eps" else math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0

    return model


MU, S = 0.3, 0.5  # data: every element i.i.d. N(MU, S^2)


def gaussian_posterior_mean(x_t, ab):
    return MU + math.sqrt(ab) * S**2 / (ab * S**2 + 1 - ab) * (x_t - math.sqrt(ab) * MU)


def gaussian_ode_solution(x_T, ab_T):
    """The probability-flow ODE keeps (x_ve - MU) / sqrt(S^2 + sigma^2) constant (x_ve = x / sqrt(ab))."""
    if ab_T == 0:
        return MU + S * x_T
    return MU + (x_T / math.sqrt(ab_T) - MU) * S / math.sqrt(S**2 + (1 - ab_T) / ab_T)


def full_key_shapes(golden: Path, layout: str) -> dict[str, list[int]]:
    """{key: shape} of one released-file layout in the set's configs/full_keys.json; `layout` is
    the first word of the file entry (sd21, ircontrolnet, swinir)."""
    files = json.loads((golden / "configs" / "full_keys.json").read_text())["files"]
    (entry,) = [v for k, v in files.items() if k.split()[0] == layout]
    return {key: shape for key, (shape, _dtype) in entry.items()}


def manifest_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A state dict with exactly the keys, shapes and dtypes of a reference manifest. Values are
    uninitialised (torch.empty touches no memory), which is all a layout test needs."""
    keys = json.loads((MANIFESTS / name).read_text())["keys"]
    return {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"])) for k, v in keys.items()}


@pytest.fixture(scope="session")
def tiny_bundle(golden_weights, tiny_configs):
    """The set's tiny reference weights (SD 2.1 UNet+VAE, IRControlNet, SwinIR) loaded through
    the official-layout converters."""
    from diffbir.checkpoints.loading import load_model

    heads = tiny_configs["cldm"]["params"]["unet_cfg"]["num_head_channels"]
    return load_model([golden_weights / name for name in TINY_FILES], num_head_channels=heads)


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_session_end():
    """Test modules share one local Ray (starting it costs seconds); stop it once at the end."""
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def kill_when_a_shard_is_done(proc, shard_dir: Path, timeout: float) -> None:
    """SIGKILL the download running in `proc` (a driver joined to this test's Ray) as soon as
    `shard_dir` holds a finished shard, then wait until the killed driver's tasks are gone."""
    import time

    import ray

    try:
        deadline = time.monotonic() + timeout
        while not list(shard_dir.glob("*_stats.json")):
            assert proc.poll() is None, "the run ended before a download shard was finished"
            assert time.monotonic() < deadline, "no download shard finished in time"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)


# ---- learned metrics: weight files of random weights (test_metrics, test_evaluate)


# ---- registry: a real MLflow store and tiny platform models (test_registry, test_promote, serving)


def save_tiny(out_dir: Path, bundle, noise: float = 0.0, parts: list[str] | None = None) -> Path:
    """The tiny reference model (or some of its `parts`) as a platform directory; `noise` > 0
    perturbs the SwinIR weights (seeded), which makes a worse stage 1."""
    from diffbir.checkpoints.platform import save_model_dir

    parts = {name: (p.module, p.config) for name, p in bundle.parts.items() if parts is None or name in parts}
    if noise:
        import copy

        swinir = copy.deepcopy(bundle.parts["swinir"].module)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in swinir.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
        parts["swinir"] = (swinir, bundle.parts["swinir"].config)
    save_model_dir(out_dir, parts, diffusion=bundle.diffusion)
    return out_dir


def new_run() -> str:
    """A finished training run to hang versions on."""
    from mlflow import MlflowClient

    from training import registry

    client = MlflowClient()
    run = client.create_run(registry.experiment_id("diffbir-tests"))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@functools.cache
def script_module(path: str):
    """A script of the repository that is in no package (infra/demo.py, benchmarks/*.py), as a module."""
    spec = importlib.util.spec_from_file_location(path.removesuffix(".py").replace("/", "."), ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the annotations of its configs there
    spec.loader.exec_module(module)
    return module


def infra_demo():
    """infra/demo.py, `make demo`'s script."""
    return script_module("infra/demo.py")


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A fresh local store (SQLite + artifact dir) and model cache, for one test module."""
    import mlflow

    from training import registry

    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv(registry.CACHE_ENV, str(root / "cache"))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        registry.configure(root / "store")
        yield root
        mlflow.set_tracking_uri(None)  # also clears the MLFLOW_TRACKING_URI that MLflow exported
