"""What a request may bring and ask for, checked before any work is spent on it.

Every refusal is an ApiError, which the app answers as JSON
`{"error": <code>, "message": <text>[, "field": <first bad field>, "errors": [...]]}`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import AsyncIterator, Mapping

from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from diffbir.faces import check_landmarks
from diffbir.pipeline import RestoreOptions, canvas_size, plan_sizes
from diffbir.sampling.tiling import tile_starts
from serving.config import ServeConfig

# PIL's format names of what decode_image (OpenCV) reads -> their names for people (MPO: the
# multi-picture JPEGs of cameras); anything else is refused before decoding
SUPPORTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF"}
FORMAT_NAMES = list(dict.fromkeys(SUPPORTED_FORMATS.values()))
OUTPUT_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}  # preference order


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, errors: list[dict] | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors or []
        self.headers = headers

    def body(self) -> dict:
        first = {"field": self.errors[0]["field"], "errors": self.errors} if self.errors else {}
        return {"error": self.code, "message": self.message, **first}


def too_large(message: str) -> ApiError:
    return ApiError(413, "payload_too_large", message)


async def read_body(headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, refused as soon as its declared or its received size passes `limit`."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(f"request body of {int(declared):,} bytes exceeds the limit of {limit:,}")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:  # chunked uploads declare no length
            raise too_large(f"request body exceeds the limit of {limit:,} bytes")
    return bytes(body)


def check_image_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the image header alone, PIL's lazy open: a decompression bomb is
    refused before a single pixel is decoded."""
    if not data:
        raise ApiError(422, "missing_image", "no image in the request (a raw body or a multipart 'file' field)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
    except Image.DecompressionBombError as e:
        raise too_large(f"image too large: {e}") from e
    except Exception as e:
        raise unsupported() from e
    if fmt not in SUPPORTED_FORMATS:
        raise unsupported(f"{fmt} images are not supported")
    if w * h > max_pixels:
        raise too_large(f"image of {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
    return w, h


def unsupported(message: str = "not an image in a supported format") -> ApiError:
    return ApiError(415, "unsupported_media_type", f"{message}; send {', '.join(FORMAT_NAMES)}")


def restore_options(fields: Mapping[str, str], defaults: Mapping) -> RestoreOptions:
    """RestoreOptions from the request's fields (strings, validated in pydantic's lax mode) over
    the server's defaults; 422 naming every bad field. The server's limits apply to the options
    the model's version preset completes (check_work)."""
    try:
        opts = RestoreOptions(**{**defaults, **fields})
    except ValidationError as e:
        errors = [{"field": _field(err), "message": err["msg"]} for err in e.errors()]
        raise ApiError(422, "invalid_option", "; ".join(f"{x['field']}: {x['message']}" for x in errors), errors) from e
    return opts


def _field(error: dict) -> str:
    """The field a pydantic error is about; a cross-field check (no location) is about the
    fields its message names (tile_size/tile_stride)."""
    if error["loc"]:
        return ".".join(map(str, error["loc"]))
    return ",".join(f for f in RestoreOptions.model_fields if f in error["msg"]) or "options"


def check_work(width: int, height: int, opts: RestoreOptions, cfg: ServeConfig) -> None:
    """Every option that scales the cost of restoring a width x height input, within the server's
    limits: 422 naming the first field over its limit. `opts`: as the run will use them (the
    model's version preset applied), so a preset's steps count too."""
    if opts.steps > cfg.max_steps:
        raise invalid("steps", f"at most {cfg.max_steps} on this server")
    if opts.guidance_repeat > cfg.max_guidance_repeat:
        raise invalid("guidance_repeat", f"at most {cfg.max_guidance_repeat} on this server")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(opts, name)) > cfg.max_prompt_chars:
            raise invalid(name, f"at most {cfg.max_prompt_chars:,} characters on this server")
    if opts.max_faces > cfg.max_faces:
        raise invalid("max_faces", f"at most {cfg.max_faces} on this server")
    if opts.landmarks is not None:
        try:
            check_landmarks(opts.landmarks, height, width)
        except ValueError as e:
            raise invalid("landmarks", str(e).removeprefix("landmarks: ")) from e
    if opts.scale > cfg.max_upscale:
        raise invalid("upscale", f"at most {cfg.max_upscale:g} on this server")
    if opts.tile_size > cfg.max_tile_size:
        raise invalid("tile_size", f"at most {cfg.max_tile_size} on this server")
    (oh, ow), (wh, ww) = plan_sizes(height, width, opts.scale, opts.min_side)
    if oh * ow > cfg.max_output_pixels:
        message = f"a {width}x{height} input gives {ow}x{oh}, over the limit of {cfg.max_output_pixels:,} output pixels"
        raise invalid("upscale", message)
    if wh * ww > cfg.max_work_pixels:
        message = f"a {width}x{height} input is restored at {ww}x{wh}, over the limit of {cfg.max_work_pixels:,} pixels"
        raise invalid("min_side" if (wh, ww) != (oh, ow) else "upscale", message)
    check_tiles(canvas_size(height, width, opts), opts, cfg)


def check_tiles(canvas: tuple[int, int], opts: RestoreOptions, cfg: ServeConfig) -> None:
    """An untiled canvas is one model call over all of it (memory: at most max_tile_size a side);
    a tiled one is a call per tile (time: at most max_tiles of them)."""
    ch, cw = canvas
    tiled = opts.tiled if opts.tiled is not None else max(canvas) > opts.tile_size
    if not tiled:
        if max(canvas) > cfg.max_tile_size:
            message = f"a {cw}x{ch} canvas is over {cfg.max_tile_size} a side, restore it tiled"
            raise invalid("tiled", message)
        return
    rows, columns = (len(tile_starts(side, opts.tile_size, opts.tile_stride)) for side in canvas)
    tiles = rows * columns
    if tiles > cfg.max_tiles:
        message = (
            f"tile_size {opts.tile_size} at stride {opts.tile_stride} is {tiles:,} tiles over a {cw}x{ch} canvas, "
            f"over the limit of {cfg.max_tiles:,}; raise tile_stride"
        )
        raise invalid("tile_stride", message)


def invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_option", f"{field}: {message}", [{"field": field, "message": message}])


def negotiate(accept: str | None) -> str:
    """The output media type for an Accept header: each type takes the q of its most specific
    matching range (image/png, then image/*, then */*); the highest q wins, ties go to the first
    of OUTPUT_TYPES (PNG). No header means PNG; nothing acceptable is a 406."""
    if not accept or not accept.strip():
        return next(iter(OUTPUT_TYPES))
    ranges: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = next((_float(p[2:]) for p in params if p.startswith("q=")), 1.0)
        ranges[media.lower()] = max(q, ranges.get(media.lower(), 0.0))

    def quality(media: str) -> float:
        return next((ranges[r] for r in (media, media.split("/")[0] + "/*", "*/*") if r in ranges), 0.0)

    best = max(OUTPUT_TYPES, key=quality)  # the first of equals
    if quality(best) <= 0:
        raise ApiError(406, "not_acceptable", f"cannot answer {accept!r}; available: {', '.join(OUTPUT_TYPES)}")
    return best


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


async def split_upload(headers: Mapping[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
    """(image bytes, option fields): a multipart form's `file` and its other fields, or the
    raw body and no fields."""
    if not headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body, {}

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(Headers(headers), stream(), max_files=1).parse()
    except MultiPartException as e:
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e.message}") from e
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise ApiError(
            422, "missing_image", "no 'file' field with the image", [{"field": "file", "message": "required"}]
        )
    fields = {k: v for k, v in form.multi_items() if k != "file" and isinstance(v, str)}
    return await file.read(), fields
