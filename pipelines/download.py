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
retried by Ray (`shard_retries`).

img2dataset's own `download()` numbers the shards of every call from 0 (so per-shard calls would
all write keys 000000000...) and starts two extra processes per call; the tasks therefore drive
its Reader, Resizer and Downloader directly with the shard's real id, as `download()` would.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from img2dataset.downloader import Downloader
from img2dataset.reader import Reader
from img2dataset.resizer import Resizer
from img2dataset.writer import WebDatasetSampleWriter
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from pipelines.prefilter import parquet_files
from pipelines.ray_env import ensure_ray

log = logging.getLogger(__name__)

OOM_SHARD_COUNT = 5  # digits of the shard number in file names and keys, as img2dataset's default
_DONE = "_stats.json"


class DownloadConfig(BaseModel):
    """How img2dataset downloads. Defaults suit LAION at scale; tests shrink shards and timeout."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(10_000, ge=1, description="input rows per shard (= per output tar)")
    thread_count: int = Field(64, ge=1, description="download threads in each shard task")
    timeout: float = Field(10.0, gt=0, description="seconds img2dataset waits on one HTTP request")
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
class DownloadResult:
    output_dir: str
    shards: list[ShardStats]
    wall_time: float

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
            "failures": self.failures,
            "images_per_s_per_core": self.images_per_s_per_core,
        }


_MESSAGES = {
    "Image decoding error": "decode_error",
    "image too small": "too_small",
    "aspect ratio too large": "aspect_ratio",
    "image area too large": "too_large",
}


def failure_reason(message: str) -> str:
    """img2dataset's error_message, as a category: http_<code>, timeout, decode_error, too_small,
    aspect_ratio, too_large, connection_error or other."""
    if m := re.search(r"HTTP Error (\d{3})", message):
        return f"http_{m.group(1)}"
    if "timed out" in message:
        return "timeout"
    if message in _MESSAGES:
        return _MESSAGES[message]
    return "connection_error" if message.startswith("<urlopen error") else "other"


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
        resizer = Resizer(
            image_size=config.max_short_side or 0,
            resize_mode="keep_ratio" if resize else "no",
            resize_only_if_bigger=True,
            encode_quality=config.encode_quality,
            encode_format=config.encode_format,
            skip_reencode=True,
            min_image_size=config.min_side,
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


def download(
    inputs: str | Path | Sequence[str | Path], output_dir: str | Path, config: DownloadConfig | None = None
) -> DownloadResult:
    """Download the rows of the prefiltered parquet `inputs` (files, directories, globs or
    fsspec URLs) into webdataset shards under `output_dir`, resuming an earlier run there.
    Raises once every shard has been tried if some still failed after their retries (rerun to
    resume). Returns per-shard and total stats, with the per-core download rate."""
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
    failed = {}
    with tqdm(total=len(shards), initial=len(stats), desc="download shards", unit="shard") as bar:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                stats[i] = _commit_shard(fs, out, i, ray.get(ref))
            except ray.exceptions.RayError as err:
                failed[i] = err
            bar.update()
    _remove_attempts(fs, out)  # what is left there is from attempts that died
    if failed:
        raise RuntimeError(
            f"{len(failed)} shard(s) failed after {config.shard_retries} retries (rerun to resume): "
            + "; ".join(f"{i}: {err}" for i, err in sorted(failed.items()))
        )
    result = DownloadResult(str(output_dir), [stats[i] for i in sorted(stats)], time.monotonic() - started)
    log.info(
        "download: %d of %d images in %d shards; failures %s; %.1f images/s per core",
        result.successes,
        result.count,
        len(result.shards),
        result.failures,
        result.images_per_s_per_core,
    )
    return result
