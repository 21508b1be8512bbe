"""Reading and writing images of any mode while remembering what came in.

Restoration works on RGB in [0, 1]; what the user gave (grayscale, an alpha channel, 16 bits per
channel, EXIF orientation) is recorded so the output comes back in the same form. OpenCV decodes
(PIL truncates 16-bit colour PNGs to 8 bits); PIL only reads the EXIF orientation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

MAX_PIXELS = 16384 * 16384  # refuse decompression bombs before decoding
_EXT_TO_FORMAT = {".png": ".png", ".jpg": ".jpg", ".jpeg": ".jpg", ".webp": ".webp", ".tif": ".tiff", ".tiff": ".tiff"}


class ImageError(ValueError):
    """An input that cannot be used as an image (unreadable, truncated, too large...)."""


@dataclass
class ImageInfo:
    gray: bool  # the input had one colour channel
    bit_depth: int  # 8 or 16
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1]


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    """Bytes -> (RGB float32 (H, W, 3) in [0, 1], ImageInfo), EXIF orientation applied."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size  # from the header: a decompression bomb is refused before any decoding
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
            orientation = im.getexif().get(0x0112, 1)  # for a PNG, PIL decodes the image to find it
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for bad data
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.shape[:2] != (h, w):
        raise ImageError(f"{name}: image data is truncated or corrupt")
    if arr.dtype == np.uint8:
        depth, scale = 8, 255.0
    elif arr.dtype == np.uint16:
        depth, scale = 16, 65535.0
    else:
        raise ImageError(f"{name}: unsupported sample type {arr.dtype}")
    img = arr.astype(np.float32) / scale
    alpha = None
    if img.ndim == 2:
        gray, rgb = True, np.repeat(img[..., None], 3, axis=2)
    elif img.shape[2] == 1:
        gray, rgb = True, np.repeat(img, 3, axis=2)
    elif img.shape[2] == 2:  # gray + alpha
        gray, rgb, alpha = True, np.repeat(img[..., :1], 3, axis=2), img[..., 1]
    else:
        gray, rgb = False, img[..., 2::-1]  # BGR(A) -> RGB
        alpha = img[..., 3] if img.shape[2] == 4 else None
    rgb = _orient(np.ascontiguousarray(rgb), orientation)
    alpha = _orient(alpha, orientation) if alpha is not None else None
    return rgb, ImageInfo(gray, depth, alpha)


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, ImageInfo]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or e})") from e
    return decode_image(data, str(path), max_pixels)


def encode_image(rgb: np.ndarray, info: ImageInfo | None = None, fmt: str = ".png", quality: int = 95) -> bytes:
    """RGB float (H, W, 3) in [0, 1] -> encoded bytes in the input's form (gray, alpha, 16-bit
    where the format allows it). `fmt`: .png, .jpg, .webp or .tiff."""
    fmt = _EXT_TO_FORMAT.get(fmt.lower())
    if fmt is None:
        raise ValueError(f"unsupported output format (use one of {sorted(set(_EXT_TO_FORMAT))})")
    info = info or ImageInfo(False, 8, None)
    img = np.clip(rgb, 0.0, 1.0)
    if info.gray:
        img = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    else:
        img = img[..., ::-1]  # RGB -> BGR for OpenCV
    if info.alpha is not None and fmt in (".png", ".webp", ".tiff"):
        alpha = cv2.resize(info.alpha, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_CUBIC)
        img = np.dstack([img if img.ndim == 3 else img[..., None], np.clip(alpha, 0, 1)])
    sixteen = info.bit_depth == 16 and fmt in (".png", ".tiff")
    out = (img * (65535.0 if sixteen else 255.0) + 0.5).astype(np.uint16 if sixteen else np.uint8)
    params = {".jpg": [cv2.IMWRITE_JPEG_QUALITY, quality], ".webp": [cv2.IMWRITE_WEBP_QUALITY, quality]}.get(fmt, [])
    ok, buf = cv2.imencode(fmt, np.ascontiguousarray(out), params)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {out.shape} {out.dtype} image as {fmt}")
    return buf.tobytes()


def write_image(path: str | Path, rgb: np.ndarray, info: ImageInfo | None = None, quality: int = 95) -> None:
    """Write atomically (temporary file, then rename) so an interrupted run leaves no partial file."""
    path = Path(path)
    data = encode_image(rgb, info, path.suffix, quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation tag (1-8) so the pixels are upright."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, -1)[::-1],
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(img)) if op else img
