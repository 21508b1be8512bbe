"""Training on the user's own pairs: LQ/HQ folders matched by relative path and shards with hq.*
and lq.* members, the same (scale-aware) crop and flip on both sides, mismatched pairs reported
by name and skipped, and the example pairs `python -m pipelines.feed --pairs` writes."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage
from PIL import Image

from diffbir.image_io import encode_image
from pipelines.feed import (
    TRAIN_PHOTOS,
    VAL_PHOTOS,
    FeedConfig,
    crop_pair,
    index_samples,
    main,
    pair_report,
    validation_batch,
)
from pipelines.shards import write_tar

PHOTOS = Path(skimage.__file__).parent / "data"


def png(img: np.ndarray) -> bytes:
    return encode_image(img.astype(np.float32) / 255 if img.dtype == np.uint8 else img)


def block_mean(img: np.ndarray, s: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img.reshape(h // s, s, w // s, s, -1).mean(axis=(1, 3))


@pytest.mark.parametrize("scale, hq_size", [(1, (90, 70)), (2, (91, 131)), (4, (403, 257)), (4, (50, 70))])
def test_crop_pair_takes_the_same_place_of_both(scale, hq_size):
    """LQ = the HQ's block means (floor(HQ / scale), the HQ's extra rows and columns unused): every
    crop and flip of the pair keeps that relation exactly; short pairs are scaled up together."""
    rng = np.random.default_rng(0)
    h, w = hq_size
    hq = rng.random((h, w, 3)).astype(np.float32)
    lq = block_mean(hq[: h // scale * scale, : w // scale * scale], scale).astype(np.float32)
    for seed in range(8):
        hq_crop, lq_crop = crop_pair(hq, lq, 64, scale, np.random.default_rng(seed))
        assert hq_crop.shape == (64, 64, 3) and lq_crop.shape == (64 // scale, 64 // scale, 3)
        if min(h, w) // scale >= 64 // scale:  # cropped at native size: exact
            np.testing.assert_allclose(block_mean(hq_crop, scale), lq_crop, atol=1e-6)
        else:  # scaled up first, by the same factor: the relation holds up to the resampling
            assert np.abs(block_mean(hq_crop, scale) - lq_crop).mean() < 0.1
    with pytest.raises(ValueError, match=f"is not {scale}x its LQ"):
        crop_pair(hq, lq[:-1], 64, scale, np.random.default_rng(0))


def test_example_pairs_train_through_the_feed(tmp_path):
    """`python -m pipelines.feed DIR --pairs`: train/ and val/ folders of hq/ and lq/ made with the
    platform's degradation; --data DIR/train reads them as pairs, cropped alike."""
    main([str(tmp_path), "--pairs"])
    index = index_samples(str(tmp_path / "train"))
    report = pair_report(index)
    assert (report.pairs, report.skipped) == (len(TRAIN_PHOTOS), {})
    assert index["key"].to_pylist() == sorted(f"{p.rsplit('.', 1)[0]}.png" for p in TRAIN_PHOTOS)
    assert all(u.endswith(f"/lq/{k}") for u, k in zip(index["lq_url"].to_pylist(), index["key"].to_pylist()))
    assert pair_report(index_samples(str(tmp_path / "val"))).pairs == len(VAL_PHOTOS)

    cfg = FeedConfig(data=str(tmp_path / "train"), crop_size=64, caption_drop_rate=0)
    batch = validation_batch(cfg, index, 6)
    hq, lq = (batch["hq"] + 1) / 2, batch["lq"]
    assert hq.shape == lq.shape == (6, 3, 64, 64)
    assert batch["prompt"][0] == "a photo: astronaut"
    # the LQ is the degraded crop of the same place: blurred, yet close to the HQ in the large
    diff = (hq - lq).abs().mean().item()
    shuffled = (hq - lq.roll(1, 0)).abs().mean().item()
    assert 0.005 < diff < shuffled / 2


def test_sr_pairs_are_cropped_at_their_scale(tmp_path):
    """x4 pairs (LQ = floor(HQ / 4)): the LQ crop is 16 px, fed at the HQ's 64 px (bicubic)."""
    for side in ("hq", "lq"):
        (tmp_path / side / "sub").mkdir(parents=True)
    photo = cv2.cvtColor(cv2.imread(str(PHOTOS / "rocket.jpg")), cv2.COLOR_BGR2RGB)  # 427x640
    h, w = photo.shape[:2]
    small = cv2.resize(photo[: h // 4 * 4, : w // 4 * 4], (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    (tmp_path / "hq/sub/rocket.png").write_bytes(png(photo))
    (tmp_path / "lq/sub/rocket.jpg").write_bytes(
        cv2.imencode(".jpg", small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 98])[1]
    )
    cfg = FeedConfig(data=str(tmp_path), crop_size=64, lq_scale=4)
    index = index_samples(cfg.data, scale=4)
    assert index["key"].to_pylist() == ["sub/rocket.png"] and pair_report(index).pairs == 1
    batch = validation_batch(cfg, index, 4)
    assert batch["lq"].shape == (4, 3, 64, 64)
    hq01 = (batch["hq"] + 1) / 2
    down = lambda x: x.reshape(4, 3, 16, 4, 16, 4).mean((3, 5))  # noqa: E731
    assert (down(hq01) - down(batch["lq"])).abs().mean() < 0.03  # the same place, at 1/4
    with pytest.raises(ValueError, match="multiple of lq_scale"):
        FeedConfig(data=str(tmp_path), crop_size=66, lq_scale=4)


def test_mismatched_pairs_are_reported_by_name_and_skipped(tmp_path, caplog):
    astronaut = cv2.cvtColor(cv2.imread(str(PHOTOS / "astronaut.png")), cv2.COLOR_BGR2RGB)[:128, :96]
    half = cv2.resize(astronaut, (48, 64), interpolation=cv2.INTER_AREA)
    files = {
        "hq/good.png": astronaut,
        "lq/good.png": half,
        "hq/nested/alone.png": astronaut,  # no LQ
        "lq/orphan.png": half,  # no HQ
        "hq/wrong.png": astronaut,
        "lq/wrong.png": astronaut[:100],  # ratio 1, height off
        "hq/broken.png": astronaut,
        "lq/broken.png": b"not an image",
        "hq/twice.png": astronaut,
        "hq/twice.jpg": astronaut,
        "lq/twice.png": half,
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else png(content))
    with caplog.at_level(logging.WARNING, logger="pipelines.feed"):
        index = index_samples(str(tmp_path), scale=2)
    assert index["key"].to_pylist() == ["good.png"]
    report = pair_report(index)
    assert report.pairs == 1
    assert report.first == {
        "no LQ partner": ["nested/alone.png"],
        "no HQ partner": ["orphan.png"],
        "size ratio not 2": ["wrong.png (HQ 96x128, LQ 96x100: x1)"],
        "not a readable image": ["broken.png (LQ)"],
        "several images of one name": ["twice (HQ twice.jpg, HQ twice.png, LQ twice.png)"],
    }
    assert set(report.skipped.values()) == {1}
    assert "1 LQ/HQ pairs, 5 skipped" in caplog.text and "orphan.png" in caplog.text

    # explicit --data HQ --lq-data LQ folders pair the same way
    assert index_samples(str(tmp_path / "hq"), str(tmp_path / "lq"), 2)["key"].to_pylist() == ["good.png"]
    # at scale 1 no pair is left: the error says why
    with pytest.raises(FileNotFoundError, match="0 LQ/HQ pairs, 6 skipped.*2 size ratio not 1"):
        index_samples(str(tmp_path), scale=1)


def test_shards_with_hq_and_lq_members(tmp_path):
    """A shard sample with hq.* and lq.* members is a pair; one with a plain image is degraded on
    the fly; one with only one side of a pair is reported, never degraded in its place."""
    photo = cv2.cvtColor(cv2.imread(str(PHOTOS / "coffee.png")), cv2.COLOR_BGR2RGB)[:96, :128]
    lq = cv2.GaussianBlur(photo, (0, 0), 2)
    samples = [
        ("pair", {"hq.png": png(photo), "lq.png": png(lq), "txt": b"a cup"}),
        ("plain", {"png": png(photo)}),
        ("half", {"hq.png": png(photo)}),
        ("other", {"lq.jpg": png(lq)}),
    ]
    with open(tmp_path / "00000.tar", "wb") as f:
        write_tar(f, samples)
    index = index_samples(str(tmp_path))
    assert index["key"].to_pylist() == ["pair", "plain"]
    assert index["lq_url"].to_pylist()[1] is None and index["lq_offset"].to_pylist()[0] > 0
    report = pair_report(index)
    assert report.pairs == 1 and report.first == {"no LQ partner": ["half"], "no HQ partner": ["other"]}

    batch = validation_batch(FeedConfig(data=str(tmp_path), crop_size=64, caption_drop_rate=0), index, 2)
    hq01, got = (batch["hq"] + 1) / 2, batch["lq"]
    assert batch["prompt"] == ["a cup", ""]
    # the pair's LQ is its own blurred image at the HQ crop's place, not a fresh degradation
    crop = np.asarray(Image.open(io.BytesIO(png(lq))))  # the LQ as stored
    found = [
        np.abs(got[0].numpy().transpose(1, 2, 0) - view[t : t + 64, l : l + 64] / 255).max()
        for view in (crop, crop[:, ::-1])
        for t in range(crop.shape[0] - 63)
        for l in range(crop.shape[1] - 63)  # noqa: E741
    ]
    assert min(found) < 1e-6
    assert (hq01[0] - got[0]).abs().mean() < 0.05
