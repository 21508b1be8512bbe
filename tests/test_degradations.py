"""pipelines.degradations: kernels, operations, the three models, configs, input checks."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data

from pipelines.degradations import (
    KERNEL_TYPES,
    CodeFormerFaceConfig,
    FirstOrderConfig,
    KernelConfig,
    RealESRGANConfig,
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    apply_params,
    blur,
    degrade,
    degrade_pair,
    encode_jpeg,
    filter2d,
    from_float,
    gaussian_blur,
    gaussian_kernel,
    generalized_kernel,
    jpeg,
    load_degradation,
    make_kernel,
    plateau_kernel,
    resize,
    sample_params,
    sinc_kernel,
    usm_sharp,
)
from pipelines.degradations.ops import to_uint8

CONFIGS = {"first_order": FirstOrderConfig, "codeformer_face": CodeFormerFaceConfig, "realesrgan": RealESRGANConfig}
SPECS = [
    {"type": "iso", "size": 21, "sigma_x": 2.0, "sigma_y": 2.0, "theta": 0.0},
    {"type": "aniso", "size": 21, "sigma_x": 3.0, "sigma_y": 0.7, "theta": 0.6},
    {"type": "generalized_iso", "size": 15, "sigma_x": 1.5, "sigma_y": 1.5, "theta": 0.0, "beta": 0.6},
    {"type": "generalized_aniso", "size": 15, "sigma_x": 2.5, "sigma_y": 1.0, "theta": -1.0, "beta": 3.0},
    {"type": "plateau_iso", "size": 13, "sigma_x": 1.2, "sigma_y": 1.2, "theta": 0.0, "beta": 1.5},
    {"type": "plateau_aniso", "size": 21, "sigma_x": 2.0, "sigma_y": 0.5, "theta": 2.0, "beta": 1.0},
    {"type": "sinc", "size": 21, "cutoff": math.pi / 4},
]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return data.astronaut().astype(np.float32) / 255


def laplacian_var(img: np.ndarray) -> float:
    return float(cv2.Laplacian(img.mean(axis=2), cv2.CV_32F).var())


def in_range(x: float, r) -> bool:
    return r[0] <= x <= r[1]


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["type"])
def test_kernels_sum_to_one_and_blur(spec, photo):
    k = make_kernel(spec)
    assert k.shape == (spec["size"],) * 2
    assert abs(k.sum() - 1) < 1e-12
    assert laplacian_var(blur(photo, spec)) < 0.5 * laplacian_var(photo)


def test_gaussian_kernel_covariance_and_orientation():
    # second moments of a wide-support kernel are the covariance R diag(sx^2, sy^2) R^T
    sx, sy, theta = 4.0, 2.0, 0.5
    k = gaussian_kernel(41, sx, sy, theta)
    y, x = np.mgrid[-20:21, -20:21]
    moments = np.array([[(k * x * x).sum(), (k * x * y).sum()], [(k * x * y).sum(), (k * y * y).sum()]])
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    np.testing.assert_allclose(moments, rot @ np.diag([sx**2, sy**2]) @ rot.T, atol=1e-3)
    # theta = 0: sigma_x runs along the columns (x)
    k0 = gaussian_kernel(21, 3.0, 1.0, 0.0)
    assert k0[10, 14] > k0[14, 10]


def test_generalized_kernel_beta_one_is_gaussian():
    # BasicSR/Real-ESRGAN write exp(-1/2 (x^T S^-1 x)^beta): beta = 1 (not 2) is the Gaussian
    for sx, sy, theta in [(2.0, 2.0, 0.0), (3.0, 0.8, 0.7)]:
        expected = gaussian_kernel(21, sx, sy, theta)
        np.testing.assert_allclose(generalized_kernel(21, sx, sy, theta, 1.0), expected, atol=1e-15)
    assert not np.allclose(generalized_kernel(21, 2.0, 2.0, 0.0, 2.0), gaussian_kernel(21, 2.0, 2.0, 0.0))


def test_plateau_kernel_shape():
    sigma, beta = 2.0, 2.0
    k = plateau_kernel(21, sigma, sigma, 0.0, beta)
    y, x = np.mgrid[-10:11, -10:11]
    np.testing.assert_allclose(k / k[10, 10], 1 / (1 + ((x**2 + y**2) / sigma**2) ** beta), rtol=1e-12)
    g = gaussian_kernel(21, sigma, sigma, 0.0)
    assert k[10, 11] / k[10, 10] > g[10, 11] / g[10, 10]  # flatter top than the Gaussian
    row = k[10, 10:]
    assert np.all(np.diff(row) < 0)  # decreasing away from the centre


def test_sinc_kernel_is_low_pass():
    k = sinc_kernel(21, math.pi / 2)
    assert abs(k.sum() - 1) < 1e-12
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)
    response = np.abs(np.fft.fft2(k, s=(256, 256)))[0]  # along the x frequency axis
    assert response[0] == pytest.approx(1.0)
    assert response[32] > 0.85  # 0.25 pi: passed
    assert response[96:129].max() < 0.05  # above 0.75 pi: stopped


# ---------------------------------------------------------------- operations


def test_gaussian_blur_separable_path_matches_full_kernel(photo):
    fast = gaussian_blur(photo, 2.5, 2.5, 0.0, 21)
    full = filter2d(photo, gaussian_kernel(21, 2.5, 2.5, 0.0))
    assert np.abs(fast - full).max() < 1e-5
    assert laplacian_var(gaussian_blur(photo, 3.0, 0.5, 1.0, 21)) < laplacian_var(photo)


def test_negligible_taps_are_dropped_without_changing_the_result(photo):
    # small sigmas: the 41x41 kernels are cropped to their non-negligible support (denormal tails)
    for spec in [
        {"type": "aniso", "size": 41, "sigma_x": 0.4, "sigma_y": 1.5, "theta": 0.3},
        {"type": "generalized_aniso", "size": 21, "sigma_x": 0.3, "sigma_y": 0.8, "theta": 2.0, "beta": 2.0},
        {"type": "iso", "size": 41, "sigma_x": 0.7, "sigma_y": 0.7, "theta": 0.0},
    ]:
        full = cv2.filter2D(photo, -1, make_kernel(spec).astype(np.float32), borderType=cv2.BORDER_REFLECT_101)
        assert np.abs(blur(photo, spec) - full).max() < 1e-6


def test_to_uint8_rounds_and_saturates():
    x = np.concatenate([np.arange(-8, 1032) / 1020, [0.5 / 255, 1.5 / 255, 254.5 / 255]]).astype(np.float32)
    x = np.repeat(x[None, :, None], 3, axis=2)
    np.testing.assert_array_equal(to_uint8(x), np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))


def test_gaussian_noise_std():
    img = np.full((256, 256, 3), 0.5, np.float32)
    out = add_gaussian_noise(img, 10.0, False, 0)
    noise = (out - img) * 255
    assert noise.std() == pytest.approx(10.0, rel=0.02)
    assert abs(noise.mean()) < 0.1
    assert not np.array_equal(noise[..., 0], noise[..., 1])
    gray = add_gaussian_noise(img, 10.0, True, 0)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    seeded = add_gaussian_noise(img, 5.0, False, 7)
    np.testing.assert_array_equal(seeded, add_gaussian_noise(img, 5.0, False, np.random.default_rng(7)))


def test_poisson_noise_variance():
    # 128 levels -> 128 counts per unit: Var[noise] = scale^2 * src / 128; no clipping below 0.75
    ramp = np.tile(np.repeat(np.arange(128, dtype=np.float32), 2) / 255, (400, 1))
    img = np.repeat(ramp[..., None], 3, axis=2)
    scale = 2.0
    noise = add_poisson_noise(img, scale, False, 3) - img
    assert abs(noise.mean()) < 1e-3
    assert (noise**2).mean() == pytest.approx(scale**2 * img.mean() / 128, rel=0.03)
    gray = add_poisson_noise(img, scale, True, 3)
    assert np.array_equal(gray[..., 0], gray[..., 2])


def test_jpeg_blockiness_and_size(photo):
    def blockiness(x):  # horizontal gradient at 8x8 block boundaries relative to elsewhere
        g = np.abs(np.diff(x.mean(axis=2), axis=1))
        return g[:, 7::8].mean() / np.delete(g, np.s_[7::8], axis=1).mean()

    low, high = jpeg(photo, 30), jpeg(photo, 95)
    assert low.dtype == np.float32 and low.shape == photo.shape and 0 <= low.min() and low.max() <= 1
    assert blockiness(low) > 1.25 > 1.1 > blockiness(high)
    assert len(encode_jpeg(photo, 30)) < len(encode_jpeg(photo, 95))


def test_resize(photo):
    for mode in ("area", "bilinear", "bicubic"):
        small = resize(photo, (100, 150), mode)
        assert small.shape == (100, 150, 3)
        assert resize(small, photo.shape[:2], mode).shape == photo.shape
    assert resize(photo, photo.shape[:2], "bicubic") is photo


def test_usm_sharp(photo):
    sharp = usm_sharp(photo)
    assert sharp.shape == photo.shape and 0 <= sharp.min() and sharp.max() <= 1
    assert laplacian_var(sharp) > laplacian_var(photo)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("name", CONFIGS)
def test_degrade_is_deterministic(name, photo):
    cfg = load_degradation(name)
    crop = photo[100:292, 150:342]
    lq, params = degrade(crop, 123, cfg)
    lq2, params2 = degrade(crop, np.random.default_rng(123), cfg)
    assert np.array_equal(lq, lq2) and params == params2
    assert not np.array_equal(lq, degrade(crop, 124, cfg)[0])
    # uint8 input gives the rounded float result
    u8 = (crop * 255).round().astype(np.uint8)
    assert np.array_equal(degrade(u8, 5, cfg)[0], from_float(degrade(u8.astype(np.float32) / 255, 5, cfg)[0], np.uint8))


@pytest.mark.parametrize("name", CONFIGS)
def test_params_replay_after_json(name, photo):
    crop = photo[:160, :200]
    lq, params = degrade(crop, 9, load_degradation(name))
    assert np.array_equal(apply_params(crop, json.loads(json.dumps(params))), lq)


def test_first_order_params_are_what_was_applied(photo):
    lq, p = degrade(photo, 11)
    k, down, noise, q, back = p["ops"]
    img = blur(photo, k["kernel"])
    img = resize(img, down["size"], "bilinear")
    img = add_gaussian_noise(img, noise["sigma"], False, noise["seed"])
    img = jpeg(img, q["quality"])
    img = resize(img, back["size"], "bilinear")
    assert np.array_equal(img, lq)


@pytest.mark.parametrize("name", ["first_order", "codeformer_face"])
def test_first_order_params_in_range(name):
    cfg: FirstOrderConfig = CONFIGS[name]()
    h, w = 512, 384
    types = set()
    for seed in range(200):
        p = sample_params(cfg, (h, w), seed)
        kernel, down, noise, q, back = p["ops"]
        k = kernel["kernel"]
        types.add(k["type"])
        assert k["type"] in ("iso", "aniso") and k["size"] == 41
        assert in_range(k["sigma_x"], cfg.blur.sigma_range) and in_range(k["sigma_y"], cfg.blur.sigma_range)
        assert in_range(k["theta"], (-math.pi, math.pi))
        assert k["type"] == "aniso" or (k["sigma_x"] == k["sigma_y"] and k["theta"] == 0)
        r = p["downsample"]
        assert in_range(r, cfg.downsample_range) and down["size"] == [int(h // r), int(w // r)]
        assert noise["op"] == "gaussian_noise" and in_range(noise["sigma"], cfg.noise_range) and not noise["gray"]
        assert in_range(q["quality"], cfg.jpeg_range) and isinstance(q["quality"], int)
        assert back == {"op": "resize", "size": [h, w], "interpolation": "bilinear"}
    assert types == {"iso", "aniso"}


def _check_kernel(spec: dict, cfg: KernelConfig, seen: set) -> None:
    seen.add(spec["type"])
    if spec["type"] == "sinc":
        low = math.pi / 3 if spec["size"] < 13 else math.pi / 5
        assert spec["size"] in cfg.sizes and in_range(spec["cutoff"], (low, math.pi))
        return
    assert spec["type"] in cfg.kernel_list and spec["size"] in cfg.sizes
    assert in_range(spec["sigma_x"], cfg.sigma_range) and in_range(spec["sigma_y"], cfg.sigma_range)
    assert in_range(spec["theta"], cfg.rotation_range)
    if "beta" in spec:
        assert in_range(spec["beta"], cfg.betag_range if spec["type"].startswith("generalized") else cfg.betap_range)


def _check_noise(op: dict, cfg: StageConfig) -> None:
    if op["op"] == "gaussian_noise":
        assert in_range(op["sigma"], cfg.noise_range)
    else:
        assert op["op"] == "poisson_noise" and in_range(op["scale"], cfg.poisson_scale_range)


def test_realesrgan_params_in_range():
    cfg = RealESRGANConfig()
    h, w = 512, 384
    lq_size = [h // 4, w // 4]
    seen: dict[str, set] = {"kernels": set(), "modes": set(), "orders": set()}
    counts = {"blur2": 0, "sinc": 0, "gaussian": 0, "gray": 0}
    n = 200
    for seed in range(n):
        ops = sample_params(cfg, (h, w), seed)["ops"]
        sharpen, blur1, resize1, noise1, jpeg1, *rest = ops
        assert sharpen == {"op": "usm_sharp", "weight": 0.5, "radius": 50, "threshold": 10.0}  # v2.1's use_sharpener
        _check_kernel(blur1["kernel"], cfg.stage1.blur, seen["kernels"])
        lo, hi = cfg.stage1.resize_range
        assert int(h * lo) <= resize1["size"][0] <= int(h * hi)
        _check_noise(noise1, cfg.stage1)
        assert in_range(jpeg1["quality"], cfg.stage1.jpeg_range)
        if rest[0]["op"] == "blur":
            counts["blur2"] += 1
            _check_kernel(rest.pop(0)["kernel"], cfg.stage2.blur, seen["kernels"])
        resize2, noise2, *final, back, last = rest
        lo, hi = cfg.stage2.resize_range
        assert int(lq_size[0] * lo) <= resize2["size"][0] <= int(lq_size[0] * hi)
        _check_noise(noise2, cfg.stage2)
        counts["gaussian"] += (noise1["op"] == "gaussian_noise") + (noise2["op"] == "gaussian_noise")
        counts["gray"] += noise1["gray"] + noise2["gray"]
        ops_final = [op["op"] for op in final]
        seen["orders"].add(ops_final[0])
        orders = (["resize", "jpeg"], ["resize", "blur", "jpeg"], ["jpeg", "resize"], ["jpeg", "resize", "blur"])
        assert ops_final in orders
        for op in final:
            if op["op"] == "resize":
                assert op["size"] == lq_size
            elif op["op"] == "blur":
                counts["sinc"] += 1
                assert op["kernel"]["type"] == "sinc" and in_range(op["kernel"]["cutoff"], (math.pi / 3, math.pi))
            else:
                assert in_range(op["quality"], cfg.stage2.jpeg_range)
        seen["modes"].update(op["interpolation"] for op in (resize1, resize2))
        assert back == {"op": "resize", "size": [h, w], "interpolation": "bicubic"} and last == {"op": "quantize"}
    assert seen["kernels"] == set(KERNEL_TYPES) | {"sinc"}
    assert seen["modes"] == {"area", "bilinear", "bicubic"} and seen["orders"] == {"resize", "jpeg"}
    assert abs(counts["blur2"] / n - 0.8) < 0.1 and abs(counts["sinc"] / n - 0.8) < 0.1
    assert abs(counts["gaussian"] / (2 * n) - 0.5) < 0.1 and abs(counts["gray"] / (2 * n) - 0.4) < 0.1


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("photo_name", ["astronaut", "chelsea", "coffee"])
def test_real_photos_keep_shape_dtype_range(name, photo_name):
    img = getattr(data, photo_name)()
    cfg = load_degradation(name)
    lq, params = degrade(img, 0, cfg)
    assert lq.shape == img.shape and lq.dtype == np.uint8
    json.dumps(params)
    lq, _ = degrade(img.astype(np.float32) / 255, 1, cfg)
    assert lq.shape == img.shape and lq.dtype == np.float32
    assert np.isfinite(lq).all() and 0 <= lq.min() and lq.max() <= 1


def test_realesrgan_options(photo):
    lq, params = degrade(photo, 0, RealESRGANConfig(resize_back=False))
    assert lq.shape == (128, 128, 3)
    lq, params = degrade(photo, 0, RealESRGANConfig(usm_sharpen=False))
    assert "usm_sharp" not in {op["op"] for op in params["ops"]}


@pytest.mark.parametrize("sharpen", [True, False])
def test_degrade_pair_targets_the_sharpened_hq(photo, sharpen):
    """The training target is the image the LQ was degraded from: the USM-sharpened HQ when the
    config sharpens (Real-ESRGAN, DiffBIR v2.1), else the HQ itself."""
    cfg = RealESRGANConfig(usm_sharpen=sharpen)
    target, lq, params = degrade_pair(photo, 5, cfg)
    assert np.array_equal(lq, degrade(photo, 5, cfg)[0]) and params == degrade(photo, 5, cfg)[1]
    assert np.array_equal(target, usm_sharp(photo) if sharpen else photo)
    assert (laplacian_var(target) > laplacian_var(photo)) == sharpen


@pytest.mark.parametrize("name", CONFIGS)
def test_tiny_and_grayscale_inputs(name):
    cfg = load_degradation(name)
    assert degrade(np.full((8, 8, 3), 128, np.uint8), 0, cfg)[0].shape == (8, 8, 3)
    gray = data.camera()[:64, :96]
    assert degrade(gray, 0, cfg)[0].shape == (64, 96, 3)
    assert degrade(gray[..., None], 0, cfg)[0].shape == (64, 96, 3)


# ---------------------------------------------------------------- configs and input checks


@pytest.mark.parametrize("name", CONFIGS)
def test_bundled_names_load_their_model(name):
    assert type(load_degradation(name)) is CONFIGS[name]


def test_config_validation(tmp_path):
    with pytest.raises(ValidationError, match="extra"):
        FirstOrderConfig(noise_sigma=3)
    with pytest.raises(ValidationError, match="low <= high"):
        FirstOrderConfig(jpeg_range=(90, 30))
    with pytest.raises(ValidationError):
        FirstOrderConfig(jpeg_range=(30, 120))
    with pytest.raises(ValidationError, match="odd"):
        KernelConfig(sizes=[8])
    with pytest.raises(ValidationError, match="kernel_prob"):
        KernelConfig(kernel_list=["iso"], kernel_prob=[0.5, 0.5])
    with pytest.raises(ValidationError, match="contain 1"):
        StageConfig(resize_range=(0.2, 0.9))
    path = tmp_path / "bad.yaml"
    path.write_text("model: realesrgan\nstage1:\n  blur_probability: 1.0\n")
    with pytest.raises(ValidationError, match="blur_probability"):
        load_degradation(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros(10, np.uint8), "HxWx3"),
        (np.zeros((2, 8, 8, 3), np.uint8), "HxWx3"),
        (np.zeros((0, 8, 3), np.uint8), "empty"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8, 3), np.inf, np.float32), "NaN or infinite"),
        (np.full((8, 8, 3), 255.0, np.float32), r"\[0, 1\]"),
        (np.zeros((8, 8, 4), np.uint8), "RGBA"),
        (np.zeros((8, 8, 2), np.uint8), "channels"),
        (np.zeros((8, 8, 3), np.int16), "uint8 or float"),
    ],
)
def test_bad_input_raises_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        degrade(bad, 0)


def test_non_array_input_raises_type_error():
    with pytest.raises(TypeError):
        degrade([[0, 0, 0]], 0)
