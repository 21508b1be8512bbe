"""Image I/O: every mode comes back in its own form; bad bytes give clear errors."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data

from diffbir.image_io import ImageError, decode_image, encode_image, read_image, write_image


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_rgb_gray_and_alpha_round_trip():
    rgb8 = data.astronaut()[:96, :128]
    img, info = decode_image(_png(rgb8))
    assert img.shape == (96, 128, 3) and img.dtype == np.float32 and not info.gray and info.alpha is None
    assert np.array_equal((img * 255 + 0.5).astype(np.uint8), rgb8)

    gray = data.camera()[:64, :80]
    img, info = decode_image(_png(gray))
    assert info.gray and np.allclose(img[..., 0], img[..., 2])
    out = np.asarray(Image.open(io.BytesIO(encode_image(img, info))))
    assert out.ndim == 2 and np.abs(out.astype(int) - gray).max() <= 1

    rgba = np.dstack([rgb8, np.linspace(0, 255, 128, dtype=np.uint8)[None].repeat(96, 0)])
    img, info = decode_image(_png(rgba, "RGBA"))
    assert info.alpha is not None and info.alpha.shape == (96, 128)
    back = Image.open(io.BytesIO(encode_image(img, info)))
    assert back.mode == "RGBA" and np.abs(np.asarray(back).astype(int) - rgba).max() <= 1


def test_sixteen_bit_png_keeps_precision(tmp_path):
    import cv2

    ramp = (np.linspace(0, 65535, 64 * 48 * 3) % 65536).astype(np.uint16).reshape(48, 64, 3)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), ramp)
    img, info = read_image(path)
    assert info.bit_depth == 16
    assert np.array_equal((img[..., ::-1] * 65535 + 0.5).astype(np.uint16), ramp)  # no 8-bit truncation
    write_image(tmp_path / "out.png", img, info)
    assert cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation):
    base = Image.fromarray(data.chelsea()[:40, :60])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    base.save(buf, format="PNG", exif=exif)
    img, _ = decode_image(buf.getvalue())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    assert np.array_equal((img * 255 + 0.5).astype(np.uint8), expected)


def test_bad_inputs_are_refused_with_the_name():
    good = _png(data.astronaut()[:64, :64])
    with pytest.raises(ImageError, match="x.png"):
        decode_image(good[: len(good) // 2], "x.png")
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(b"<html>404</html>", "page")
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image(good, "big.png", max_pixels=64 * 63)
    with pytest.raises(ValueError, match="unsupported output format"):
        encode_image(np.zeros((4, 4, 3), np.float32), fmt=".gif")


def test_pixel_limit_is_checked_on_the_header_before_any_decoding(monkeypatch):
    """A PNG claiming 12000 x 12000 pixels (a decompression bomb) is refused from its header:
    reading its EXIF would make PIL inflate the whole image first."""
    from PIL import PngImagePlugin

    bomb = bytearray(_png(np.zeros((8, 8, 3), np.uint8)))
    bomb[16:24] = (12000).to_bytes(4, "big") * 2  # IHDR width and height (below PIL's own bomb error)
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")

    def inflate(self):
        raise AssertionError("the image was decoded before the pixel limit was checked")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "getexif", inflate)
    with pytest.raises(ImageError, match=r"bomb.png: 12000x12000 = 144,000,000 pixels exceeds the limit of 1,000,000"):
        decode_image(bytes(bomb), "bomb.png", max_pixels=1_000_000)
