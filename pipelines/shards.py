"""Final WebDataset shards: `{n:05d}.tar` of a fixed number of samples, plus `index.parquet`.

Each sample is `{key}.{ext}` (the original bytes, never re-encoded, read back from the download
tar by offset and checked against the SHA-256 taken when it was scored), `{key}.txt` (caption)
and `{key}.json` (the LAION/img2dataset metadata plus `quality`: every score, sha256, phash).

Every file is written atomically: into a hidden temporary name in the output directory, then
renamed (local: fsync + os.replace; object stores: the upload completes under the temporary key,
then a server-side move commits it). No reader sees a partial shard, and the index appears last,
only when every shard was written. The index is the list of shards: readers (the training feed)
go by it, and once it is committed the tars it does not list (an earlier, larger run's) are
deleted, so a rerun never mixes in stale samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import sys
import tarfile
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ConfigDict, Field

from pipelines.quality import SCORE_NAMES, SCORE_TYPES

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
    samples_per_shard: int = Field(1000, ge=1)  # ~300 MB shards for typical LAION JPEGs
    workers: int = Field(4, ge=1)  # threads reading source bytes and writing shards (I/O bound)


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
    with tarfile.open(fileobj=f, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode = len(data), 0o444
                tar.addfile(info, io.BytesIO(data))


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


def _sample(rec: Mapping[str, Any], data: bytes) -> tuple[str, dict[str, bytes]]:
    quality = {name: _plain(rec.get(name)) for name in SCORE_NAMES} | {"sha256": rec["sha256"], "phash": rec["phash"]}
    meta = json.loads(rec["meta"]) | {"quality": quality}
    return rec["key"], {rec["ext"]: data, "txt": rec["caption"].encode(), "json": json.dumps(meta).encode()}


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


def _write_shard(fs: fsspec.AbstractFileSystem, path: str, samples: list[tuple[Mapping[str, Any], bytes]]) -> None:
    with atomic_write(fs, path) as f:
        write_tar(f, (_sample(rec, data) for rec, data in samples))


def _remove_unlisted(fs: fsspec.AbstractFileSystem, root: str, listed: set[str]) -> None:
    for path in fs.glob(f"{root}/*.tar"):
        if posixpath.basename(path) not in listed:
            fs.rm(path)


def write_shards(
    records: Iterable[Mapping[str, Any]] | ray.data.Dataset, output: str, config: ShardConfig | None = None
) -> ShardsResult:
    """Write kept quality-stage rows (`pipelines.quality.SCORED_SCHEMA` columns) as shards of
    exactly `samples_per_shard` samples (the last one smaller) into `output`, a local directory
    or fsspec URL. Rows are written in the order given; a Ray dataset is first sorted by
    (source, key): the metadata's row order, whatever order the downloads finished in (which
    sets the members' offsets), so a rerun, or a resumed run, writes identical shards. No
    records: no shards, an empty index (and an earlier run's shards are gone)."""
    config = config or ShardConfig()
    ray_data = sys.modules.get("ray.data")  # only a caller that imported Ray Data can pass a Dataset
    if ray_data and isinstance(records, ray_data.Dataset):
        records = records.sort(["source", "key"]).iter_rows()
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    for stale in fs.glob(f"{root}/.*.tmp-*"):  # left by a killed run
        fs.rm(stale)

    shards, rejected, n_in = [], Counter(), 0
    records = iter(records)
    with (
        ThreadPoolExecutor(config.workers) as pool,
        atomic_write(fs, f"{root}/{SHARD_INDEX}") as index_file,
        pq.ParquetWriter(index_file, SHARD_INDEX_SCHEMA) as index,
    ):
        pending, buffer = deque(), []

        def flush(samples: list) -> None:
            name = f"{len(shards):05d}.tar"
            shards.append(name)
            index.write_table(_index_rows(samples, name))
            pending.append(pool.submit(_write_shard, fs, f"{root}/{name}", samples))
            if len(pending) > config.workers:  # bounds the bytes held in memory
                pending.popleft().result()

        while chunk := list(islice(records, config.samples_per_shard)):
            n_in += len(chunk)
            for rec, (data, error) in zip(chunk, pool.map(_fetch, chunk)):
                if error:
                    rejected[error] += 1
                else:
                    buffer.append((rec, data))
            while len(buffer) >= config.samples_per_shard:
                flush(buffer[: config.samples_per_shard])
                buffer = buffer[config.samples_per_shard :]
        if buffer:
            flush(buffer)
        for future in pending:
            future.result()
    _remove_unlisted(fs, root, set(shards))
    n_out = n_in - sum(rejected.values())
    return ShardsResult(output, shards, SHARD_INDEX, n_in, n_out, dict(rejected))
