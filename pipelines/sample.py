"""The embedded LAION sample: what `make filter-laion` runs on when no real inputs are given.

Real photos shipped inside installed packages (scikit-image, plus scikit-learn's and
matplotlib's sample photos when those are installed), deliberately bad variants of them, a
loopback HTTP server that serves them, and LAION-schema metadata parquet whose URLs point at
that server. Every metadata row carries its expected fate in `manifest.json`:

    {"format": "diffbir-laion-sample/1",
     "base_url": "http://127.0.0.1:<port>", "slow_seconds": 30.0,
     "metadata": ["metadata/part-00000.parquet", "metadata/part-00001.parquet"],
     "stages": ["prefilter", "download", "quality", "dedup"],
     "rows": [{"row": 0, "part": 0, "hash": <LAION hash column>, "url": "...",
               "variant": "blur", "source": "astronaut", "file": "www/blur.jpg" | null,
               "served": "ok" | "slow" | "missing", "size": [w, h] | null,
               "fate": "kept" | "<stage>:<reason>", "duplicate_of": <hash> | null}, ...]}

A fate names the first stage, in `stages` order, that must reject the row, under the default
configs (download timeout below `slow_seconds`). `hash` is unique per row and travels with the
sample through img2dataset (save_additional_columns), so later stages can be matched to rows;
`duplicate_of` is the hash of the row that must survive instead: an image as large, of higher
JPEG quality (near duplicates are slight edits re-saved at quality 80-85), with a higher
AESTHETIC_SCORE and similarity; an exact duplicate (the same bytes at another URL) differs from
its original only in those metadata. Survivors are native photos at least 512 px on the short
side, never upscaled; degradations are strong enough to be unambiguous (Gaussian blur sigma 4,
JPEG quality 8, Gaussian noise sigma 30/255, a near-constant image).
"""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

FORMAT = "diffbir-laion-sample/1"
STAGES = ("prefilter", "download", "quality", "dedup")
SEED = 20240229
DRIP_BYTES = 1024  # piece size of the server's /drip/ route
# Photos in the scikit-image wheel (read as files: importing skimage.io takes seconds).
SKIMAGE_FILES = (
    "astronaut.png",
    "ihc.png",
    "coffee.png",
    "camera.png",
    "hubble_deep_field.jpg",
    "rocket.jpg",
    "retina.jpg",
)

# The columns LAION publishes (laion2B-en joined with its safety, watermark and aesthetic scores).
SCHEMA = pa.schema(
    [
        ("URL", pa.string()),
        ("TEXT", pa.string()),
        ("WIDTH", pa.int64()),
        ("HEIGHT", pa.int64()),
        ("similarity", pa.float64()),
        ("hash", pa.int64()),
        ("punsafe", pa.float32()),
        ("pwatermark", pa.float32()),
        ("AESTHETIC_SCORE", pa.float32()),
    ]
)


class SampleServer:
    """Threaded HTTP server on 127.0.0.1 (`port`, default ephemeral) for the files in `root`.

    `/img/<name>` answers at once, `/slow/<name>` only after `slow_seconds` (or drops the
    connection when the server stops), `/drip/<name>?seconds=S` sends the body without a
    Content-Length in pieces of DRIP_BYTES spread over S seconds (default `slow_seconds`), as a
    stalling server does; anything else is a 404. The content type follows the file extension,
    so an HTML page saved as `.jpg` is served as image/jpeg, as broken sites do. Use as a context
    manager; `base_url` is known as soon as it is constructed.
    """

    def __init__(self, root: str | Path, slow_seconds: float = 30.0, port: int = 0):
        self.root = Path(root)
        self.slow_seconds = slow_seconds
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sample-server", daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                route, _, name = url.path.lstrip("/").partition("/")
                path = server.root / name
                if route not in ("img", "slow", "drip") or "/" in name or not path.is_file():
                    self.send_error(404)
                    return
                if route == "slow" and server._stopping.wait(server.slow_seconds):
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", mimetypes.guess_type(name)[0] or "application/octet-stream")
                if route != "drip":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                seconds = float(parse_qs(url.query).get("seconds", [server.slow_seconds])[0])
                try:
                    if route == "drip":
                        self._drip(body, seconds)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out) first

            def _drip(self, body: bytes, seconds: float) -> None:
                pieces = [body[i : i + DRIP_BYTES] for i in range(0, len(body), DRIP_BYTES)]
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()
                    if server._stopping.wait(seconds / len(pieces)):
                        return

            def log_message(self, format, *args) -> None:  # noqa: A002
                pass  # one line per image would drown the pipeline's own output

        return Handler

    def __enter__(self) -> SampleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@dataclass(frozen=True)
class SampleManifest:
    """The sample on disk: `root`/manifest.json, `root`/metadata/*.parquet, `root`/www/."""

    root: Path
    base_url: str
    slow_seconds: float
    metadata: list[Path]
    rows: list[dict]

    @property
    def path(self) -> Path:
        return self.root / "manifest.json"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "base_url": self.base_url,
            "slow_seconds": self.slow_seconds,
            "metadata": [str(p.relative_to(self.root)) for p in self.metadata],
            "stages": list(STAGES),
            "rows": self.rows,
        }


def load_manifest(path: str | Path) -> SampleManifest:
    path = Path(path)
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    root = path.parent
    return SampleManifest(root, raw["base_url"], raw["slow_seconds"], [root / p for p in raw["metadata"]], raw["rows"])


@dataclass
class _Variant:
    name: str
    source: str
    fate: str
    body: bytes | None  # None: nothing is served (404), or the URL of `same_url_as`
    text: str
    claimed: tuple[int, int] | None = None  # WIDTH/HEIGHT the metadata states when there is no honest size
    route: str = "img"
    same_url_as: str | None = None
    duplicate_of: str | None = None
    meta: dict = field(default_factory=dict)  # overrides of the default LAION scores

    @property
    def size(self) -> tuple[int, int] | None:
        try:
            return Image.open(io.BytesIO(self.body)).size if self.body else None
        except OSError:
            return None


def _jpeg(img: np.ndarray | Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img))).save(
        buf, "JPEG", quality=quality
    )
    return buf.getvalue()


def _scaled(img: np.ndarray, factor: float) -> Image.Image:
    pil = Image.fromarray(img)
    return pil.resize((round(pil.width * factor), round(pil.height * factor)), Image.Resampling.LANCZOS)


def _package_file(dist: str, path: str) -> bytes | None:
    """A file shipped inside an installed distribution, or None when it is not installed (found
    through the distribution's metadata: importing scikit-learn or matplotlib takes seconds)."""
    try:
        return Path(distribution(dist).locate_file(path)).read_bytes()
    except (PackageNotFoundError, FileNotFoundError):
        return None


def _watermarked(img: np.ndarray) -> Image.Image:
    pil = Image.fromarray(img).convert("RGBA")
    overlay = Image.new("RGBA", pil.size)
    draw = ImageDraw.Draw(overlay)
    font = ImageFont.load_default(size=pil.width // 12)
    for y in range(0, pil.height, pil.height // 5):
        draw.text((pil.width // 10, y), "© STOCKPHOTO  preview", font=font, fill=(255, 255, 255, 150))
    return Image.alpha_composite(pil, overlay).convert("RGB")


def _variants() -> list[_Variant]:
    rng = np.random.default_rng(SEED)
    skimage = {name: _package_file("scikit-image", f"skimage/data/{name}") for name in SKIMAGE_FILES}
    astronaut, ihc, coffee, camera, hubble = (
        np.asarray(Image.open(io.BytesIO(skimage[name])))
        for name in ("astronaut.png", "ihc.png", "coffee.png", "camera.png", "hubble_deep_field.jpg")
    )
    astronaut_jpg, ihc_jpg, hubble_jpg = _jpeg(astronaut), _jpeg(ihc), skimage["hubble_deep_field.jpg"]
    grace = _package_file("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg")
    china = _package_file("scikit-learn", "sklearn/datasets/images/china.jpg")
    flower = _package_file("scikit-learn", "sklearn/datasets/images/flower.jpg")
    html = b"<!doctype html><html><head><title>Moved</title></head><body><p>This image has moved.</p></body></html>"
    camera_jpg = _jpeg(camera)
    blurred = Image.fromarray(astronaut).filter(ImageFilter.GaussianBlur(4))
    noisy = np.clip(astronaut + rng.normal(0, 30, astronaut.shape), 0, 255).astype(np.uint8)
    camera_edit = ImageEnhance.Brightness(Image.open(io.BytesIO(camera_jpg))).enhance(1.04)
    flat = np.clip(200 + rng.normal(0, 1, (768, 768, 3)), 0, 255).astype(np.uint8)
    banner = np.hstack([astronaut, ihc, astronaut[:, ::-1], ihc[:, ::-1]])
    best, dup = {"aesthetic": 6.2, "similarity": 0.36}, {"aesthetic": 5.4, "similarity": 0.31}
    V = _Variant
    # Native photos at least 512 px on the short side, sharp, clean, well exposed: what must
    # survive. (The Hubble deep field is sharp but mostly black: a filter may fairly call it
    # underexposed, so it only appears where the metadata rejects it.)
    kept = [
        V("astronaut", "astronaut", "kept", astronaut_jpg, "Astronaut Eileen Collins in her spacesuit", meta=best),
        V("ihc", "ihc", "kept", ihc_jpg, "Immunohistochemistry stained tissue, microscope", meta=best),
        V("camera", "camera", "kept", camera_jpg, "Black and white photo of a cameraman", meta=best),
    ]
    if grace:
        kept.append(V("grace_hopper", "grace_hopper", "kept", grace, "Rear admiral Grace Hopper", meta=best))
    download = [
        V("missing", "-", "download:http_404", None, "Sunset over the harbour", claimed=(1024, 768)),
        V("slow", "astronaut", "download:timeout", _jpeg(astronaut[:, ::-1]), "Astronaut, mirrored", route="slow"),
        V("html", "-", "download:decode_error", html, "Mountain lake at dawn", claimed=(1024, 768)),
        V("truncated", "ihc", "download:decode_error", ihc_jpg[: len(ihc_jpg) * 3 // 5], "Tissue (broken upload)"),
        # LAION's WIDTH/HEIGHT are sometimes wrong: these claim twice their real, too small, size.
        V("coffee_mislabelled", "coffee", "download:too_small", _jpeg(coffee), "A cup of coffee", claimed=(1200, 800)),
    ]
    if china:
        download.append(
            V("china_mislabelled", "china", "download:too_small", china, "Temple roofs", claimed=(1280, 854))
        )
    quality = [
        V("blur", "astronaut", "quality:blur", _jpeg(blurred), "Astronaut portrait, soft focus"),
        V("jpeg", "ihc", "quality:jpeg", _jpeg(ihc, quality=8), "Tissue micrograph, heavily compressed"),
        V("noise", "astronaut", "quality:noise", _jpeg(noisy), "Astronaut portrait, grainy"),
        V("flat", "-", "quality:flat", _jpeg(flat), "Plain light grey background"),
    ]
    dedup = [
        V(
            "astronaut_copy",
            "astronaut",
            "dedup:exact",
            astronaut_jpg,
            "Astronaut, mirrored site",
            duplicate_of="astronaut",
            meta=dup,
        ),
        V("camera_near", "camera", "dedup:near", _jpeg(camera_edit, 85), "Cameraman", duplicate_of="camera", meta=dup),
        V(
            "ihc_near",
            "ihc",
            "dedup:near",
            _jpeg(Image.open(io.BytesIO(ihc_jpg)), 80),
            "Tissue",
            duplicate_of="ihc",
            meta=dup,
        ),
    ]
    # Rejected on metadata alone (never downloaded); the served files are honest all the same.
    prefilter = [
        V("astronaut_small", "astronaut", "prefilter:min_side", _jpeg(_scaled(astronaut, 0.5)), "Astronaut thumbnail"),
        V("rocket", "rocket", "prefilter:min_side", skimage["rocket.jpg"], "A rocket on the launch pad"),
        V("banner", "astronaut+ihc", "prefilter:aspect_ratio", _jpeg(banner), "Wide banner of four pictures"),
        V(
            "watermarked",
            "hubble",
            "prefilter:watermark",
            _jpeg(_watermarked(hubble)),
            "Stock photo",
            meta={"pwatermark": 0.93},
        ),
        V(
            "nsfw",
            "ihc",
            "prefilter:nsfw",
            _jpeg(np.rot90(ihc, 2)),
            "Stands in for an unsafe picture",
            meta={"punsafe": 0.97},
        ),
        V("low_aesthetic", "hubble", "prefilter:aesthetic", hubble_jpg, "Galaxies", meta={"aesthetic": 3.2}),
        V(
            "unscored",
            "retina",
            "prefilter:invalid_punsafe",
            skimage["retina.jpg"],
            "Retina fundus",
            meta={"punsafe": None},
        ),
        V(
            "astronaut_again",
            "astronaut",
            "prefilter:duplicate_url",
            None,
            "astronaut",
            same_url_as="astronaut",
            duplicate_of="astronaut",
            meta=dup,
        ),
    ]
    if flower:
        prefilter.append(V("flower", "flower", "prefilter:min_side", flower, "Close-up of a flower"))
    # Part 0 begins with the original of the duplicate URL, part 1 ends with it: dedup must work across files.
    return kept + download + quality + dedup + prefilter


def _row_hash(url: str, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{url}\t{text}".encode(), digest_size=8).digest(), "little", signed=True)


def build_sample(root: str | Path, base_url: str, slow_seconds: float = 30.0) -> SampleManifest:
    """Write the sample under `root` (www/ files, metadata/ parquet, manifest.json) with URLs
    under `base_url`; `slow_seconds` is what the server at `base_url` delays /slow/ answers by."""
    root = Path(root)
    www, meta_dir = root / "www", root / "metadata"
    for d in (www, meta_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
    variants = _variants()
    by_name = {v.name: v for v in variants}
    urls, hashes, files, rows, records = {}, {}, {}, [], []
    half = len(variants) // 2
    for i, v in enumerate(variants):
        file = files.get(v.same_url_as)
        if v.body is not None:
            file = www / f"{v.name}.jpg"
            file.write_bytes(v.body)
        url = urls[v.same_url_as] if v.same_url_as else f"{base_url}/{v.route}/{v.name}.jpg"
        urls[v.name], hashes[v.name], files[v.name] = url, _row_hash(url, v.text), file
        size = by_name[v.same_url_as].size if v.same_url_as else v.size
        width, height = v.claimed or size
        scores = {"similarity": 0.33, "punsafe": 0.02, "pwatermark": 0.08, "aesthetic": 5.5, **v.meta}
        records.append(
            {
                "URL": url,
                "TEXT": v.text,
                "WIDTH": width,
                "HEIGHT": height,
                "similarity": scores["similarity"],
                "hash": hashes[v.name],
                "punsafe": scores["punsafe"],
                "pwatermark": scores["pwatermark"],
                "AESTHETIC_SCORE": scores["aesthetic"],
            }
        )
        served = "slow" if v.route == "slow" else "ok" if file else "missing"
        rows.append(
            {
                "row": i,
                "part": int(i >= half),
                "hash": hashes[v.name],
                "url": url,
                "variant": v.name,
                "source": v.source,
                "file": str(file.relative_to(root)) if file else None,
                "served": served,
                "size": list(size) if size else None,
                "fate": v.fate,
                "duplicate_of": hashes[v.duplicate_of] if v.duplicate_of else None,
            }
        )
    metadata = [meta_dir / "part-00000.parquet", meta_dir / "part-00001.parquet"]
    for path, part in zip(metadata, (records[:half], records[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), path)
    manifest = SampleManifest(root, base_url, slow_seconds, metadata, rows)
    manifest.path.write_text(json.dumps(manifest.to_json(), indent=1))
    return manifest


@contextmanager
def embedded_sample(root: str | Path, slow_seconds: float = 30.0, port: int = 0) -> Iterator[SampleManifest]:
    """Build the sample under `root` and serve it on 127.0.0.1:`port` for the duration of the block.

    With port 0, a rerun over the same `root` (resuming a killed pipeline) serves on the port the sample had:
    its URLs, and with them the rows' hashes and the prefilter's order, stay the same, so
    finished download shards hold exactly the rows the rerun would have put there."""
    previous = Path(root) / "manifest.json"
    if not port and previous.is_file():
        port = urlsplit(load_manifest(previous).base_url).port
    try:
        server = SampleServer(Path(root) / "www", slow_seconds, port)
    except OSError as e:
        raise RuntimeError(
            f"cannot serve the sample on 127.0.0.1:{port} ({e}): free the port (a rerun needs the "
            "one it had before) or use another port / a new output directory"
        ) from e
    with server:
        yield build_sample(root, server.base_url, slow_seconds)
