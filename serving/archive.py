"""Restore every image of an archive into an archive of the same kind, with Ray Data.

    python -m serving.archive --input photos.tar.gz --output restored.tar.gz [--config FILE] [--steps 20 ...]
    make restore-archive IN=photos.zip OUT=restored.zip ARGS='--batch-size 8 --concurrency 4 --gpus-per-actor 1'

Input: a tar, tar.gz (.tgz), tar.bz2 (.tbz2), tar.xz (.txz), zip or folder, local or an fsspec
URL. Output: the same kind (tar -> tar, tar.gz -> tar.gz, zip -> zip, folder -> folder, ...)
holding the restored images under their member paths, in their own format (PNG stays PNG, JPEG
stays JPEG...; 16-bit, gray and alpha kept).
Only .png .jpg .jpeg .webp .tif .tiff members are restored: the formats that can be written back.
Beside the output, named after its stem (the output without its archive suffix):

    <stem>.manifest.parquet, <stem>.manifest.csv   one row per input member (directories excepted):
        path, output, status (restored / skipped / failed), reason, error, model uri + version,
        options (JSON), seed, size, timings, run id. skipped: refused, or not a usable image (a
        rerun skips it again); failed: restoration raised (a rerun retries it)
    <stem>.contact.png, <stem>.contact.html        input | stage 1 | final of the first restored images
    <stem>.parts/                                  the work directory; removed when the run ends

How: the driver lists the members (one pass over the archive; the names and declared sizes
decide what is refused), Ray Data reads the accepted ones lazily in read tasks (a compressed tar in
one streaming task, the rest in parallel) and restores them in an actor pool of
RestorationPipelines; the driver stores each result in <stem>.parts/ as it arrives and, once all
are there, writes the output archive, the manifest and the contact sheet atomically.

Resuming: a rerun finds the results in <stem>.parts/ and restores only what is missing there
(and what failed), so an interrupted run costs only its unfinished batches and no member is
written twice. The parts belong to one input listing, model version and option set: a rerun
that differs in any of them is refused, and so is replacing a finished output (--overwrite
starts afresh).

Safety: nothing is ever extracted. Members with absolute paths, '..' components or control
characters, symbolic and hard links, devices, encrypted zip entries, duplicate names, other
suffixes, members declaring more than max_member_bytes, and everything once the declared sizes
pass max_total_bytes (a tar is not read further) are skipped with the reason in the manifest.
Reading never takes more bytes than a member declared, images over max_pixels are refused from
their header before decoding, and output names are the sanitised relative paths.

Seeds: member `path` uses seed + (a stable hash of path), so fresh and resumed runs agree, and
images are batched only with images of the same working size, so batch mates change nothing.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import html
import io
import json
import math
import os
import posixpath
import re
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import BinaryIO

import cv2
import fsspec
import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from pydantic import Field, ValidationError
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from tqdm import tqdm

from diffbir.config import Dtype, parse_config
from diffbir.image_io import WRITABLE_SUFFIXES, ImageError, ImageInfo, decode_image, encode_image
from diffbir.pipeline import RestorationPipeline, RestoreOptions, name_seed
from pipelines.arrow import batched_tables
from pipelines.ray_env import ensure_ray
from pipelines.shards import atomic_write
from training import registry

ARCHIVE_SUFFIXES = {  # longest first
    ".tar.gz": "tar.gz",
    ".tgz": "tar.gz",
    ".tar.bz2": "tar.bz2",
    ".tbz2": "tar.bz2",
    ".tar.xz": "tar.xz",
    ".txz": "tar.xz",
    ".tar": "tar",
    ".zip": "zip",
}
TAR_COMPRESSION = {"tar": "", "tar.gz": "gz", "tar.bz2": "bz2", "tar.xz": "xz"}  # tarfile's stream modes r|… and w|…
READ_CPUS = 0.25  # fractional: read tasks must not wait behind whole-CPU actors on small machines
THUMB_HEIGHT = 160


class ArchiveConfig(RestoreOptions):
    """Restoration options (RestoreOptions; `seed` is the base of the per-file seeds) plus what to
    read, what to write, how to run and what to refuse."""

    input: str = Field(description="tar, tar.gz, tar.bz2, tar.xz, zip or folder: a local path or an fsspec URL")
    output: str = Field(description="the same kind as the input (a folder for a folder)")
    model: str = Field("models:/diffbir@champion", description=f"{registry.URI_FORMS}")
    tracking_dir: str = Field(registry.DEFAULT_DIR, description="local MLflow store (MLFLOW_TRACKING_URI wins)")
    cache_dir: str | None = Field(None, description=f"downloaded versions (default ${registry.CACHE_ENV} or ~/.cache)")
    dtype: Dtype = Field("fp32", description="inference precision")
    batch_size: int = Field(4, ge=1, description="images per actor call")
    concurrency: int = Field(1, ge=1, description="actors in the pool, each holding one model copy")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor (0: run on CPU)")
    cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs per actor; on CPU torch uses this many threads, rounded up"
    )
    jpeg_quality: int = Field(95, ge=1, le=100, description="quality of JPEG and WebP outputs")
    max_member_bytes: int = Field(512 << 20, ge=1, description="skip members declaring more bytes than this")
    max_total_bytes: int = Field(256 << 30, ge=1, description="skip everything once the declared sizes add up to more")
    max_members: int = Field(1_000_000, ge=1, description="refuse archives with more entries")
    max_pixels: int = Field(100_000_000, ge=1, description="skip images with more pixels (read from the header)")
    contact_sheet: int = Field(
        8, ge=0, le=64, description="images in the contact sheet, as input | stage 1 | final (0: none)"
    )
    keep_parts: bool = Field(False, description="keep <stem>.parts/ after a finished run")
    overwrite: bool = Field(False, description="replace an existing output and discard earlier parts")

    def options(self) -> RestoreOptions:
        """The options given (a preset, the model's version's by default, fills the others)."""
        return RestoreOptions(**self.model_dump(include=set(RestoreOptions.model_fields), exclude_unset=True))


class ArchiveError(Exception):
    """The run cannot go on: an unreadable or oversized archive, a mismatched rerun."""


class MemberRefusedError(Exception):
    """One member cannot be used; the message is the manifest's reason."""


# ---------------------------------------------------------------------------------------------
# Kinds and names


def archive_kind(path: str, is_dir: bool) -> str:
    if is_dir:
        return "folder"
    kind = next((k for suffix, k in ARCHIVE_SUFFIXES.items() if path.lower().endswith(suffix)), None)
    if kind is None:
        raise ArchiveError(f"{path}: not a folder nor a {', '.join(ARCHIVE_SUFFIXES)} file")
    return kind


def output_stem(output: str, kind: str) -> str:
    """The output without its archive suffix: the work directory, manifest and contact sheet
    are named after it."""
    output = output.rstrip("/")
    if kind == "folder":
        return output
    suffix = next(s for s in ARCHIVE_SUFFIXES if output.lower().endswith(s))
    return output[: -len(suffix)]


def safe_path(name: str) -> tuple[str | None, str | None]:
    """(relative output path, None) for a member name, or (None, why it may be written nowhere)."""
    if any(ord(c) < 32 for c in name):
        return None, "control characters in the name"
    unix = name.replace("\\", "/")  # zip files made on Windows
    if unix.startswith("/") or re.match(r"[A-Za-z]:", unix):
        return None, "absolute path"
    parts = [p for p in unix.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "path traversal ('..')"
    return ("/".join(parts), None) if parts else (None, "empty name")


# ---------------------------------------------------------------------------------------------
# Listing: one pass over the archive; names and declared sizes decide what is refused


@dataclass(frozen=True)
class Member:
    ordinal: int  # position among the archive's entries: how readers find it again
    name: str  # as stored
    size: int  # declared
    mtime: float = 0.0
    header_offset: int = 0  # tar: where its headers start (uncompressed tars are read from there)
    path: str | None = None  # the sanitised relative path, None when refused for its name
    reason: str | None = None  # why it is skipped; None: to restore


def list_members(url: str, kind: str, cfg: ArchiveConfig) -> list[Member]:
    """Every entry but directories, in archive order, each screened against the limits."""
    fs, root = fsspec.core.url_to_fs(url)
    listers = {"folder": _list_folder, "zip": _list_zip} | dict.fromkeys(TAR_COMPRESSION, _list_tar)
    try:
        return _screen(listers[kind](fs, root, kind, cfg), cfg)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise ArchiveError(f"{url}: cannot read it as a {kind} ({type(e).__name__}: {e})") from e


def _list_folder(fs, root: str, kind: str, cfg: ArchiveConfig) -> Iterator[Member]:
    found = fs.find(root, detail=True, withdirs=False)  # symlinked folders are not entered
    _check_count(len(found), cfg)
    for ordinal, (full, info) in enumerate(sorted(found.items())):
        reason = "symbolic link" if info.get("islink") else None if info["type"] == "file" else "not a regular file"
        name = posixpath.relpath(full, root)
        yield Member(ordinal, name, int(info.get("size") or 0), float(info.get("mtime") or 0), reason=reason)


def _list_zip(fs, root: str, kind: str, cfg: ArchiveConfig) -> Iterator[Member]:
    with fs.open(root, "rb") as f, zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
    _check_count(len(infos), cfg)
    for ordinal, info in enumerate(infos):
        if info.is_dir():
            continue
        mode = info.external_attr >> 16
        reason = "symbolic link" if mode & 0o170000 == 0o120000 else "encrypted" if info.flag_bits & 0x1 else None
        yield Member(ordinal, info.filename, info.file_size, _zip_mtime(info), reason=reason)


def _zip_mtime(info: zipfile.ZipInfo) -> float:
    try:
        return datetime(*info.date_time).timestamp()
    except ValueError:  # a nonsense date (month 0...) is no reason to refuse the image
        return 0.0


def _list_tar(fs, root: str, kind: str, cfg: ArchiveConfig) -> Iterator[Member]:
    declared = 0
    with fs.open(root, "rb") as f, tarfile.open(fileobj=f, mode=f"r|{TAR_COMPRESSION[kind]}") as tar:
        for ordinal, info in enumerate(_tar_entries(tar)):
            _check_count(ordinal + 1, cfg)
            if info.isdir():
                continue
            reason = (
                None
                if info.isreg()
                else "symbolic link"
                if info.issym()
                else "hard link"
                if info.islnk()
                else "special file (device or FIFO)"
            )
            yield Member(ordinal, info.name, info.size, info.mtime, info.offset, reason=reason)
            declared += info.size
            if declared > cfg.max_total_bytes:
                return  # reading on would decompress past the limit; _screen refuses this one for it


def _tar_entries(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The entries of a tar opened in stream mode, each forgotten once read (tarfile keeps every
    header it has read: a big archive would fill memory)."""
    while (info := tar.next()) is not None:
        tar.members.clear()
        yield info


def _check_count(entries: int, cfg: ArchiveConfig) -> None:
    if entries > cfg.max_members:
        raise ArchiveError(f"the archive has more than max_members = {cfg.max_members:,} entries")


def _screen(members: Iterator[Member], cfg: ArchiveConfig) -> list[Member]:
    """Members with their output path and, when refused, the reason. Duplicate names: the first
    one counts. Declared sizes add up over every member, refused ones too (a tar must be read
    through them)."""
    seen: dict[str, int] = {}
    total, screened = 0, []
    for m in members:
        path, reason = safe_path(m.name)
        total += m.size
        reason = reason or m.reason
        if path is not None and not reason:
            if path in seen:
                reason = f"duplicate name (member {seen[path]} has it)"
            elif not path.lower().endswith(WRITABLE_SUFFIXES):  # each member is written back in its own format
                reason = f"not a restorable image type (suffix not one of {' '.join(WRITABLE_SUFFIXES)})"
            elif m.size > cfg.max_member_bytes:
                reason = f"declares {m.size:,} bytes, over max_member_bytes = {cfg.max_member_bytes:,}"
            elif total > cfg.max_total_bytes:
                reason = f"the archive declares more than max_total_bytes = {cfg.max_total_bytes:,} bytes up to here"
        if path is not None:
            seen.setdefault(path, m.ordinal)
        screened.append(Member(m.ordinal, m.name, m.size, m.mtime, m.header_offset, path, reason))
    return screened


# ---------------------------------------------------------------------------------------------
# Reading members lazily


def read_members(
    url: str, kind: str, members: list[Member]
) -> Iterator[tuple[Member, bytes | None, str | None, float]]:
    """(member, its bytes or None, why not, seconds) for each member, in archive order; `members`
    must be in archive order. Never reads more than a member declared."""
    if not members:
        return
    fs, root = fsspec.core.url_to_fs(url)
    if kind == "folder":
        for m in members:
            yield _timed_read(m, lambda m=m: fs.open(posixpath.join(root, m.name), "rb"))
        return
    with fs.open(root, "rb") as f:
        if kind == "zip":
            with zipfile.ZipFile(f) as zf:
                infos = zf.infolist()
                for m in members:
                    yield _timed_read(m, lambda m=m: zf.open(infos[m.ordinal]))
            return
        if kind == "tar":  # seekable: start at this chunk's first member
            f.seek(members[0].header_offset)
        yield from _read_tar(f, kind, members, members[0].ordinal if kind == "tar" else 0)


def _read_tar(f: BinaryIO, kind: str, members: list[Member], ordinal: int):
    """Stream a tar from the current position, where entry `ordinal` starts."""
    wanted = {m.ordinal: m for m in members}
    with tarfile.open(fileobj=f, mode=f"r|{TAR_COMPRESSION[kind]}") as tar:  # a stream: one pass, nothing kept
        for i, info in enumerate(_tar_entries(tar)):
            m = wanted.pop(ordinal + i, None)
            if m is not None:
                yield _timed_read(m, lambda info=info: tar.extractfile(info))
            if not wanted:
                return
    for m in wanted.values():  # the archive ended early
        yield m, None, "missing: the archive ended before this member", 0.0


def _timed_read(m: Member, open_member) -> tuple[Member, bytes | None, str | None, float]:
    start = time.perf_counter()
    try:
        with open_member() as f:
            data = read_declared(f, m.size)
        return m, data, None, time.perf_counter() - start
    except (MemberRefusedError, zipfile.BadZipFile, tarfile.TarError, NotImplementedError, EOFError, ValueError) as e:
        return m, None, f"unreadable: {e}", time.perf_counter() - start


def read_declared(f: BinaryIO, size: int) -> bytes:
    """A member's bytes, trusting no header: more than declared (a lying zip entry, a file that
    grew since it was listed) is refused after size + 1 bytes, and so is less."""
    data = f.read(size + 1)
    if len(data) > size:
        raise MemberRefusedError(f"holds more than its declared {size:,} bytes")
    if len(data) < size:
        raise MemberRefusedError(f"truncated: {len(data):,} of {size:,} bytes")
    return data


# a member as a read task hands it to the restorers: its bytes, or why there are none
ARCHIVE_MEMBER_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int64()),
        ("path", pa.string()),
        ("data", pa.large_binary()),
        ("reason", pa.string()),
        ("read_s", pa.float64()),
    ]
)


class MemberSource(Datasource):
    """Ray Data source of the members to restore: a compressed tar in one streaming read task
    (it can only be read from the start), other kinds in up to `parallelism` tasks. Every task
    yields blocks of `rows_per_block` members as it reads them."""

    def __init__(self, url: str, kind: str, members: list[Member], rows_per_block: int):
        super().__init__()
        self.url, self.kind, self.members, self.rows_per_block = url, kind, members, rows_per_block

    def estimate_inmemory_data_size(self) -> int:
        return sum(m.size for m in self.members)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        n = 1 if TAR_COMPRESSION.get(self.kind) else max(1, min(parallelism, len(self.members)))
        step = -(-len(self.members) // n)
        tasks = []
        for lo in range(0, len(self.members), step):
            chunk = self.members[lo : lo + step]
            meta = BlockMetadata(
                num_rows=len(chunk), size_bytes=sum(m.size for m in chunk), input_files=None, exec_stats=None
            )
            # a function of its own chunk only: a task must not carry every member of the archive
            tasks.append(
                ReadTask(functools.partial(_read_blocks, self.url, self.kind, chunk, self.rows_per_block), meta)
            )
        return tasks


def _read_blocks(url: str, kind: str, chunk: list[Member], rows_per_block: int) -> Iterator[pa.Table]:
    rows = (
        dict(ordinal=m.ordinal, path=m.path, data=data, reason=reason, read_s=seconds)
        for m, data, reason, seconds in read_members(url, kind, chunk)
    )
    yield from batched_tables(rows, ARCHIVE_MEMBER_SCHEMA, rows_per_block)


# ---------------------------------------------------------------------------------------------
# Restoring: an actor pool of pipelines

RESULT_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("error", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("read_s", pa.float64()),
        ("restore_s", pa.float64()),
        ("data", pa.large_binary()),
        ("stage1", pa.large_binary()),  # PNG of the stage-1 image, for the contact sheet's members only
    ]
)


class ArchiveRestorer:
    """map_batches actor: ARCHIVE_MEMBER_SCHEMA blocks -> RESULT_SCHEMA rows. Per-image problems
    become rows (skipped: the input is unusable; failed: restoration raised), never a failed job."""

    def __init__(
        self, model_uri: str, tracking_uri: str, cache_dir: str | None, options: dict, cfg: dict, contact: list[int]
    ):
        if model_uri.startswith("models:/"):
            mlflow.set_tracking_uri(tracking_uri)  # this worker may have started before the driver set it
        self.opts = RestoreOptions(**options)
        self.max_pixels, self.quality = cfg["max_pixels"], cfg["jpeg_quality"]
        self.contact = set(contact)  # ordinals whose stage-1 image the contact sheet shows
        device = "cuda" if cfg["gpus_per_actor"] > 0 else "cpu"
        if device == "cpu":
            torch.set_num_threads(math.ceil(cfg["cpus_per_actor"]))
        model_dir = registry.resolve(model_uri, cache_dir)  # a pinned version: every actor loads the same
        self.pipe = RestorationPipeline.from_pretrained(str(model_dir), device, cfg["dtype"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        results, decoded = [], []
        for row in batch.to_pylist():
            seed = name_seed(row["path"], self.opts.seed)
            result = dict(
                ordinal=row["ordinal"], seed=seed, read_s=row["read_s"], status="skipped", reason=row["reason"]
            )
            if row["data"] is not None:
                try:
                    image, info = decode_image(row["data"], row["path"], self.max_pixels)
                    decoded.append((result, image, info, row["path"]))
                    continue
                except ImageError as e:
                    result["reason"] = str(e)
            results.append(result)
        start = time.perf_counter()  # restore_s: the time restoring the block, per image
        options = [self.opts.model_copy(update={"seed": r["seed"]}) for r, *_ in decoded]
        outputs = self.pipe.restore_grouped([image for _, image, _, _ in decoded], options)
        seconds = (time.perf_counter() - start) / max(len(decoded), 1)
        for (result, image, info, path), out, opts in zip(decoded, outputs, options):
            result = self._finish(result, out, info, path, seconds)
            if result["status"] == "restored" and result["ordinal"] in self.contact:
                result["stage1"] = encode_image(self.pipe.stage1_image(image, opts))
            results.append(result)
        return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)

    def _finish(self, result: dict, out: np.ndarray | Exception, info: ImageInfo, path: str, seconds: float) -> dict:
        """`result` completed: restored, or failed when restoring or encoding raised."""
        if not isinstance(out, Exception):
            try:
                data = encode_image(out, info, posixpath.splitext(path)[1], self.quality)
                return result | dict(
                    status="restored",
                    reason=None,
                    data=data,
                    height=out.shape[0],
                    width=out.shape[1],
                    restore_s=seconds,
                )
            except Exception as e:  # noqa: BLE001 -- recorded per image; the others go on
                out = e
        return result | dict(
            status="failed", reason="restoration raised an error", error=f"{type(out).__name__}: {out}"
        )


# ---------------------------------------------------------------------------------------------
# The work directory: results as they arrive


class Parts:
    """<stem>.parts/: `files/<ordinal>` holds a restored member's bytes, `stage1/<ordinal>.png` its
    stage-1 image when the contact sheet shows it, `records/*.jsonl` one line per finished member
    (written after its files, so a record always has its file), and `run.json` what the parts
    belong to."""

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def claim(self, fingerprint: dict) -> None:
        """Start or resume: refuse parts that another input, model or option set made."""
        run_file = f"{self.root}/run.json"
        if self.fs.exists(run_file):
            earlier = json.loads(self.fs.cat_file(run_file))
            if earlier != fingerprint:
                changed = sorted(k for k in fingerprint if earlier.get(k) != fingerprint[k])
                raise ArchiveError(
                    f"{self.root} holds parts of a run with another {', '.join(changed)}; "
                    "rerun with --overwrite to start afresh"
                )
            return
        self.fs.makedirs(f"{self.root}/files", exist_ok=True)
        self.fs.makedirs(f"{self.root}/records", exist_ok=True)
        self.fs.makedirs(f"{self.root}/stage1", exist_ok=True)
        with atomic_write(self.fs, run_file) as f:
            f.write(json.dumps(fingerprint, indent=1).encode())

    def records(self) -> dict[int, dict]:
        """The latest record of each member (a failed member may have been retried)."""
        latest: dict[int, dict] = {}
        for path in sorted(self.fs.find(f"{self.root}/records")):
            if not path.endswith(".jsonl"):
                continue
            for line in self.fs.cat_file(path).decode().splitlines():
                record = json.loads(line)
                if record["ordinal"] not in latest or latest[record["ordinal"]]["finished_at"] <= record["finished_at"]:
                    latest[record["ordinal"]] = record
        return latest

    def save(self, block: pa.Table, run_id: str) -> None:
        """Store one block of results: the files, then their records."""
        finished_at = datetime.now(timezone.utc).isoformat()
        records = []
        for row in block.to_pylist():
            for data, path in (
                (row.pop("data"), self.file(row["ordinal"])),
                (row.pop("stage1"), self.stage1_file(row["ordinal"])),
            ):
                if data is not None:
                    with atomic_write(self.fs, path) as f:
                        f.write(data)
            records.append(json.dumps(row | dict(run_id=run_id, finished_at=finished_at)))
        with atomic_write(self.fs, f"{self.root}/records/{uuid.uuid4().hex}.jsonl") as f:
            f.write("\n".join(records).encode())

    def file(self, ordinal: int) -> str:
        return f"{self.root}/files/{ordinal}"

    def stage1_file(self, ordinal: int) -> str:
        return f"{self.root}/stage1/{ordinal}.png"

    def remove(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


# ---------------------------------------------------------------------------------------------
# Writing the results


def write_output(fs, path: str, kind: str, restored: list[tuple[Member, str]], parts: Parts) -> None:
    """The output archive (or folder) of the restored members, in archive order, from their
    parts: written under a temporary name, then renamed into place."""
    if kind == "folder":
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        fs.makedirs(tmp, exist_ok=True)  # an archive with nothing restored still gives a folder
        for m, part in restored:
            target = f"{tmp}/{m.path}"
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.cp_file(part, target)  # the parts lie beside the output: the same filesystem
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.mv(tmp, path, recursive=True)
        return
    with atomic_write(fs, path) as f:
        if kind == "zip":
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:  # images are compressed already
                for m, part in restored:
                    info = zipfile.ZipInfo(
                        m.path, time.localtime(max(m.mtime, 315532800))[:6]
                    )  # zip dates start in 1980
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, parts.fs.cat_file(part))
        else:
            with tarfile.open(fileobj=f, mode=f"w|{TAR_COMPRESSION[kind]}") as tar:
                for m, part in restored:
                    info = tarfile.TarInfo(m.path)
                    info.size, info.mtime, info.mode = parts.fs.size(part), m.mtime, 0o644
                    with parts.fs.open(part, "rb") as src:
                        tar.addfile(info, src)


MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("output", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("error", pa.string()),
        ("model_uri", pa.string()),
        ("model_version", pa.string()),
        ("options", pa.string()),
        ("seed", pa.int64()),
        ("size", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("read_s", pa.float64()),
        ("restore_s", pa.float64()),
        ("run_id", pa.string()),
        ("finished_at", pa.string()),
    ]
)


RECORD_FIELDS = ("status", "reason", "error", "seed", "width", "height", "read_s", "restore_s", "run_id", "finished_at")


def manifest_rows(members: list[Member], records: dict[int, dict], model: dict, options: str) -> list[dict]:
    rows = []
    for m in members:
        record = records.get(m.ordinal, {}) if m.reason is None else {}
        row = dict(path=m.name, size=m.size, model_uri=model["uri"], model_version=model["version"], options=options)
        row |= {k: record.get(k) for k in RECORD_FIELDS}
        if m.reason is not None:
            row |= dict(status="skipped", reason=m.reason)
        row["output"] = m.path if row["status"] == "restored" else None
        rows.append(row)
    return rows


def write_manifest(stem: str, rows: list[dict]) -> list[str]:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    fs, base = fsspec.core.url_to_fs(stem)
    written = []
    for suffix, write in ((".manifest.parquet", pq.write_table), (".manifest.csv", pcsv.write_csv)):
        buf = io.BytesIO()
        write(table, buf)
        with atomic_write(fs, base + suffix) as f:
            f.write(buf.getvalue())
        written.append(stem + suffix)
    return written


CONTACT_COLUMNS = ("input", "stage 1", "final")


def write_contact_sheet(stem: str, rows: list[tuple[str, bytes, bytes | None, bytes]]) -> list[str]:
    """<stem>.contact.png (rows of input | stage 1 | final, with the member's path; a gap where the
    stage-1 image is missing) and .html (a table of the same thumbnails, embedded, so the page
    stands alone). Stage 1 shows what the restoration module did before the diffusion stage."""
    thumbs = [(path, [None if image is None else _thumb(image) for image in images]) for path, *images in rows]
    widths = [max((t[c].shape[1] for _, t in thumbs if t[c] is not None), default=0) for c in range(3)]
    canvas = np.full((len(thumbs) * (THUMB_HEIGHT + 30) + 40, sum(widths) + 40, 3), 255, np.uint8)
    xs = [10 + sum(widths[:c]) + 10 * c for c in range(3)]
    for x, title in zip(xs, CONTACT_COLUMNS):
        cv2.putText(canvas, title, (x, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cells = []
    for i, (path, images) in enumerate(thumbs):
        y = 40 + i * (THUMB_HEIGHT + 30)
        for x, thumb in zip(xs, images):
            if thumb is not None:
                canvas[y : y + THUMB_HEIGHT, x : x + thumb.shape[1]] = thumb
        cv2.putText(
            canvas, path[-60:], (10, y + THUMB_HEIGHT + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
        )
        tds = "".join("<td>–</td>" if t is None else f"<td><img src='{_data_uri(t)}'></td>" for t in images)
        cells.append(f"<tr><td>{html.escape(path)}</td>{tds}</tr>")
    heads = "".join(f"<th>{title}</th>" for title in CONTACT_COLUMNS)
    page = (
        "<!doctype html><meta charset='utf-8'><title>input / stage 1 / final</title>"
        "<style>body{font-family:sans-serif}td{padding:4px;vertical-align:top}</style>"
        f"<table><tr><th>member</th>{heads}</tr>{''.join(cells)}</table>"
    )
    fs, base = fsspec.core.url_to_fs(stem)
    for suffix, data in ((".contact.png", encode_image(canvas / 255.0)), (".contact.html", page.encode())):
        with atomic_write(fs, base + suffix) as f:
            f.write(data)
    return [stem + ".contact.png", stem + ".contact.html"]


def _thumb(data: bytes) -> np.ndarray:
    """Encoded image -> uint8 RGB at THUMB_HEIGHT."""
    rgb, _ = decode_image(data)
    width = max(1, round(rgb.shape[1] * THUMB_HEIGHT / rgb.shape[0]))
    return (cv2.resize(rgb, (width, THUMB_HEIGHT), interpolation=cv2.INTER_AREA) * 255 + 0.5).astype(np.uint8)


def _data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_image(rgb / 255.0)).decode()


# ---------------------------------------------------------------------------------------------
# The job


def restore_archive(cfg: ArchiveConfig) -> dict:
    """Restore `cfg.input` into `cfg.output`; returns a summary (counts, paths, images/s)."""
    start = time.perf_counter()
    kind = check_paths(cfg)
    out_fs, out_path = fsspec.core.url_to_fs(cfg.output)
    stem = output_stem(cfg.output, kind)
    parts = Parts(stem + ".parts")
    if out_fs.exists(out_path) and not parts.fs.exists(parts.root) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} exists (--overwrite replaces it)")
    if cfg.overwrite:
        parts.remove()

    if cfg.model.startswith("models:/"):
        registry.configure(cfg.tracking_dir)
    model = registry.version_info(cfg.model)
    registry.resolve(model["uri"], cfg.cache_dir)  # fail here, not in every actor; warms this node's cache
    members = list_members(cfg.input, kind, cfg)
    options = cfg.options().model_dump_json()
    listing = hashlib.sha256(json.dumps([(m.name, m.size) for m in members]).encode()).hexdigest()
    parts.claim(dict(input=cfg.input, listing=listing, model=model["uri"], options=options))

    done = {o for o, r in parts.records().items() if r["status"] != "failed"}
    todo = [m for m in members if m.reason is None and m.ordinal not in done]
    run_id = uuid.uuid4().hex[:12]
    if todo:
        contact = [m.ordinal for m in members if m.reason is None][: cfg.contact_sheet]
        _run(cfg, kind, model, todo, parts, run_id, contact)
    records = parts.records()
    if missing := [m.name for m in members if m.reason is None and m.ordinal not in records]:
        raise ArchiveError(f"{len(missing)} members got no result (first: {missing[0]}); rerun to resume")

    rows = manifest_rows(members, records, model, options)
    restored = [(m, parts.file(m.ordinal)) for m, row in zip(members, rows) if row["status"] == "restored"]
    write_output(out_fs, out_path, kind, restored, parts)
    manifest = write_manifest(stem, rows)
    sheet = list(_contact_rows(cfg.input, kind, restored[: cfg.contact_sheet], parts))
    contact = write_contact_sheet(stem, sheet) if sheet else []
    if not cfg.keep_parts:
        parts.remove()
    seconds = time.perf_counter() - start
    counts = {s: sum(r["status"] == s for r in rows) for s in ("restored", "skipped", "failed")}
    restored_now = sum(1 for r in rows if r["run_id"] == run_id and r["status"] == "restored")
    return dict(
        input=cfg.input,
        output=cfg.output,
        kind=kind,
        model_uri=model["uri"],
        model_version=model["version"],
        members=len(rows),
        **counts,
        restored_this_run=restored_now,
        resumed=len(done),
        seconds=round(seconds, 2),
        images_per_s=round(restored_now / seconds, 4),
        manifest=manifest,
        contact_sheet=contact,
        run_id=run_id,
    )


def check_paths(cfg: ArchiveConfig) -> str:
    """The input's kind, once the output is known to be the same kind and not inside it."""
    in_fs, in_path = fsspec.core.url_to_fs(cfg.input)
    if not in_fs.exists(in_path):
        raise FileNotFoundError(f"{cfg.input}: no such file or folder")
    kind = archive_kind(in_path, in_fs.isdir(in_path))
    _, out_path = fsspec.core.url_to_fs(cfg.output)
    out_kind = archive_kind(out_path, False) if out_path.lower().endswith(tuple(ARCHIVE_SUFFIXES)) else "folder"
    if out_kind != kind:
        raise ArchiveError(f"the output must be a {kind} like the input, not a {out_kind}: {cfg.output}")
    if kind == "folder" and (out_path.rstrip("/") + "/").startswith(in_path.rstrip("/") + "/"):
        raise ArchiveError("the output folder may not be inside the input folder")
    return kind


def _run(
    cfg: ArchiveConfig, kind: str, model: dict, todo: list[Member], parts: Parts, run_id: str, contact: list[int]
) -> None:
    """Restore `todo` on Ray, storing each block of results as it arrives."""
    ensure_ray()
    ds = ray.data.read_datasource(MemberSource(cfg.input, kind, todo, cfg.batch_size), num_cpus=READ_CPUS)
    ds = ds.map_batches(
        ArchiveRestorer,
        fn_constructor_kwargs=dict(
            # the driver's store and cache: the actors' environment was fixed when Ray started
            model_uri=model["uri"],
            tracking_uri=mlflow.get_tracking_uri(),
            cache_dir=cfg.cache_dir or os.environ.get(registry.CACHE_ENV),
            options=cfg.options().model_dump(exclude_unset=True),
            cfg=cfg.model_dump(),
            contact=contact,
        ),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
    # closing the iterator stops the execution (its actors too) when this loop ends early
    batches = contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    with batches as blocks, tqdm(total=len(todo), unit="img", desc="restore archive") as bar:
        for block in blocks:
            parts.save(block, run_id)
            bar.update(block.num_rows)


def _contact_rows(
    url: str, kind: str, restored: list[tuple[Member, str]], parts: Parts
) -> Iterator[tuple[str, bytes, bytes | None, bytes]]:
    """(path, input bytes, stage-1 PNG or None, output bytes) of `restored`, the input read again
    from the archive."""
    part_of = dict(restored)
    for m, data, _, _ in read_members(url, kind, list(part_of)):
        if data is not None:
            stage1 = parts.stage1_file(m.ordinal)
            stage1 = parts.fs.cat_file(stage1) if parts.fs.exists(stage1) else None
            yield m.path, data, stage1, parts.fs.cat_file(part_of[m])


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(ArchiveConfig, argv, __doc__.split("\n\n")[0], prog="python -m serving.archive")
        summary = restore_archive(cfg)
    except (ArchiveError, FileExistsError, FileNotFoundError, ValidationError, registry.RegistryError, ValueError) as e:
        print(f"restore-archive: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
