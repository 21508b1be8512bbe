"""The streaming pass from URL to candidate: one Ray task per fixed-size shard of the
prefiltered LAION rows downloads them with img2dataset, decodes and size-checks them, scores and
judges each batch of downloaded images as it arrives (`pipelines.quality`) and writes only the
images that pass. Nothing stores the rejected majority.

Output per shard: `{shard:05d}.tar`, the candidates in img2dataset's webdataset layout ({key}.jpg
with the original bytes, {key}.txt, {key}.json); `{shard:05d}.parquet`, the fate of every input
row (FATE_SCHEMA: url, key, status `failed`/`rejected`/`kept`, reason, the scores where measured;
a kept row is a `pipelines.quality.SCORED_SCHEMA` record pointing at its bytes in the tar, which
is what dedup and the shard writer take); `{shard:05d}_stats.json` (img2dataset's counts and
duration); plus `_plan.json` (shard size, row count and the quality thresholds).

Shard i holds rows [i*shard_size, (i+1)*shard_size) of the input files taken in name order, so
a rerun over the same input makes the same shards. Each task writes into its own directory
under `_tmp/` and the driver then moves the tar, the parquet and, last, the stats into place: a
shard is finished exactly when its `_stats.json` exists, and a tar or parquet in the output
directory is always complete. A run first deletes `_tmp/` and any tar or parquet whose stats are
missing (leftovers of a killed run), skips finished shards and does the rest; a failed shard is
retried by Ray (`shard_retries`), and one that still fails is recorded in the result while the
others finish: a rerun does only the shards that are not finished.

Every URL is bounded: `timeout` per socket operation, `deadline` for the whole request (a server
that drips bytes ends there), `max_bytes` of body (reading stops past it) and `max_image_area`
declared in the image header (checked before decoding). A URL over a bound fails with its reason;
it never fails its shard.

img2dataset's own `download()` numbers the shards of every call from 0 (so per-shard calls would
all write keys 000000000...) and starts two extra processes per call; the tasks therefore drive
its Reader, Resizer and Downloader directly with the shard's real id, as `download()` would, and
give the Downloader `_CandidateWriter` as its sample writer: img2dataset calls it with every row
(the image bytes, or the error) as its download threads finish them.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import json
import logging
import re
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import albumentations as A
import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from img2dataset import downloader as img2dataset_downloader
from img2dataset.downloader import Downloader, is_disallowed
from img2dataset.reader import Reader
from img2dataset.resizer import ResizeMode, Resizer
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from diffbir.image_io import decode_image
from pipelines.prefilter import parquet_files
from pipelines.quality import SCORED_SCHEMA, Decoded, QualityConfig, score_rows
from pipelines.ray_env import ensure_ray
from pipelines.tars import TarAppender

log = logging.getLogger(__name__)

OOM_SHARD_COUNT = 5  # digits of the shard number in file names and keys, as img2dataset's default
_DONE = "_stats.json"
_PIL_REFUSES_PIXELS = 2 * 89_478_485  # Pillow's Image.open raises DecompressionBombError above this
_DEADLINE_ERROR = "no complete response within the deadline"
_BODY_ERROR = "response body over the size limit"
_AREA_ERROR = "image area too large"  # img2dataset's own message for max_image_area
# the fate of every input row: its candidate record (SCORED_SCHEMA; `reason` is the download
# failure or the first failed quality check) plus where it came from and what became of it
FATE_SCHEMA = pa.schema([("url", pa.string()), ("status", pa.string()), *SCORED_SCHEMA])
FAILED, REJECTED, KEPT = "failed", "rejected", "kept"  # a FATE_SCHEMA row's status


class DownloadConfig(BaseModel):
    """How img2dataset downloads. Defaults suit LAION at scale; tests shrink shards and timeout."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(10_000, ge=1, description="input rows per shard (= per output tar)")
    thread_count: int = Field(64, ge=1, description="download threads in each shard task")
    timeout: float = Field(10.0, gt=0, description="seconds one socket operation (connect, a read) may wait")
    deadline: float = Field(
        30.0, gt=0, description="seconds one URL's request may take in all (a slow drip ends there): fails as deadline"
    )
    max_bytes: int = Field(
        32 * 2**20, ge=1, description="a response body larger than this fails as body_too_large (reading stops there)"
    )
    max_image_area: int = Field(
        64_000_000,
        ge=1,
        le=_PIL_REFUSES_PIXELS,
        description="images whose header declares more pixels fail as too_large, before they are decoded",
    )
    retries: int = Field(0, ge=0, description="img2dataset's retries of a failed URL")
    shard_retries: int = Field(2, ge=0, description="Ray retries of a shard task that raised or died")
    max_short_side: int | None = Field(
        1024,
        ge=1,
        description="images whose short side exceeds it are downscaled to it (img2dataset keep_ratio, "
        "resize_only_if_bigger) and re-encoded; the others keep their original bytes. None: never resize",
    )
    min_side: int = Field(512, ge=0, description="decoded images with a shorter short side fail as too_small")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="decoded images more elongated fail as aspect_ratio")
    encode_format: Literal["jpg", "png", "webp"] = Field(
        "jpg", description="format of the stored images; sources already in it are stored byte for byte"
    )
    encode_quality: int = Field(95, ge=0, le=100, description="quality of images that must be re-encoded")
    url_col: str = "URL"
    caption_col: str = "TEXT"
    user_agent_token: str | None = Field(None, description="added to the User-Agent; X-Robots-Tag rules for it apply")
    score_batch: int = Field(
        16, ge=1, le=1024, description="downloaded images scored together (held in memory until then)"
    )


@dataclass(frozen=True)
class ShardStats:
    shard: int
    count: int
    successes: int  # downloaded and decoded within the size checks (then scored)
    duration: float  # seconds the shard's download and scoring took (one CPU)
    resumed: bool = False  # finished by an earlier run


@dataclass(frozen=True)
class FailedShard:
    shard: int
    rows: int
    error: str  # the last attempt's exception, in one line


@dataclass(frozen=True)
class DownloadResult:
    output_dir: str
    shards: list[ShardStats]  # the finished ones
    wall_time: float
    failed: list[FailedShard] = field(default_factory=list)  # still failing after their retries: rerun

    @property
    def failed_rows(self) -> int:
        return sum(f.rows for f in self.failed)

    @property
    def tars(self) -> list[str]:
        """The finished shards' candidate tars, in shard order."""
        return [f"{self.output_dir.rstrip('/')}/{s.shard:0{OOM_SHARD_COUNT}d}.tar" for s in self.shards]

    @property
    def fates(self) -> list[str]:
        """The finished shards' fate parquets (FATE_SCHEMA), in shard order."""
        return [f"{self.output_dir.rstrip('/')}/{s.shard:0{OOM_SHARD_COUNT}d}.parquet" for s in self.shards]

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def successes(self) -> int:
        return sum(s.successes for s in self.shards)

    @property
    def images_per_s_per_core(self) -> float:
        """Downloaded images per CPU-second of shard tasks (each holds one CPU; they score too)."""
        busy = sum(s.duration for s in self.shards)
        return self.successes / busy if busy else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "count": self.count,
            "successes": self.successes,
            "failed_rows": self.failed_rows,
            "images_per_s_per_core": self.images_per_s_per_core,
        }


_MESSAGES = {
    "Image decoding error": "decode_error",
    "image too small": "too_small",
    "aspect ratio too large": "aspect_ratio",
    _AREA_ERROR: "too_large",
}
_PREFIXES = {_DEADLINE_ERROR: "deadline", _BODY_ERROR: "body_too_large"}


def failure_reason(message: str) -> str:
    """img2dataset's error_message, as a category: http_<code>, timeout, deadline, body_too_large,
    decode_error, too_small, aspect_ratio, too_large, connection_error or other."""
    if m := re.search(r"HTTP Error (\d{3})", message):
        return f"http_{m.group(1)}"
    for prefix, reason in _PREFIXES.items():
        if message.startswith(prefix):
            return reason
    if "timed out" in message:
        return "timeout"
    if message in _MESSAGES:
        return _MESSAGES[message]
    return "connection_error" if message.startswith("<urlopen error") else "other"


# ---------------------------------------------------------------------------------------------
# Bounded fetching. img2dataset 1.47 fetches each URL with `urlopen(url, timeout)`, which bounds
# every socket operation but not the request (a server that sends a byte a second never times
# out), reads the whole body whatever its size, and checks max_image_area only after cv2 decoded
# the image (a small file can declare 30000² pixels). Its Downloader has no hook for any of this:
# the shard task swaps the module's `download_image` for `fetch_image` (`_bounded_fetching`) and
# gives it a Resizer that reads the header first (`_DecodingResizer`).


class _Deadline:
    """The end of one URL's time: shuts down the sockets of its connections, which wakes a read
    blocked on a server that drips (or sends nothing)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


class _WatchedConnection:
    """Registers the connection's socket with the request's deadline (redirects open more)."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self._deadline.watch(self.sock)


class _HTTPConnection(_WatchedConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, deadline=self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self._deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self._deadline), req, context=self._context)


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    """The body, or ValueError as soon as it is known to exceed `max_bytes`."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ValueError(f"{_BODY_ERROR} ({declared} > {max_bytes} bytes, declared)")
    chunks, size = [], 0
    while chunk := response.read1(2**16):  # at most one socket read: returns as bytes trickle in
        size += len(chunk)
        if size > max_bytes:
            raise ValueError(f"{_BODY_ERROR} (more than {max_bytes} bytes)")
        chunks.append(chunk)
    if response.length:  # read1 ends quietly where the server closed early
        raise http.client.IncompleteRead(b"".join(chunks), response.length)
    return b"".join(chunks)


# img2dataset's User-Agent (its download_image builds it inline)
_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def fetch_image(
    row: tuple[int, str],
    timeout: float,
    user_agent_token: str | None,
    disallowed_header_directives,
    *,
    deadline: float,
    max_bytes: int,
) -> tuple[int, io.BytesIO | None, str | None]:
    """img2dataset's `download_image` (same arguments and result: key, body stream or None,
    error message or None) with the request bounded by `deadline` seconds and the body by
    `max_bytes`. Never raises: a failure is the URL's error message."""
    key, url = row
    agent = _USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    request = urllib.request.Request(url, headers={"User-Agent": agent})
    with _Deadline(deadline) as clock:
        try:
            opener = urllib.request.build_opener(_HTTPHandler(clock), _HTTPSHandler(clock))
            with opener.open(request, timeout=timeout) as response:
                if disallowed_header_directives and is_disallowed(
                    response.headers, user_agent_token, disallowed_header_directives
                ):
                    return key, None, "Use of image disallowed by X-Robots-Tag directive"
                body = _read_body(response, max_bytes)
        except Exception as err:  # noqa: BLE001 - every failure is the URL's, never the shard's
            return key, None, f"{_DEADLINE_ERROR} ({deadline:g} s)" if clock.expired else str(err)
    if clock.expired:  # the shut-down socket may have ended a body without a length
        return key, None, f"{_DEADLINE_ERROR} ({deadline:g} s)"
    return key, io.BytesIO(body), None


@contextlib.contextmanager
def _bounded_fetching(config: DownloadConfig) -> Iterator[None]:
    """img2dataset fetches every URL through its module's `download_image`: use `fetch_image`
    while a shard downloads. (A Ray worker runs one task at a time, so no other shard sees it.)"""
    original = img2dataset_downloader.download_image
    img2dataset_downloader.download_image = functools.partial(
        fetch_image, deadline=config.deadline, max_bytes=config.max_bytes
    )
    try:
        yield
    finally:
        img2dataset_downloader.download_image = original


class _DecodingResizer(Resizer):
    """img2dataset's Resizer as the pass configures it (keep_ratio, resize only if bigger, keep
    the original bytes when already in the stored format), decoding each image once: its own
    decodes with cv2 and drops the pixels, and decoding again for the quality measures cost ~13%
    of the pass. The header is read first (an image declaring more than `max_image_area` pixels
    is refused before anything decodes it), `decode_image` decodes (RGB, EXIF orientation
    applied), transparency is flattened onto white and images over `image_size` downscaled as
    img2dataset does; same failure messages. The pixels wait for the writer in `take`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._last: tuple[bytes, Decoded] | None = None

    def take(self, img_str: bytes) -> Decoded | None:
        """The pixels of the image this resizer returned last, if `img_str` is it (img2dataset
        hands each image to the writer right after resizing it, in one thread)."""
        last, self._last = self._last, None
        return last[1] if last is not None and last[0] is img_str else None

    def __call__(self, img_stream, blurring_bbox_list=None):
        self._last = None
        data = img_stream.read()
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > self.max_image_area:
                    return None, None, None, None, None, _AREA_ERROR
                fmt = (img.format or "").lower()
                fmt = "jpeg" if fmt == "mpo" else fmt  # MPO (phone photos) is a JPEG with more frames
            pixels, info = decode_image(data, dtype=np.uint8, max_pixels=self.max_image_area)
        except Image.DecompressionBombError:
            return None, None, None, None, None, _AREA_ERROR
        except Exception:  # noqa: BLE001 - PIL's many ways of saying "not an image"; the URL's failure, as in img2dataset
            return None, None, None, None, None, "Image decoding error"
        h, w = pixels.shape[:2]
        if min(h, w) < self.min_image_size:
            return None, None, None, None, None, "image too small"
        if max(h, w) / min(h, w) > self.max_aspect_ratio:
            return None, None, None, None, None, "aspect ratio too large"
        encode = not self.skip_reencode or fmt != self.what_ext or info.alpha is not None
        if info.alpha is not None:  # img2dataset's matting: transparent parts become white
            a = info.alpha[..., None]
            pixels = np.rint(a * pixels + 255 * (1 - a)).clip(0, 255).astype(np.uint8)
        if self.resize_mode != ResizeMode.no and min(h, w) > self.image_size:
            resize = A.SmallestMaxSize(max_size=self.image_size, interpolation=self.downscale_interpolation, p=1.0)
            pixels, encode = resize(image=pixels)["image"], True
        if encode:
            bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
            data = cv2.imencode(f".{self.encode_format}", bgr, params=self.encode_params)[1].tobytes()
        self._last = (data, Decoded(pixels, info.quantization))  # the source's tables: its compression history
        return data, pixels.shape[1], pixels.shape[0], w, h, None


class _CandidateWriter:
    """img2dataset's sample writer for the streaming pass. Rows arrive as the download threads
    finish them; every `batch` downloaded images are scored and judged together, those that
    pass go to the candidate tar `{shard}.tar` at once (their bytes are then dropped), and each
    row's fate to `{shard}.parquet`, sorted by key, on close. `source` is the URL the tar will
    have once committed: the candidate records point there."""

    def __init__(
        self,
        shard_id,
        output_folder,
        save_caption,
        oom_shard_count,
        schema,
        encode_format,
        *,
        quality,
        source,
        batch,
        decoded,
    ):
        self._fs, folder = fsspec.core.url_to_fs(output_folder)
        name = f"{shard_id:0{oom_shard_count}d}"
        self._parquet = f"{folder}/{name}.parquet"
        self._file = self._fs.open(f"{folder}/{name}.tar", "wb")
        self._tar = TarAppender(self._file)
        self._ext, self._quality, self._source, self._batch = encode_format, quality, source, batch
        self._decoded = decoded  # img_str → its pixels, from the resizer (None: decode again)
        self._pending: list[dict] = []  # downloaded, not yet scored
        self._fates: list[dict] = []

    def write(self, img_str, key, caption, meta) -> None:
        meta = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}
        if img_str is None:
            reason = failure_reason(meta["error_message"] or "")
            self._fates.append(
                dict.fromkeys(FATE_SCHEMA.names)
                | {"url": meta["url"], "key": key, "status": FAILED, "reason": reason, "reasons": [reason]}
                | {"error": meta["error_message"], "passed": False}
            )
            return
        self._pending.append(
            {
                "key": key,
                "source": self._source,
                "offset": None,  # set when written
                "size": len(img_str),
                "ext": self._ext,
                "image": img_str,
                "caption": "" if caption is None else str(caption),
                "meta": json.dumps(meta),
                "error": None,
                "url": meta["url"],
                "decoded": self._decoded(img_str),
            }
        )
        if len(self._pending) >= self._batch:
            self._score()

    def _score(self) -> None:
        decoded = [row.pop("decoded") for row in self._pending]
        for row, rec in zip(self._pending, score_rows(self._pending, self._quality, decoded=decoded)):
            rec["url"] = row["url"]
            if rec["passed"]:
                members = {row["ext"]: row["image"], "txt": row["caption"].encode(), "json": row["meta"].encode()}
                rec |= {"status": KEPT, "offset": self._tar.add(row["key"], members)[row["ext"]].offset}
            else:  # only the fate is kept
                rec |= {"status": REJECTED, "source": None, "caption": None, "meta": None}
            self._fates.append(rec)
        self._pending = []

    def close(self) -> None:
        self._score()
        self._tar.close()
        self._file.close()
        fates = pa.Table.from_pylist(sorted(self._fates, key=lambda r: r["key"]), schema=FATE_SCHEMA)
        with self._fs.open(self._parquet, "wb") as f:
            pq.write_table(fates, f)


def plan_shards(
    fs: fsspec.AbstractFileSystem, paths: Sequence[str], shard_size: int
) -> list[list[tuple[str, int, int]]]:
    """Split the rows of `paths` (in order) into shards of `shard_size`; a shard is a list of
    (path, start row, stop row) pieces, read from parquet footers only."""
    shards, current, room = [], [], shard_size
    for path in paths:
        with fs.open(path, "rb") as f:
            n = pq.ParquetFile(f).metadata.num_rows
        start = 0
        while start < n:
            stop = min(n, start + room)
            current.append((path, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                shards.append(current)
                current, room = [], shard_size
    return shards + [current] if current else shards


def _read_rows(fs: fsspec.AbstractFileSystem, pieces: list[tuple[str, int, int]]) -> pa.Table:
    """The rows of `pieces`, reading only the row groups that hold them."""
    tables = []
    for path, start, stop in pieces:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            groups, first, row = [], None, 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if row < stop and row + n > start:
                    groups.append(g)
                    first = row if first is None else first
                row += n
            tables.append(pf.read_row_groups(groups).slice(start - first, stop - start))
    return pa.concat_tables(tables)


def _shard_stats(fs: fsspec.AbstractFileSystem, folder: str, shard: int, resumed: bool = False) -> ShardStats:
    with fs.open(f"{folder}/{shard:0{OOM_SHARD_COUNT}d}{_DONE}") as f:
        stats = json.load(f)
    return ShardStats(shard, stats["count"], stats["successes"], stats["duration"], resumed)


@ray.remote
def _download_shard(
    shard: int,
    pieces: list[tuple[str, int, int]],
    input_fs,
    output_dir: str,
    config: DownloadConfig,
    quality: QualityConfig,
) -> str:
    """Download and score one shard into a fresh directory under `_tmp` and return its path;
    the driver commits it (`_commit_shard`), so that a task orphaned by a killed driver can
    never finish a shard behind a rerun's back."""
    cv2.setNumThreads(1)  # the task holds one CPU; OpenCV's threads would take the others'
    fs, out = fsspec.core.url_to_fs(output_dir)
    name = f"{shard:0{OOM_SHARD_COUNT}d}"
    tmp = f"{out}/_tmp/{name}-{uuid.uuid4().hex}"  # one directory per attempt: a retry never meets a half-written one
    fs.makedirs(tmp)
    tmp_url = fs.unstrip_protocol(tmp)
    try:
        table = _read_rows(input_fs, pieces)
        with fs.open(f"{tmp}/input.parquet", "wb") as f:
            pq.write_table(table, f)
        extra = [c for c in table.column_names if c not in (config.url_col, config.caption_col)]
        reader = Reader(
            f"{tmp_url}/input.parquet",
            "parquet",
            config.url_col,
            config.caption_col,
            None,
            None,
            extra,
            config.shard_size,
            set(),
            tmp_url,
            start_shard_id=shard,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the reader's progress chatter, per shard
            (job,) = list(reader)
        resize = config.max_short_side is not None
        resizer = _DecodingResizer(
            image_size=config.max_short_side or 0,
            resize_mode="keep_ratio" if resize else "no",
            resize_only_if_bigger=True,
            encode_quality=config.encode_quality,
            encode_format=config.encode_format,
            skip_reencode=True,
            min_image_size=config.min_side,
            max_image_area=config.max_image_area,
            max_aspect_ratio=config.max_aspect_ratio,
        )
        writer = functools.partial(
            _CandidateWriter,
            quality=quality,
            source=f"{output_dir.rstrip('/')}/{name}.tar",
            batch=config.score_batch,
            decoded=resizer.take,
        )
        downloader = Downloader(
            sample_writer_class=writer,
            resizer=resizer,
            thread_count=config.thread_count,
            save_caption=True,
            extract_exif=True,
            output_folder=tmp_url,
            column_list=reader.column_list,
            timeout=config.timeout,
            number_sample_per_shard=config.shard_size,
            oom_shard_count=OOM_SHARD_COUNT,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=config.encode_format,
            retries=config.retries,
            user_agent_token=config.user_agent_token,
            disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],  # img2dataset's default
        )
        with _bounded_fetching(config):
            downloader.download_shard(job)  # raises on a shard-level error, so that Ray retries
    except BaseException:
        fs.rm(tmp, recursive=True)
        raise
    return tmp


def _commit_shard(fs: fsspec.AbstractFileSystem, out: str, shard: int, tmp: str) -> ShardStats:
    name = f"{shard:0{OOM_SHARD_COUNT}d}"
    for suffix in (".tar", ".parquet", _DONE):  # the stats last: they mark the shard finished
        fs.mv(f"{tmp}/{name}{suffix}", f"{out}/{name}{suffix}")
    fs.rm(tmp, recursive=True)
    return _shard_stats(fs, out, shard)


_SHARD_FILE = re.compile(r"(\d+)(\.tar|\.parquet|_stats\.json)")


def _remove_attempts(fs: fsspec.AbstractFileSystem, out: str) -> None:
    """Delete `_tmp`, best effort: a task of a killed run may still be writing there (Ray stops
    a dead driver's tasks asynchronously); what it leaves is never read and goes next run."""
    try:
        if fs.exists(f"{out}/_tmp"):
            fs.rm(f"{out}/_tmp", recursive=True)
    except OSError as err:
        log.warning("could not clear %s/_tmp (%s); the next run will", out, err)


def _finished_shards(fs: fsspec.AbstractFileSystem, out: str) -> set[int]:
    """The shards with stats; deletes what unfinished runs left behind."""
    _remove_attempts(fs, out)
    files = {path: _SHARD_FILE.fullmatch(path.rsplit("/", 1)[-1]) for path in fs.ls(out, detail=False)}
    done = {int(m[1]) for m in files.values() if m and m[2] == _DONE}
    for path, m in files.items():
        if m and int(m[1]) not in done:
            fs.rm(path)
    return done


def _check_plan(fs: fsspec.AbstractFileSystem, path: str, plan: dict) -> None:
    """Resuming is only sound over the same input cut the same way and judged the same way:
    refuse another shard size, row count or thresholds. (Same-sized different content is not
    detected, as in img2dataset.)"""
    if not fs.exists(path):
        fs.pipe_file(path, json.dumps(plan).encode())
    elif (old := json.loads(fs.cat_file(path))) != plan:
        raise ValueError(
            f"{fs.unstrip_protocol(path)}: this output holds shards of another input, shard size or quality config "
            f"({old}, now {plan}); use a new output directory"
        )


def _one_line(err: ray.exceptions.RayError) -> str:
    """A failed task's own exception (not Ray's traceback around it), for the report."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text[:300]}"


def download(
    inputs: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    config: DownloadConfig | None = None,
    quality: QualityConfig | None = None,
) -> DownloadResult:
    """Download the rows of the prefiltered parquet `inputs` (files, directories, globs or
    fsspec URLs), score them with `quality` (its CPU checks: a learned scorer runs later, as
    `pipelines.quality.learned_iqa_stage`) and write the candidates and every row's fate under
    `output_dir`, resuming an earlier run there. A shard that still fails after its retries is
    logged and listed in the result's `failed` while the others finish; a rerun does only it.
    Returns per-shard and total stats, with the per-core rate."""
    config, quality = config or DownloadConfig(), quality or QualityConfig()
    started = time.monotonic()
    input_fs, paths = parquet_files(inputs)
    shards = plan_shards(input_fs, paths, config.shard_size)
    fs, out = fsspec.core.url_to_fs(str(output_dir))
    fs.makedirs(out, exist_ok=True)
    rows = sum(stop - start for shard in shards for _, start, stop in shard)
    thresholds = quality.model_dump(mode="json", exclude={"learned_iqa"})
    _check_plan(fs, f"{out}/_plan.json", {"shard_size": config.shard_size, "rows": rows, "quality": thresholds})
    done = _finished_shards(fs, out)
    ensure_ray()

    remote = _download_shard.options(max_retries=config.shard_retries, retry_exceptions=True, num_cpus=1)
    pending = {
        remote.remote(i, pieces, input_fs, str(output_dir), config, quality): i
        for i, pieces in enumerate(shards)
        if i not in done
    }
    stats = {i: _shard_stats(fs, out, i, resumed=True) for i in done if i < len(shards)}
    failed = []
    with tqdm(total=len(shards), initial=len(stats), desc="download+score shards", unit="shard") as bar:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                stats[i] = _commit_shard(fs, out, i, ray.get(ref))
            except ray.exceptions.RayError as err:
                failed.append(FailedShard(i, sum(stop - start for _, start, stop in shards[i]), _one_line(err)))
                log.warning("download shard %d failed after %d retries: %s", i, config.shard_retries, failed[-1].error)
            bar.update()
    _remove_attempts(fs, out)  # what is left there is from attempts that died
    result = DownloadResult(
        str(output_dir),
        [stats[i] for i in sorted(stats)],
        time.monotonic() - started,
        sorted(failed, key=lambda f: f.shard),
    )
    log.info(
        "download: %d of %d images in %d shards (%d failed: rerun to retry them); %.1f images/s per core",
        result.successes,
        result.count,
        len(result.shards),
        len(result.failed),
        result.images_per_s_per_core,
    )
    return result
