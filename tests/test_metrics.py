"""diffbir.metrics on real photos: agreement with scikit-image and with a direct BT.601 luma, and
what each convention (colour space, border crop, 8-bit rounding) changes."""

from __future__ import annotations

import io
import math
import socket
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, load_model, save_file
from skimage import color, data, filters
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffbir.image_io import write_image
from diffbir.metrics import (
    FID,
    FID_WEIGHTS,
    LEARNED_WEIGHTS,
    PLATFORM,
    FeatureGaussian,
    Metric,
    MetricConvention,
    MetricsConfig,
    MetricWeightsError,
    build_metric,
    frechet_distance,
    learned_network,
    psnr,
    random_weights,
    ssim,
)

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
    for a, b in ((lq, hq), (lq8, hq8)):
        assert {"psnr": psnr(a, b), "ssim": ssim(a, b)} == pytest.approx(expected, rel=1e-9)
    assert psnr(lq, hq, PLATFORM) == psnr(lq, hq) and ssim(lq, hq, PLATFORM) == ssim(lq, hq)


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

    for fn in (psnr, ssim):
        assert fn(lq, hq) == fn(png_roundtrip(lq), png_roundtrip(hq))
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


@pytest.mark.parametrize("name", ["psnr", "ssim"])
def test_built_metric_scores_each_image_of_a_batch(name):
    """build_metric's PSNR/SSIM (what validation, promotion and evaluation call) on an NCHW batch: the
    per-image numbers of the array functions; raw network output is clamped to [0, 1]."""
    hqs = [photo(n) for n in PHOTOS]
    lqs = [degraded(hq, seed=i) for i, hq in enumerate(hqs)]
    nchw = lambda imgs: torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()  # noqa: E731
    fn = {"psnr": psnr, "ssim": ssim}[name]
    expected = [fn(lq.astype(np.float32), hq.astype(np.float32)) for lq, hq in zip(lqs, hqs)]
    metric = build_metric(name)
    assert metric.kind == "fr" and not metric.lower_is_better
    assert metric(nchw(lqs), nchw(hqs)).tolist() == pytest.approx(expected, rel=1e-12)
    over = nchw(lqs) * 1.5 - 0.2
    assert torch.equal(metric(over, nchw(hqs)), metric(over.clamp(0, 1), nchw(hqs)))
    with pytest.raises(ValueError, match="full-reference"):
        metric(nchw(lqs))


# Learned metrics (pyiqa), each built from a weights file the test writes: the metric's own
# network with seeded random weights. Nothing may be fetched: sockets refuse, and the torch hub
# folder, where torchvision, timm and CLIP download to, must stay absent.

FR_LEARNED = ["lpips", "lpips-vgg", "dists"]
NR_LEARNED = ["musiq", "clipiqa", "niqe"]  # and maniqa, slow on a CPU (20 ViT-B/8 crops an image)


class _Code:
    """Stands for code in a pickle: what weights_only loading refuses."""


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    hub = tmp_path_factory.mktemp("offline") / "torch"

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(hub))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield hub


@pytest.fixture(scope="module")
def weights(offline, tmp_path_factory):
    """name -> a weights file of random weights, written on first use."""
    folder, files = tmp_path_factory.mktemp("weights"), {}

    def write(name: str) -> str:
        if name not in files:
            files[name] = str(random_weights(name, folder))
        return files[name]

    return write


@pytest.fixture(scope="module")
def learned(weights):
    """name -> the metric built by build_metric from its random weights, once per module."""
    metrics = {}

    def build(name: str) -> Metric:
        if name not in metrics:
            metrics[name] = build_metric(name, MetricsConfig(weights={name: weights(name)}))
        return metrics[name]

    return build


def nchw(*imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()


def square(name: str, size: int = 192) -> np.ndarray:
    img = getattr(data, name)()
    y, x = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[y : y + size, x : x + size] / 255


def distorted(hq: np.ndarray, sigma: float, noise: float) -> np.ndarray:
    blurred = filters.gaussian(hq, sigma=sigma, channel_axis=2)
    return np.clip(blurred + np.random.default_rng(0).normal(0, noise, hq.shape), 0, 1)


@pytest.mark.parametrize("name", FR_LEARNED)
def test_full_reference_learned_metric(name, learned):
    metric = learned(name)
    assert (metric.name, metric.kind, metric.lower_is_better) == (name, "fr", True)
    hqs = [photo("astronaut"), photo("coffee")]
    hq = nchw(*hqs)
    mild = nchw(*(distorted(x, 0.8, 0.02) for x in hqs))
    strong = nchw(*(distorted(x, 2.5, 0.1) for x in hqs))
    same, d_mild, d_strong = metric(hq, hq), metric(mild, hq), metric(strong, hq)
    for scores in (same, d_mild, d_strong):
        assert scores.shape == (2,) and scores.dtype == torch.float64 and torch.isfinite(scores).all()
    assert same.abs().max() < 1e-5
    assert (d_mild > 1e-4).all() and (d_strong > d_mild).all(), (d_mild, d_strong)
    with pytest.raises(ValueError, match="needs the target"):
        metric(hq)
    with pytest.raises(ValueError, match="differ"):
        metric(hq[:, :, :64], hq)


@pytest.mark.parametrize("name", NR_LEARNED)
def test_no_reference_learned_metric(name, learned):
    metric = learned(name)
    assert (metric.name, metric.kind, metric.lower_is_better) == (name, "nr", name == "niqe")
    a, b = square("astronaut"), square("coffee")
    scores = metric(nchw(a, b, a))
    assert scores.shape == (3,) and scores.dtype == torch.float64 and torch.isfinite(scores).all()
    sa, sb, sa2 = scores.tolist()
    assert sa != pytest.approx(sb, rel=1e-6) and sa2 == pytest.approx(sa, rel=1e-6)  # tells apart; deterministic
    assert metric(nchw(b)).item() == pytest.approx(sb, rel=1e-6)  # whatever else is in the batch
    assert metric(nchw(b), nchw(a)).item() == pytest.approx(sb, rel=1e-6)  # the target is ignored


@pytest.mark.slow
def test_maniqa(learned):
    metric = learned("maniqa")
    assert (metric.kind, metric.lower_is_better) == ("nr", False)
    a, b = square("astronaut"), square("coffee")
    scores = metric(nchw(a, b, a))  # 192 px: upscaled to MANIQA's 224 crops, as pyiqa does
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    sa, sb, sa2 = scores.tolist()
    assert sa != pytest.approx(sb, rel=1e-6) and sa2 == pytest.approx(sa, rel=1e-6)


def test_maniqa_loads_from_its_file(weights):
    """The scores are slow on a CPU (test_maniqa); the network and its file are checked here."""
    metric = build_metric("maniqa", MetricsConfig(weights={"maniqa": weights("maniqa")}))
    assert (metric.name, metric.kind, metric.lower_is_better) == ("maniqa", "nr", False)


def test_niqe_needs_its_block_size(learned):
    with pytest.raises(ValueError, match="at least 96x96"):
        learned("niqe")(torch.rand(1, 3, 64, 128))


@pytest.mark.parametrize("name", [*LEARNED_WEIGHTS, "fid"])
def test_missing_weights_name_the_metric_and_its_file(name, tmp_path):
    expected = LEARNED_WEIGHTS[name][1] if name in LEARNED_WEIGHTS else FID_WEIGHTS
    build = (lambda config: FID(config)) if name == "fid" else (lambda config: build_metric(name, config))
    with pytest.raises(MetricWeightsError, match=rf"^{name}: no weights file configured .*weights\.{name}") as e:
        build(MetricsConfig())
    assert expected in str(e.value)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(MetricWeightsError, match=rf"^{name}: weights file {missing} not found") as e:
        build(MetricsConfig(weights={name: str(missing)}))
    assert expected in str(e.value)


def test_expected_files_are_pyiqas_published_names():
    """What the weight errors and the docs name: the files pyiqa downloads (or OpenAI's, for CLIP)."""
    published = {
        "lpips": "LPIPS_v0.1_alex-df73285e.pth",
        "lpips-vgg": "LPIPS_v0.1_vgg-a78928a0.pth",
        "dists": "DISTS_weights-f5e65c96.pth",
        "musiq": "musiq_koniq_ckpt-e95806b9.pth",
        "maniqa": "ckpt_koniq10k.pt",
        "clipiqa": "RN50.pt",
        "niqe": "niqe_modelparameters.mat",
    }
    assert set(LEARNED_WEIGHTS) == set(published)
    for name, file in published.items():
        assert file in LEARNED_WEIGHTS[name][1], name
    assert "pt_inception-2015-12-05-6726825d.pth" in FID_WEIGHTS


def test_unusable_weights_files_are_refused(weights, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(MetricWeightsError, match=rf"^lpips: .*{garbage}.*LPIPS_v0.1_alex-df73285e.pth"):
        build_metric("lpips", MetricsConfig(weights={"lpips": str(garbage)}))
    code = tmp_path / "code.pth"
    torch.save({"w": torch.zeros(1), "extra": _Code()}, code)
    with pytest.raises(MetricWeightsError, match=r"^lpips: .*refused to unpickle"):
        build_metric("lpips", MetricsConfig(weights={"lpips": str(code)}))
    with pytest.raises(MetricWeightsError, match=r"^lpips: .*does not fit the network \(missing: .*unexpected: .*conv"):
        build_metric("lpips", MetricsConfig(weights={"lpips": weights("musiq")}))
    partial = tmp_path / "partial.safetensors"
    state = load_file(weights("lpips"))
    del state[next(k for k in state if k.startswith("net.slice5"))]
    save_file(state, str(partial))
    with pytest.raises(MetricWeightsError, match=r"^lpips: .*missing: net\.slice5"):
        build_metric("lpips", MetricsConfig(weights={"lpips": str(partial)}))
    with pytest.raises(MetricWeightsError, match=r"^niqe: cannot read"):
        build_metric("niqe", MetricsConfig(weights={"niqe": str(garbage)}))


def test_torch_pickles_of_tensors_load_too(weights, tmp_path):
    """The published files are torch pickles (of tensors only); with both names of LPIPS' linear layers."""
    net = learned_network("lpips")
    load_model(net, weights("lpips"))
    path = tmp_path / "lpips.pth"
    torch.save(net.state_dict(), path)
    metric = build_metric("lpips", MetricsConfig(weights={"lpips": str(path)}))
    hq = nchw(photo("chelsea"))
    reference = build_metric("lpips", MetricsConfig(weights={"lpips": weights("lpips")}))
    lq = nchw(degraded(photo("chelsea")))
    assert metric(lq, hq) == reference(lq, hq)


def test_unknown_metric_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown metric 'lpipz'; known: psnr, ssim, lpips, .*maniqa.*niqe"):
        build_metric("lpipz")
    with pytest.raises(ValidationError, match=r"unknown metric 'fid' \(fid is a set metric: the evaluation job's"):
        MetricsConfig(names=["psnr", "fid"])  # no per-image metric: training validation and promotion refuse it


@pytest.fixture(scope="module")
def face_folders(tmp_path_factory):
    """Six real photo crops (a), and the same with noise (noisy), as PNG folders."""
    root = tmp_path_factory.mktemp("fid")
    crops = [getattr(data, n)()[y : y + 128, x : x + 128] / 255 for n in PHOTOS for y, x in ((40, 100), (120, 180))]
    for folder, imgs in (("a", crops), ("noisy", [distorted(c, 0.5, 0.15) for c in crops])):
        for i, img in enumerate(imgs):
            write_image(root / folder / f"{i}.png", img)
    return root, nchw(*crops)


def test_fid(weights, face_folders):
    root, a = face_folders
    fid = FID(MetricsConfig(weights={"fid": weights("fid")}))
    assert (fid.name, fid.lower_is_better) == ("fid", True)
    # a batch is measured as the PNGs it would be written as: as the folder of its PNGs, the same set
    same, noisy = fid(a, root / "a"), fid(root / "noisy", root / "a")
    assert math.isfinite(same) and math.isfinite(noisy)
    assert abs(same) < 1e-3 * noisy and noisy > 1
    with pytest.raises(ValueError, match="at least two"):
        fid(a[:1], root / "a")


def test_frechet_distance_is_pyiqas():
    """The same distance as pyiqa's sqrtm of the product, for sets larger and smaller than the
    feature dimension (singular covariances, as small test sets give)."""
    from pyiqa.archs.fid_arch import frechet_distance as pyiqa_frechet_distance

    rng = np.random.default_rng(0)
    reference = rng.normal(0.3, 1.5, size=(100, 64)) @ rng.normal(size=(64, 64)) / 8
    gaussian = FeatureGaussian(reference)
    for n in (200, 20):
        features = rng.normal(size=(n, 64))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm's disp, which pyiqa passes
            expected = pyiqa_frechet_distance(
                features.mean(0), np.cov(features, rowvar=False), gaussian.mu, gaussian.sigma
            )
        assert frechet_distance(features, gaussian) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(reference, gaussian) == pytest.approx(0, abs=1e-6)


def test_the_offline_guard_refuses_connections(offline):
    with pytest.raises(OSError, match="network access attempted"):
        urllib.request.urlopen("https://huggingface.co", timeout=5)


def test_nothing_was_downloaded(offline, learned):
    """Last of the learned-metric tests: no network access so far (it would have failed them),
    and nothing cached in torch's hub folder."""
    assert not offline.exists()
