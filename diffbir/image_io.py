"""Reading and writing images of any mode while remembering what came in.

Restoration works on RGB in [0, 1]; what the user gave (grayscale, an alpha channel, 16 bits per
channel, EXIF orientation) is recorded so the output comes back in the same form. OpenCV decodes
(PIL truncates 16-bit colour PNGs to 8 bits); PIL only reads the header (size, EXIF orientation,
JPEG quantization tables).
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
# file suffixes (lower case) of what decode_image reads and of what encode_image writes
READABLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
WRITABLE_SUFFIXES = tuple(_EXT_TO_FORMAT)


class ImageError(ValueError):
    """An input that cannot be used as an image (unreadable, truncated, too large...)."""


@dataclass
class ImageInfo:
    gray: bool  # the input had one colour channel
    bit_depth: int  # 8 or 16
    alpha: np.ndarray | None  # (H, W) float32 in [0, 1]
    quantization: dict[int, list[int]] | None = None  # a JPEG's quantization tables (from its header)


def decode_image(
    data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS, dtype: type = np.float32
) -> tuple[np.ndarray, ImageInfo]:
    """Bytes -> (RGB (H, W, 3), ImageInfo), EXIF orientation applied. `dtype` float32: in [0, 1];
    uint8: 8-bit levels (16-bit input rounded), which keeps crops of big photos cheap."""
    if np.dtype(dtype) not in (np.float32, np.uint8):
        raise ValueError(f"decode_image gives float32 or uint8, not {np.dtype(dtype)}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size  # from the header: a decompression bomb is refused before any decoding
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
            tables = {k: list(v) for k, v in getattr(im, "quantization", {}).items()} or None  # JPEG only
            orientation = im.getexif().get(0x0112, 1)  # for a PNG, PIL decodes the image to find it
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for bad data
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # refuses truncated data
    if arr is None or arr.shape[:2] != (h, w):
        raise ImageError(f"{name}: image data is truncated or corrupt")
    if arr.dtype == np.uint8:
        depth, scale = 8, 255.0
    elif arr.dtype == np.uint16:
        depth, scale = 16, 65535.0
    else:
        raise ImageError(f"{name}: unsupported sample type {arr.dtype}")
    arr = arr.reshape(h, w, -1)
    gray = arr.shape[2] <= 2  # gray, or gray + alpha
    alpha = arr[..., -1].astype(np.float32) / scale if arr.shape[2] in (2, 4) else None
    if gray:
        colour = arr[..., :1]
    else:  # BGR(A) -> RGB; OpenCV's copy is ~20x faster than numpy's of a reversed view
        colour = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if np.dtype(dtype) == np.float32:
        colour = colour.astype(np.float32) / scale
    elif depth == 16:
        colour = (colour.astype(np.float32) / 257 + 0.5).astype(np.uint8)
    rgb = np.repeat(colour, 3, axis=2) if gray else colour
    rgb = _orient(np.ascontiguousarray(rgb), orientation)
    alpha = _orient(alpha, orientation) if alpha is not None else None
    return rgb, ImageInfo(gray, depth, alpha, tables)


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
