"""Download the prefiltered LAION rows with img2dataset, one Ray task per fixed-size shard.

Output, in img2dataset's webdataset layout: `{shard:05d}.tar` ({key}.jpg with the original bytes,
{key}.txt, {key}.json), `{shard:05d}.parquet` (one row per input row, with status and
error_message) and `{shard:05d}_stats.json`; plus `_plan.json` (shard size and row count).

Shard i holds rows [i*shard_size, (i+1)*shard_size) of the input files taken in name order, so
a rerun over the same input makes the same shards. Each task downloads into its own directory
under `_tmp/` and then moves the tar, the parquet and, last, the stats into place: a shard is
finished exactly when its `_stats.json` exists, and a tar or parquet in the output directory is
always complete. A run first deletes `_tmp/` and any tar or parquet whose stats are missing
(leftovers of a killed run), skips finished shards and downloads the rest; a failed shard is
retried by Ray (`shard_retries`), and one that still fails is recorded in the result while the
others finish: a rerun downloads only the shards that are not finished.

Every URL is bounded: `timeout` per socket operation, `deadline` for the whole request (a server
that drips bytes ends there), `max_bytes` of body (reading stops past it) and `max_image_area`
declared in the image header (checked before decoding). A URL over a bound fails with its reason;
it never fails its shard.

img2dataset's own `download()` numbers the shards of every call from 0 (so per-shard calls would
all write keys 000000000...) and starts two extra processes per call; the tasks therefore drive
its Reader, Resizer and Downloader directly with the shard's real id, as `download()` would.
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
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from img2dataset import downloader as img2dataset_downloader
from img2dataset.downloader import Downloader, is_disallowed
from img2dataset.reader import Reader
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from pipelines.prefilter import parquet_files
from pipelines.ray_env import ensure_ray

log = logging.getLogger(__name__)

OOM_SHARD_COUNT = 5  # digits of the shard number in file names and keys, as img2dataset's default
_DONE = "_stats.json"
_PIL_REFUSES_PIXELS = 2 * 89_478_485  # Pillow's Image.open raises DecompressionBombError above this
_DEADLINE_ERROR = "no complete response within the deadline"
_BODY_ERROR = "response body over the size limit"
_AREA_ERROR = "image area too large"  # img2dataset's own message for max_image_area


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


@dataclass(frozen=True)
class ShardStats:
    shard: int
    count: int
    successes: int
    failures: dict[str, int]  # failure_reason -> rows
    duration: float  # seconds the shard's download took (one CPU)
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
        """The finished shards' tars (what the next stage reads), in shard order."""
        return [f"{self.output_dir.rstrip('/')}/{s.shard:0{OOM_SHARD_COUNT}d}.tar" for s in self.shards]

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def successes(self) -> int:
        return sum(s.successes for s in self.shards)

    @property
    def failures(self) -> dict[str, int]:
        total = Counter()
        for s in self.shards:
            total.update(s.failures)
        return dict(sorted(total.items()))

    @property
    def images_per_s_per_core(self) -> float:
        """Successes per CPU-second of shard tasks (each holds one CPU): the benchmark's rate."""
        busy = sum(s.duration for s in self.shards)
        return self.successes / busy if busy else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "count": self.count,
            "successes": self.successes,
            "failed_rows": self.failed_rows,
            "failures": self.failures,
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
# gives it a Resizer that reads the header first (`_HeaderCheckedResizer`).


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


class _HeaderCheckedResizer(Resizer):
    """img2dataset's Resizer, refusing an image whose header declares more than `max_image_area`
    pixels before anything decodes it (PIL's open reads only the header)."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            with Image.open(img_stream) as img:
                too_large = img.width * img.height > self.max_image_area
        except Image.DecompressionBombError:
            too_large = True
        except Exception:  # noqa: BLE001 - not a format PIL reads: cv2 decides, as before
            too_large = False
        if too_large:
            return None, None, None, None, None, _AREA_ERROR
        img_stream.seek(0)
        return super().__call__(img_stream, blurring_bbox_list)


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
    name = f"{shard:0{OOM_SHARD_COUNT}d}"
    with fs.open(f"{folder}/{name}{_DONE}") as f:
        stats = json.load(f)
    with fs.open(f"{folder}/{name}.parquet", "rb") as f:
        rows = pq.read_table(f, columns=["status", "error_message"]).to_pylist()
    failures = Counter(failure_reason(r["error_message"] or "") for r in rows if r["status"] != "success")
    return ShardStats(
        shard, stats["count"], stats["successes"], dict(sorted(failures.items())), stats["duration"], resumed
    )


@ray.remote
def _download_shard(
    shard: int, pieces: list[tuple[str, int, int]], input_fs, output_dir: str, config: DownloadConfig
) -> str:
    """Download one shard into a fresh directory under `_tmp` and return its path; the driver
    commits it (`_commit_shard`), so that a task orphaned by a killed driver can never finish a
    shard behind a rerun's back."""
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
        resizer = _HeaderCheckedResizer(
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
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter,
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
    """Resuming is only sound over the same input cut the same way: refuse another shard size
    or row count. (Same-sized different content is not detected, as in img2dataset.)"""
    if not fs.exists(path):
        fs.pipe_file(path, json.dumps(plan).encode())
    elif (old := json.loads(fs.cat_file(path))) != plan:
        raise ValueError(
            f"{fs.unstrip_protocol(path)}: this output holds shards of another input or shard size "
            f"({old}, now {plan}); use a new output directory"
        )


def _one_line(err: ray.exceptions.RayError) -> str:
    """A failed task's own exception (not Ray's traceback around it), for the report."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text[:300]}"


def download(
    inputs: str | Path | Sequence[str | Path], output_dir: str | Path, config: DownloadConfig | None = None
) -> DownloadResult:
    """Download the rows of the prefiltered parquet `inputs` (files, directories, globs or
    fsspec URLs) into webdataset shards under `output_dir`, resuming an earlier run there.
    A shard that still fails after its retries is logged and listed in the result's `failed`
    while the others finish; a rerun downloads only it. Returns per-shard and total stats, with
    the per-core download rate."""
    config = config or DownloadConfig()
    started = time.monotonic()
    input_fs, paths = parquet_files(inputs)
    shards = plan_shards(input_fs, paths, config.shard_size)
    fs, out = fsspec.core.url_to_fs(str(output_dir))
    fs.makedirs(out, exist_ok=True)
    rows = sum(stop - start for shard in shards for _, start, stop in shard)
    _check_plan(fs, f"{out}/_plan.json", {"shard_size": config.shard_size, "rows": rows})
    done = _finished_shards(fs, out)
    ensure_ray()

    remote = _download_shard.options(max_retries=config.shard_retries, retry_exceptions=True, num_cpus=1)
    pending = {
        remote.remote(i, pieces, input_fs, str(output_dir), config): i
        for i, pieces in enumerate(shards)
        if i not in done
    }
    stats = {i: _shard_stats(fs, out, i, resumed=True) for i in done if i < len(shards)}
    failed = []
    with tqdm(total=len(shards), initial=len(stats), desc="download shards", unit="shard") as bar:
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
        "download: %d of %d images in %d shards (%d failed: rerun to retry them); failures %s; %.1f images/s per core",
        result.successes,
        result.count,
        len(result.shards),
        len(result.failed),
        result.failures,
        result.images_per_s_per_core,
    )
    return result
