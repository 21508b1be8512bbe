"""diffbir.metrics on real photos: agreement with scikit-image and with a direct BT.601 luma, and
what each convention (colour space, border crop, 8-bit rounding) changes."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from skimage import color, data, filters
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffbir.metrics import PLATFORM, MetricConvention, batch_metrics, image_metrics, psnr, ssim

WANG = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)  # Wang et al. 2004's SSIM
FLOAT = MetricConvention(uint8=False)
PHOTOS = ["astronaut", "coffee", "chelsea"]


def photo(name: str) -> np.ndarray:
    """A 96x128 crop of a scikit-image photo, float64 RGB in [0, 1]."""
    img = getattr(data, name)()
    y, x = img.shape[0] // 2 - 48, img.shape[1] // 2 - 64
    return img[y : y + 96, x : x + 128] / 255


def degraded(hq: np.ndarray, seed: int = 0) -> np.ndarray:
    """Blur and Gaussian noise, the same for the same seed."""
    noisy = filters.gaussian(hq, sigma=1.2, channel_axis=2) + np.random.default_rng(seed).normal(0, 0.04, hq.shape)
    return np.clip(noisy, 0, 1)


def to8(img: np.ndarray) -> np.ndarray:
    return np.round(img * 255).astype(np.uint8)


def direct_psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    return 10 * math.log10(peak**2 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


@pytest.mark.parametrize("name", PHOTOS)
def test_rgb_float_agrees_with_scikit_image(name):
    hq = photo(name)
    lq = degraded(hq)
    assert psnr(lq, hq, FLOAT) == pytest.approx(peak_signal_noise_ratio(hq, lq, data_range=1), rel=1e-9)
    assert psnr(lq, hq, FLOAT) == pytest.approx(direct_psnr(hq * 255, lq * 255), rel=1e-9)
    expected = structural_similarity(hq, lq, channel_axis=2, data_range=1, **WANG)
    assert ssim(lq, hq, FLOAT) == pytest.approx(expected, rel=1e-9)
    assert 15 < psnr(lq, hq, FLOAT) < 40 and 0.2 < ssim(lq, hq, FLOAT) < 0.99  # a real degradation, not noise


@pytest.mark.parametrize("name", PHOTOS)
def test_platform_convention_is_8_bit_rgb(name):
    """PLATFORM: the numbers of the images rounded to 8 bits, as uint8 input gives directly."""
    hq = photo(name)
    lq = degraded(hq, seed=1)
    hq8, lq8 = to8(hq), to8(lq)
    expected = {
        "psnr": peak_signal_noise_ratio(hq8, lq8, data_range=255),
        "ssim": structural_similarity(hq8, lq8, channel_axis=2, data_range=255, **WANG),
    }
    assert image_metrics(lq, hq) == pytest.approx(expected, rel=1e-9)
    assert image_metrics(lq8, hq8) == pytest.approx(expected, rel=1e-9)
    assert image_metrics(lq, hq, PLATFORM) == image_metrics(lq, hq)


def test_y_channel_matches_bt601_luma():
    hq = photo("coffee")
    lq = degraded(hq, seed=2)
    y = MetricConvention(space="y", uint8=False)
    y_hq, y_lq = (16 + img @ np.array([65.481, 128.553, 24.966]) for img in (hq, lq))
    np.testing.assert_allclose(y_hq, color.rgb2ycbcr(hq)[..., 0], rtol=1e-12)  # the same BT.601 luma
    assert psnr(lq, hq, y) == pytest.approx(direct_psnr(y_hq, y_lq), rel=1e-9)
    assert ssim(lq, hq, y) == pytest.approx(structural_similarity(y_hq, y_lq, data_range=255, **WANG), rel=1e-9)
    assert psnr(lq, hq, y) != pytest.approx(psnr(lq, hq, FLOAT), abs=0.05)
    # Y with 8-bit rounding: luma of the rounded RGB, itself not rounded (BasicSR)
    y_hq8, y_lq8 = (16 + to8(img) @ np.array([65.481, 128.553, 24.966]) / 255 for img in (hq, lq))
    assert psnr(lq, hq, MetricConvention(space="y")) == pytest.approx(direct_psnr(y_hq8, y_lq8), rel=1e-9)


def test_border_crop():
    hq = photo("astronaut")
    lq = degraded(hq, seed=3)
    crop = MetricConvention(crop=4, uint8=False)
    assert psnr(lq, hq, crop) == pytest.approx(psnr(lq[4:-4, 4:-4], hq[4:-4, 4:-4], FLOAT), rel=1e-12)
    assert ssim(lq, hq, crop) == pytest.approx(ssim(lq[4:-4, 4:-4], hq[4:-4, 4:-4], FLOAT), rel=1e-12)
    # damage confined to a 4-pixel frame: gone with crop 4, still there with crop 3
    framed = lq.copy()
    framed[4:-4, 4:-4] = hq[4:-4, 4:-4]
    assert psnr(framed, hq, crop) == math.inf and ssim(framed, hq, crop) == 1.0
    assert psnr(framed, hq, MetricConvention(crop=3, uint8=False)) < 60
    with pytest.raises(ValueError, match="border crop of 48"):
        psnr(lq, hq, MetricConvention(crop=48))


def test_uint8_rounding():
    hq = np.minimum(photo("chelsea"), 254 / 255)  # 8-bit values, room for the offset below 1
    near = hq + 0.001  # a quarter of an 8-bit step above hq: the same 8-bit image
    assert psnr(near, hq, FLOAT) == pytest.approx(60.0, abs=1e-6)  # 20 log10(1 / 0.001)
    assert ssim(near, hq, FLOAT) < 1
    assert psnr(near, hq) == math.inf and ssim(near, hq) == pytest.approx(1.0, abs=1e-12)
    far = hq + 0.003  # three quarters of a step: rounds up one level everywhere
    assert psnr(far, hq) == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_uint8_convention_measures_what_a_png_holds():
    hq = photo("astronaut")
    lq = degraded(hq, seed=4)

    def png_roundtrip(img: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(to8(img)).save(buf, format="PNG")
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())))

    assert image_metrics(lq, hq) == image_metrics(png_roundtrip(lq), png_roundtrip(hq))
    assert psnr(lq, hq) != psnr(lq, hq, FLOAT)


@pytest.mark.parametrize("convention", [PLATFORM, FLOAT, MetricConvention(space="y", crop=2)])
def test_identical_images(convention):
    hq = photo("coffee")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning on the way to inf
        assert psnr(hq, hq.copy(), convention) == math.inf
        assert psnr(to8(hq), to8(hq), convention) == math.inf
    assert ssim(hq, hq.copy(), convention) == pytest.approx(1.0, abs=1e-12)


def test_bad_inputs_raise():
    hq = photo("astronaut")
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(hq[:-1], hq)
    with pytest.raises(ValueError, match="two uint8 or two float"):
        psnr(to8(hq), hq)
    with pytest.raises(ValueError, match="two uint8 or two float"):
        ssim(hq.astype(np.uint16), hq.astype(np.uint16))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        psnr(hq * 255, hq * 255)  # a float image on the 8-bit scale
    nan = hq.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        ssim(nan, hq)
    with pytest.raises(ValueError, match="HxWxC"):
        psnr(hq[..., 0], hq[..., 0])
    with pytest.raises(ValueError, match="needs RGB"):
        psnr(hq[..., :1], hq[..., :1], MetricConvention(space="y"))
    with pytest.raises(ValidationError):
        MetricConvention(crop=-1)
    with pytest.raises(ValidationError):
        MetricConvention(space="ycbcr")


def test_batch_metrics_is_the_mean_over_the_batch():
    """Training logs batch_metrics of tensors; promotion sums image_metrics of arrays: the same numbers."""
    hqs = [photo(n) for n in PHOTOS]
    lqs = [degraded(hq, seed=i) for i, hq in enumerate(hqs)]
    nchw = lambda imgs: torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()  # noqa: E731
    per_image = [image_metrics(lq.astype(np.float32), hq.astype(np.float32)) for lq, hq in zip(lqs, hqs)]
    mean = {k: np.mean([m[k] for m in per_image]) for k in ("psnr", "ssim")}
    assert batch_metrics(nchw(lqs), nchw(hqs)) == pytest.approx(mean, rel=1e-12)
    # raw network output is clamped to [0, 1]
    over = nchw(lqs) * 1.5 - 0.2
    assert batch_metrics(over, nchw(hqs)) == pytest.approx(batch_metrics(over.clamp(0, 1), nchw(hqs)), rel=1e-12)
    with pytest.raises(ValueError, match="NCHW"):
        batch_metrics(nchw(lqs)[:, :, :-1], nchw(hqs))
