"""Final WebDataset shards: `{n:05d}.tar` files plus `index.parquet`, written by Ray tasks.

Each sample is `{key}.{ext}` (the original bytes, never re-encoded, read back from the download
tar by offset and checked against the SHA-256 taken when it was scored), `{key}.txt` (caption)
and `{key}.json` (the LAION/img2dataset metadata plus `quality`: every score, sha256, phash).
A shard closes at `samples_per_shard` samples, before a sample that would take it past
`max_shard_bytes` (sizes known from the scored rows, before any byte is read), and at the end
of a task's range (below; a multiple of `samples_per_shard` rows, so only the byte cap can make
a shard end there early).

How it scales: no image byte passes through the driver. The rows (metadata and scores, no bytes)
are sorted by (source, key) and cut by position into ranges of `shards_per_task` ×
`samples_per_shard` rows; a task per range packs its rows into shards (sizes only) and returns
the shard count, the driver numbers the shards by prefix sums, and a second task per range reads
its samples' bytes from the download tars (ranged reads, `workers` threads) and writes its
shards, one shard in memory at a time. So the numbering depends only on the sorted rows: a rerun
gives the same shards, however Ray cut the blocks. The tasks return their index rows; the driver
streams them into `index.parquet` one range at a time. The driver holds one range's index rows
and a number per shard; the tasks together write at the storage's bandwidth.

Every file is written atomically: into a hidden temporary name in the output directory, then
renamed (local: fsync + os.replace; object stores: the upload completes under the temporary key,
then a server-side move commits it). No reader sees a partial shard, and the index appears last,
only when every shard was written. The index is the list of shards: readers (the training feed)
go by it, and once it is committed the tars it does not list (an earlier, larger run's) are
deleted, so a rerun never mixes in stale samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import sys
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from pipelines.quality import SCORE_NAMES, SCORE_TYPES
from pipelines.tars import TarAppender

if TYPE_CHECKING:
    import ray.data

SHARD_INDEX = "index.parquet"  # beside the shards; lists them (readers go by it, not by a glob)
# the rows of SHARD_INDEX: one per sample written, naming its shard
SHARD_INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
    ]
    + list(SCORE_TYPES.items())
)


class ShardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    samples_per_shard: int = Field(1000, ge=1, le=1_000_000, description="a shard closes at this many samples")
    max_shard_bytes: int = Field(
        2**30,
        ge=2**20,
        le=2**33,
        description="a shard closes before its tar members would pass this many bytes (a larger sample gets "
        "a shard of its own); a writing task holds one shard in memory",
    )
    shards_per_task: int = Field(
        8, ge=1, le=10_000, description="consecutive samples_per_shard-sized ranges one Ray task writes"
    )
    workers: int = Field(4, ge=1, le=256, description="threads per writing task reading source bytes (I/O bound)")


@dataclass
class ShardsResult:
    output: str
    shards: list[str]  # file names, in order
    index: str
    n_in: int
    n_out: int
    rejected: dict[str, int] = field(default_factory=dict)  # samples whose bytes could not be re-read


@contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    """Open `path` for writing so that it appears complete or not at all."""
    parent, name = posixpath.split(path)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"  # hidden: no reader's glob matches it
    local = isinstance(fs, LocalFileSystem)
    try:
        with open(tmp, "wb") if local else fs.open(tmp, "wb") as f:
            yield f
            if local:
                f.flush()
                os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
            dir_fd = os.open(parent, os.O_RDONLY)  # make the rename itself durable
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        else:
            fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_tar(f: BinaryIO, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> None:
    """A webdataset tar: members `{key}.{ext}` in sample order, with fixed headers (mtime 0,
    mode 0444) so the same samples always give the same bytes."""
    with TarAppender(f) as tar:
        for key, members in samples:
            tar.add(key, members)


def _plain(value: Any) -> Any:
    """numpy scalars and NaN (what rows come back as from Arrow/pandas) → JSON values."""
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and math.isnan(value) else value


def _fetch(rec: Mapping[str, Any]) -> tuple[bytes | None, str | None]:
    """The sample's original bytes from its download tar, or (None, reason)."""
    try:
        with fsspec.open(rec["source"], "rb") as f:
            f.seek(rec["offset"])
            data = f.read(rec["size"])
    except OSError:
        return None, "read_error"
    if hashlib.sha256(data).hexdigest() != rec["sha256"]:
        return None, "checksum_mismatch"  # the download tar changed since it was scored
    return data, None


def _text_members(rec: Mapping[str, Any]) -> dict[str, bytes]:
    quality = {name: _plain(rec.get(name)) for name in SCORE_NAMES} | {"sha256": rec["sha256"], "phash": rec["phash"]}
    meta = json.loads(rec["meta"]) | {"quality": quality}
    return {"txt": rec["caption"].encode(), "json": json.dumps(meta).encode()}


def _sample(rec: Mapping[str, Any], data: bytes) -> tuple[str, dict[str, bytes]]:
    return rec["key"], {rec["ext"]: data} | _text_members(rec)


def _tar_bytes(rec: Mapping[str, Any]) -> int:
    """What the sample adds to its tar (a 512-byte header and padded data per member), known
    before its image is read: the size it had when it was scored."""
    sizes = [rec["size"], *map(len, _text_members(rec).values())]
    return sum(tarfile.BLOCKSIZE + -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for n in sizes)


def _pack(rows: Sequence[Mapping[str, Any]], config: ShardConfig) -> list[int]:
    """Shard lengths for `rows` in order: a shard closes at `samples_per_shard` samples, or
    before a sample that would take its tar past `max_shard_bytes`."""
    lengths, n, size = [], 0, 0
    for rec in rows:
        add = _tar_bytes(rec)
        if n and (n == config.samples_per_shard or size + add > config.max_shard_bytes):
            lengths.append(n)
            n = size = 0
        n, size = n + 1, size + add
    return lengths + [n] if n else lengths


def _index_rows(samples: list[tuple[Mapping[str, Any], bytes]], shard: str) -> pa.Table:
    rows = [
        {
            "key": r["key"],
            "shard": shard,
            "url": json.loads(r["meta"]).get("url"),
            "caption": r["caption"],
            "sha256": r["sha256"],
            "phash": r["phash"],
            **{n: _plain(r.get(n)) for n in SCORE_NAMES},
        }
        for r, _ in samples
    ]
    return pa.Table.from_pylist(rows, schema=SHARD_INDEX_SCHEMA)


@dataclass
class _Written:
    """What one range's writer reports back: no image bytes, only the index rows."""

    index: pa.Table
    shards: list[str]
    rejected: Counter


def _write_range(
    rows: Sequence[Mapping[str, Any]],
    lengths: Sequence[int],
    first: int,
    fs: fsspec.AbstractFileSystem,
    root: str,
    workers: int,
) -> _Written:
    """Write `rows` as the shards `first`, `first`+1, ... of `lengths` samples (`_pack`), each
    read back from its download tar (`workers` threads) and committed atomically; one shard's
    bytes are held at a time. A sample whose bytes cannot be re-read is left out (its shard is one
    short); a shard left with no sample is not written. The numbering never depends on them."""
    parts, shards, rejected, start = [], [], Counter(), 0
    with ThreadPoolExecutor(workers) as pool:
        for number, length in enumerate(lengths, first):
            chunk, start = rows[start : start + length], start + length
            samples = []
            for rec, (data, error) in zip(chunk, pool.map(_fetch, chunk)):
                if error:
                    rejected[error] += 1
                else:
                    samples.append((rec, data))
            if not samples:
                continue
            name = f"{number:05d}.tar"
            with atomic_write(fs, f"{root}/{name}") as f:
                write_tar(f, (_sample(rec, data) for rec, data in samples))
            parts.append(_index_rows(samples, name))
            shards.append(name)
    return _Written(pa.concat_tables([SHARD_INDEX_SCHEMA.empty_table(), *parts]), shards, rejected)


def _rows(tables: Sequence[pa.Table]) -> list[dict]:
    return [row for table in tables for row in table.to_pylist()]


def _pack_task(config: ShardConfig, *tables: pa.Table) -> list[int]:
    return _pack(_rows(tables), config)


def _write_task(
    fs: fsspec.AbstractFileSystem, root: str, first: int, lengths: list[int], config: ShardConfig, *tables: pa.Table
) -> _Written:
    return _write_range(_rows(tables), lengths, first, fs, root, config.workers)


def _write_in_tasks(
    records: ray.data.Dataset, fs: fsspec.AbstractFileSystem, root: str, config: ShardConfig
) -> Iterator[_Written]:
    """The Ray path: sort, cut by position into ranges of `shards_per_task` × `samples_per_shard`
    rows, plan each range's shards in a task (sizes only), number them by the ranges' prefix sums,
    and let one task per range fetch and write its shards. Yields the ranges' reports in order."""
    import ray

    n = records.count()
    if not n:
        return
    ordered = records.sort(["source", "key"]).materialize()
    step = config.shards_per_task * config.samples_per_shard
    cuts = list(range(step, n, step))
    ranges = [r.to_arrow_refs() for r in (ordered.split_at_indices(cuts) if cuts else [ordered])]
    lengths = ray.get([ray.remote(_pack_task).remote(config, *refs) for refs in ranges])
    firsts = np.cumsum([0] + [len(x) for x in lengths[:-1]])
    write = ray.remote(_write_task)
    pending = [write.remote(fs, root, int(a), x, config, *refs) for a, x, refs in zip(firsts, lengths, ranges)]
    try:
        for ref in pending:
            yield ray.get(ref)
    except BaseException:  # the run is void without its index: stop the other ranges' writers
        for ref in pending:
            ray.cancel(ref)
        raise


def _write_here(
    rows: list[Mapping[str, Any]], fs: fsspec.AbstractFileSystem, root: str, config: ShardConfig
) -> Iterator[_Written]:
    """The same ranges as `_write_in_tasks`, packed and written one after another in this process."""
    first, step = 0, config.shards_per_task * config.samples_per_shard
    for start in range(0, len(rows), step):
        lengths = _pack(rows[start : start + step], config)
        yield _write_range(rows[start : start + step], lengths, first, fs, root, config.workers)
        first += len(lengths)


def _remove_unlisted(fs: fsspec.AbstractFileSystem, root: str, listed: set[str]) -> None:
    for path in fs.glob(f"{root}/*.tar"):
        if posixpath.basename(path) not in listed:
            fs.rm(path)


def write_shards(
    records: Iterable[Mapping[str, Any]] | ray.data.Dataset, output: str, config: ShardConfig | None = None
) -> ShardsResult:
    """Write kept quality-stage rows (`pipelines.quality.SCORED_SCHEMA` columns) as shards into
    `output`, a local directory or fsspec URL, and then `index.parquet`. A Ray dataset is sorted
    by (source, key) first: the metadata's row order, whatever order the downloads finished in,
    so a rerun or a resumed run writes identical shards; Ray tasks write them (module docstring).
    Other rows are written in the order given, in the same ranges, by the same code in this
    process (for rows already in memory: small inputs, tests). No records: no shards, an empty
    index (and an earlier run's shards are gone)."""
    config = config or ShardConfig()
    fs, root = fsspec.core.url_to_fs(output)  # a local root comes back absolute: the tasks' cwd differs
    fs.makedirs(root, exist_ok=True)
    for stale in fs.glob(f"{root}/.*.tmp-*"):  # left by a killed run
        fs.rm(stale)

    ray_data = sys.modules.get("ray.data")  # only a caller that imported Ray Data can pass a Dataset
    if ray_data and isinstance(records, ray_data.Dataset):
        ranges = _write_in_tasks(records, fs, root, config)
    else:
        ranges = _write_here(list(records), fs, root, config)
    shards, rejected, n_out = [], Counter(), 0
    with (
        atomic_write(fs, f"{root}/{SHARD_INDEX}") as index_file,
        pq.ParquetWriter(index_file, SHARD_INDEX_SCHEMA) as index,
    ):
        for written in ranges:  # one range's index rows in memory at a time
            index.write_table(written.index)
            shards += written.shards
            rejected += written.rejected
            n_out += written.index.num_rows
    _remove_unlisted(fs, root, set(shards))
    return ShardsResult(output, shards, SHARD_INDEX, n_out + sum(rejected.values()), n_out, dict(rejected))
