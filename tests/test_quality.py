"""Quality measurements and the filter on real photos (scikit-image's bundled set) and on
degraded variants made from them; the Ray Data stage on real webdataset tars."""

from __future__ import annotations

import io
import json
import sys

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from skimage import data

from diffbir.image_io import decode_image
from pipelines import quality as q
from pipelines.quality.dataset import _Scorer
from pipelines.shards import write_tar

from conftest import PHOTOS, encode

ASTRONAUT = PHOTOS["astronaut"]


def decoded(img_bytes: bytes) -> np.ndarray:
    return decode_image(img_bytes, dtype=np.uint8)[0]


def noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    return np.clip(img + np.random.default_rng(seed).normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def upscaled_from(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = img.shape[:2]
    small = cv2.resize(img, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


# ------------------------------------------------------------------ the measurements


@pytest.mark.parametrize("name", PHOTOS)
def test_clean_photos_pass(name):
    for img_bytes in (encode(PHOTOS[name]), encode(PHOTOS[name], "JPEG", quality=95)):
        result = q.assess(img_bytes)
        assert result.passed, (name, result.reasons, result.scores)
        assert result.reasons == [] and len(result.phash) == 16


VARIANTS = {  # name: (photo → encoded degraded copy, the reason it must be rejected for)
    "blur_sigma4": (lambda im: encode(cv2.GaussianBlur(im, (0, 0), 4)), "blurry"),
    "jpeg_q10": (lambda im: encode(im, "JPEG", quality=10), "low_jpeg_quality"),
    "jpeg_q10_resaved_png": (lambda im: encode(decoded(encode(im, "JPEG", quality=10))), "blocky"),
    "noise_sigma25": (lambda im: encode(noisy(im, 25)), "noisy"),
    "flat": (lambda im: encode(np.full_like(im, 128)), "flat"),
    "underexposed": (lambda im: encode((im * 0.15).astype(np.uint8)), "underexposed"),
    "overexposed": (lambda im: encode(np.clip(im * 3.0, 0, 255).astype(np.uint8)), "overexposed"),
    "upscaled_4x_from_small": (lambda im: encode(upscaled_from(im, 4)), "low_effective_resolution"),
    "small": (
        lambda im: encode(cv2.resize(im, (im.shape[1] * 300 // im.shape[0], 300), interpolation=cv2.INTER_AREA)),
        "too_small",
    ),
}


@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_degraded_variants_rejected_for_the_right_reason(photo, variant):
    make, reason = VARIANTS[variant]
    result = q.assess(make(PHOTOS[photo]), config=q.QualityConfig(measure_all=True))
    assert not result.passed and reason in result.reasons, (variant, result.reasons, result.scores)


def test_measuring_stops_at_the_first_failed_check_with_the_same_verdict():
    images = [encode(PHOTOS[p]) for p in PHOTOS] + [make(PHOTOS[p]) for p in PHOTOS for make, _ in VARIANTS.values()]
    every = q.QualityConfig(measure_all=True)
    stopped_early = 0
    for img_bytes in images:
        full, quick = q.assess(img_bytes, config=every), q.assess(img_bytes)
        # the checks of the groups measured, in the same order: the primary reason is the same
        assert quick.passed == full.passed and quick.reasons == full.reasons[: len(quick.reasons)]
        assert quick.reasons or full.passed
        assert {k: full.scores[k] for k in quick.scores} == quick.scores  # the same measures, fewer of them
        if full.passed:
            assert quick == full
        elif full.reasons != ["decode_error"]:
            assert quick.phash is None and full.phash is not None  # dedup only needs the candidates'
            stopped_early += "noise_sigma" not in quick.scores  # the costliest measure, taken last
    assert stopped_early >= len(images) // 2


@pytest.mark.parametrize("quality", [30, 50, 75, 90])
def test_jpeg_quality_recovered_from_tables(quality):
    for img in (ASTRONAUT, PHOTOS["coffee"]):
        estimate = q.jpeg_quality(decode_image(encode(img, "JPEG", quality=quality))[1].quantization)
        assert abs(estimate - quality) <= 5
    assert decode_image(encode(ASTRONAUT))[1].quantization is None and q.jpeg_quality(None) is None


def test_sharpness_is_size_normalised_and_falls_with_blur():
    clean = [q.sharpness(img) for img in PHOTOS.values()]
    assert min(clean) > q.QualityConfig().min_sharpness
    blurred = [q.sharpness(cv2.GaussianBlur(ASTRONAUT, (0, 0), s)) for s in (1, 2, 4)]
    assert blurred == sorted(blurred, reverse=True) and blurred[-1] < 10
    # one scene at 1411, 900 and 600 px: the raw Laplacian variance spans 8×, the normalised 5 %
    retina = data.retina()
    sizes = [retina] + [
        np.asarray(Image.fromarray(retina).resize((s, s), Image.Resampling.LANCZOS)) for s in (900, 600)
    ]
    raw = [cv2.Laplacian(q.to_gray(im).astype(np.float32), cv2.CV_32F).var() for im in sizes]
    normalised = [q.sharpness(im) for im in sizes]
    assert max(raw) / min(raw) > 5 and max(normalised) / min(normalised) < 1.05


def test_effective_resolution_catches_upscaling():
    for img in PHOTOS.values():
        assert q.effective_short_side(img) == min(img.shape[:2])
        assert q.hf_energy_ratio(img) > q.DETAIL_LEVEL
    assert q.effective_short_side(upscaled_from(ASTRONAUT, 4)) <= 128
    assert q.effective_short_side(upscaled_from(ASTRONAUT, 2)) <= 256
    assert q.hf_energy_ratio(np.full((64, 64), 7, np.uint8)) == 0.0


def test_noise_sigma_in_levels():
    assert max(q.noise_sigma(img) for img in PHOTOS.values()) < 4
    assert 18 < q.noise_sigma(noisy(ASTRONAUT, 25)) < 27  # clipping at 0/255 removes a little
    assert 8 < q.noise_sigma(noisy(PHOTOS["coffee"], 10)) < 12
    assert q.noise_sigma(np.zeros((64, 64, 3), np.uint8)) == 0.0


def test_blockiness_entropy_flatness_exposure():
    assert all(q.blockiness(img) < 1.1 for img in PHOTOS.values())
    assert q.blockiness(decoded(encode(ASTRONAUT, "JPEG", quality=10))) > 1.8
    flat = np.full((512, 512, 3), 90, np.uint8)
    assert q.luminance_stats(flat)["entropy"] == 0.0 and q.flat_fraction(flat) == 1.0
    for img in PHOTOS.values():
        stats = q.luminance_stats(img)
        assert stats["entropy"] > 6 and q.flat_fraction(img) < 0.8
        assert (
            0 <= stats["dark_fraction"] < 0.25
            and stats["bright_fraction"] < 0.2
            and 0.1 < stats["mean_luminance"] < 0.9
        )
    assert q.luminance_stats((ASTRONAUT * 0.15).astype(np.uint8))["mean_luminance"] < 0.1
    assert q.luminance_stats(np.clip(ASTRONAUT * 3.0, 0, 255).astype(np.uint8))["bright_fraction"] > 0.4


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"not an image at all",
        encode(ASTRONAUT, "JPEG", quality=90)[:4000],
        encode(ASTRONAUT)[:20000],
        b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8,
    ],
)
def test_bad_bytes_are_decode_errors_not_exceptions(bad):
    result = q.assess(bad)
    assert result == q.QualityResult({}, False, ["decode_error"])


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 30, 3), (40, 40)])
def test_tiny_images_are_scored_without_error(shape):
    result = q.assess(encode(np.full(shape, 100, np.uint8)))
    assert result.reasons[0] == "too_small"


def test_metadata_size_must_match_decoded_size():
    img_bytes = encode(ASTRONAUT)
    assert q.assess(img_bytes, {"width": 512, "height": 512}).passed
    assert q.assess(img_bytes, {"width": 1024, "height": 768}).reasons == ["size_mismatch"]


def test_config_is_strict_and_checks_can_be_disabled():
    with pytest.raises(ValidationError):
        q.QualityConfig(min_sharpnes=10)
    small = encode(cv2.resize(ASTRONAUT, (300, 300), interpolation=cv2.INTER_AREA))
    assert q.assess(small, config=q.QualityConfig(min_short_side=None, min_effective_short_side=None)).passed
    limits = q.QualityConfig().thresholds()
    assert limits["short_side"] == [("min", 512)] and limits["mean_luminance"] == [("min", 0.1), ("max", 0.9)]


# ------------------------------------------------------------------ learned IQA plumbing


class TinyIQA(q.TorchIQA):
    """Stands in for a real scorer: mean brightness in [0, 1] once its weights are loaded."""

    input_size = 32

    def build(self):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 1))


q.register_learned_iqa("tiny-test")(TinyIQA)


@pytest.fixture
def tiny_weights(tmp_path):
    net = TinyIQA().build()
    with torch.no_grad():
        net[2].weight.fill_(1 / 3)
        net[2].bias.zero_()
    path = tmp_path / "tiny_iqa.pth"
    torch.save(net.state_dict(), path)
    return path


def test_learned_iqa_scores_and_thresholds(tiny_weights, tmp_path):
    from safetensors.torch import save_file

    save_file(torch.load(tiny_weights, weights_only=True), tmp_path / "tiny_iqa.safetensors")
    for weights in (tiny_weights, tmp_path / "tiny_iqa.safetensors"):
        cfg = q.LearnedIQAConfig(name="tiny-test", weights_path=str(weights), min_score=0.2)
        result = q.assess(encode(ASTRONAUT), config=q.QualityConfig(learned_iqa=cfg))
        assert result.passed and result.scores["learned_iqa"] == pytest.approx(ASTRONAUT.mean() / 255, abs=0.02)
    strict = q.QualityConfig(
        learned_iqa=q.LearnedIQAConfig(name="tiny-test", weights_path=str(tiny_weights), min_score=0.9)
    )
    assert q.assess(encode(ASTRONAUT), config=strict).reasons == ["low_learned_iqa"]
    assert strict.thresholds()["learned_iqa"] == [("min", 0.9)]


def test_learned_iqa_batches_through_the_stage_body(tiny_weights):
    cfg = q.QualityConfig(
        learned_iqa=q.LearnedIQAConfig(name="tiny-test", weights_path=str(tiny_weights), min_score=0.2)
    )
    scorer = _Scorer(cfg)
    rows = [
        {
            "key": k,
            "source": "x.tar",
            "offset": 0,
            "size": len(b),
            "ext": "png",
            "image": b,
            "caption": "",
            "meta": "{}",
            "error": None,
        }
        for k, b in [("a", encode(ASTRONAUT)), ("b", b"junk"), ("c", encode(PHOTOS["coffee"]))]
    ]
    out = scorer(pa.Table.from_pylist(rows, schema=q.DOWNLOADED_SAMPLE_SCHEMA)).to_pylist()
    assert [r["passed"] for r in out] == [True, False, True] and out[1]["learned_iqa"] is None
    assert out[2]["learned_iqa"] == pytest.approx(PHOTOS["coffee"].mean() / 255, abs=0.02)


def test_learned_iqa_missing_weights_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "musiq.pth"
    with pytest.raises(FileNotFoundError, match="musiq.pth does not exist.*never downloaded"):
        q.load_learned_iqa(q.LearnedIQAConfig(name="tiny-test", weights_path=str(missing), min_score=0))
    with pytest.raises(KeyError, match="unknown learned IQA"):
        q.load_learned_iqa(q.LearnedIQAConfig(name="musiq", weights_path=str(missing), min_score=0))


# ------------------------------------------------------------------ the Ray Data stage


def sample(key: str, img_bytes: bytes | None, ext: str = "png", meta: dict | None = None) -> tuple[str, dict]:
    meta = (
        {
            "url": f"http://127.0.0.1/{key}.{ext}",
            "caption": f"photo {key}",
            "status": "success",
            "similarity": 0.31,
            "AESTHETIC_SCORE": 5.2,
        }
        if meta is None
        else meta
    )
    members = {ext: img_bytes} if img_bytes is not None else {}
    return key, members | {"txt": f"photo {key}".encode(), "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def ray_local():
    from pipelines.ray_env import ensure_ray

    ensure_ray(num_cpus=2)  # shared by the session; conftest stops it at the end
    yield


def test_filter_quality_on_tars(tmp_path, ray_local):
    good = [
        sample("000000000", encode(ASTRONAUT)),
        sample("000000001", encode(PHOTOS["coffee"], "JPEG", quality=92), "jpg"),
    ]
    bad = [
        sample("000000002", encode(cv2.GaussianBlur(ASTRONAUT, (0, 0), 4))),  # blurry too, but counted first as this
        sample("000000003", encode(noisy(PHOTOS["rocket"], 25))),
        sample("000000004", encode(ASTRONAUT, "JPEG", quality=10), "jpg"),
        sample("000000005", b"\x89PNG garbage"),
        sample("000000006", None),
        ("000000007", {"png": encode(PHOTOS["chelsea"]), "json": b"{not json"}),
    ]
    with open(tmp_path / "00000.tar", "wb") as f:
        write_tar(f, good + bad)
    # a truncated tar: its first sample survives, then the read fails part-way through the second
    buf = io.BytesIO()
    write_tar(
        buf, [sample("000010000", encode(PHOTOS["motorcycle_left"])), sample("000010001", encode(PHOTOS["chelsea"]))]
    )
    first_len = 3 * 512 + sum(
        len(v) + (-len(v)) % 512 for v in sample("000010000", encode(PHOTOS["motorcycle_left"]))[1].values()
    )
    (tmp_path / "00001.tar").write_bytes(buf.getvalue()[: first_len + 2048])
    (tmp_path / "00001_stats.json").write_text("{}")  # img2dataset's side files are not read

    kept, rejected = q.filter_quality(str(tmp_path), q.QualityConfig())
    rows = {r["key"]: r for r in kept.take_all()}
    assert sorted(rows) == ["000000000", "000000001", "000010000"]
    assert rejected == {
        "low_effective_resolution": 1,
        "noisy": 1,
        "low_jpeg_quality": 1,
        "decode_error": 1,
        "missing_image": 1,
        "bad_metadata": 1,
        "tar_error": 1,
    }
    coffee = rows["000000001"]
    assert coffee["jpeg_quality"] == 92 and coffee["ext"] == "jpg" and coffee["caption"] == "photo 000000001"
    with open(coffee["source"], "rb") as f:  # the row points at the original bytes
        f.seek(coffee["offset"])
        assert f.read(coffee["size"]) == good[1][1]["jpg"]
    assert json.loads(coffee["meta"])["AESTHETIC_SCORE"] == 5.2


def test_list_tars_accepts_dirs_globs_lists_and_urls(tmp_path):
    for name in ("00001.tar", "00000.tar", "00000.parquet"):
        (tmp_path / name).write_bytes(b"")
    expected = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert q.list_tars(str(tmp_path)) == q.list_tars(f"{tmp_path}/*.tar") == expected
    assert q.list_tars(expected[::-1]) == expected[::-1]
    assert q.list_tars(f"file://{tmp_path}") == [f"file://{p}" for p in expected]
    with pytest.raises(FileNotFoundError, match="no tar files"):
        q.list_tars(str(tmp_path / "missing"))


def test_learned_iqa_stage_streams_over_candidates_reading_their_bytes(tmp_path, tiny_weights, ray_local):
    """The GPU stage's body on real Ray Data actors (CPU here): candidates point at their bytes in
    a tar; each gets its score, and those under min_score are rejected for it."""
    import ray.cloudpickle
    import ray.data

    from pipelines.tars import TarAppender

    images = {"a": encode(ASTRONAUT), "b": encode(PHOTOS["coffee"]), "c": encode(ASTRONAUT // 4)}
    rows = []
    with open(tmp_path / "00000.tar", "wb") as f, TarAppender(f) as tar:
        for key, data in images.items():
            where = tar.add(key, {"png": data, "json": b"{}"})
            rows.append(
                {"key": key, "source": str(tmp_path / "00000.tar"), "offset": where["png"].offset, "size": len(data)}
                | {"ext": "png", "image": data, "caption": "", "meta": "{}", "error": None}
            )
    lenient = q.QualityConfig(**{name: None for *_, name in q.CHECKS})
    candidates = q.score_rows(rows, lenient)
    cut = (ASTRONAUT // 4).mean() / 255 + 0.05  # between the dark copy and the others
    cfg = q.LearnedIQAConfig(name="tiny-test", weights_path=str(tiny_weights), min_score=cut, batch_size=2)
    # the driver resolves the registered class and ships it; Ray's workers cannot import a test
    # module by name, so it travels by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[TinyIQA.__module__])
    ds = ray.data.from_arrow(pa.Table.from_pylist(candidates, schema=q.SCORED_SCHEMA))
    out = {r["key"]: r for r in q.learned_iqa_stage(ds, cfg).take_all()}
    assert out["a"]["learned_iqa"] == pytest.approx(ASTRONAUT.mean() / 255, abs=0.02)
    assert [out[k]["passed"] for k in "abc"] == [True, True, False]
    assert out["c"]["reasons"] == ["low_learned_iqa"] == [out["c"]["reason"]]
