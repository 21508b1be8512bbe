"""Metadata prefilter on Ray Data: drop LAION rows that cannot become good training images
before anything is downloaded (too small, extreme aspect, watermarked, unsafe, unaesthetic,
duplicate URL), using only the metadata columns.

Every rejected row is counted under the first failing check, in this order: invalid_<column>
(a value missing or not a number), min_side, aspect_ratio, watermark, nsfw, aesthetic,
similarity, duplicate_url. Duplicate URLs are dropped across the whole input, not per block:
rows that pass every other check are grouped into buckets by a 64-bit hash of their URL (Ray
Data's groupby shuffle, which scales with the cluster; a few buckets per partition, each
deduplicated in one vectorised pandas call, where one call per URL managed ~550 rows/s), and
one row per URL is kept (highest similarity, then smallest TEXT, so the choice does not depend
on input order). The kept rows come out in bucket order, sorted by that hash within each
bucket: the same order on every run over the same input (so the download makes the same
shards), and one that spreads each web site's URLs over all download shards.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem
from pydantic import BaseModel, ConfigDict, Field
from ray.data.expressions import col

from pipelines.ray_env import ensure_ray

log = logging.getLogger(__name__)

REQUIRED = ("URL", "TEXT", "WIDTH", "HEIGHT", "pwatermark", "punsafe")
AESTHETIC = "AESTHETIC_SCORE"
SIMILARITY = "similarity"
_REJECT, _URL_KEY, _URL_BUCKET = "_reject", "_url_key", "_url_bucket"
PARTITION_BYTES = 128 * 2**20
BUCKETS_PER_PARTITION = 4  # URL-dedup groups per shuffle partition: small enough to balance, big enough to vectorise
# Types a numeric column may have: strings are coerced, a value that is no number is a rejection.
_NUMBER_TYPES = (pa.types.is_integer, pa.types.is_floating, pa.types.is_string, pa.types.is_large_string)


class PrefilterConfig(BaseModel):
    """Thresholds on LAION's metadata columns. Defaults suit DiffBIR's 512 px training crops."""

    model_config = ConfigDict(extra="forbid")

    min_side: int = Field(512, ge=1, description="minimum of WIDTH and HEIGHT, in pixels")
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="maximum long side / short side")
    max_pwatermark: float = Field(0.5, ge=0.0, le=1.0, description="maximum watermark probability (pwatermark)")
    max_punsafe: float = Field(0.5, ge=0.0, le=1.0, description="maximum NSFW probability (punsafe)")
    min_aesthetic: float | None = Field(
        4.5, description=f"minimum {AESTHETIC}; applied only where the column exists and has a value; None: off"
    )
    min_similarity: float | None = Field(
        None, description=f"minimum CLIP image-text {SIMILARITY} (the column is then required); None: off"
    )
    dedup_urls: bool = Field(True, description="keep one row per URL across the whole input")


@dataclass(frozen=True)
class PrefilterResult:
    output_dir: str
    files: list[str]  # the written parquet files, in row order
    total: int
    kept: int
    rejected: dict[str, int]  # reason -> rows


def parquet_files(inputs: str | Path | Sequence[str | Path]) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The parquet files named by paths, directories, globs or fsspec URLs (one filesystem),
    sorted within each input."""
    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not specs:
        raise FileNotFoundError("no parquet inputs given")
    fs = fsspec.core.url_to_fs(str(specs[0]))[0]
    paths: list[str] = []
    for spec in specs:
        path = fsspec.core.url_to_fs(str(spec))[1]
        found = sorted(fs.glob(path.rstrip("/") + "/*.parquet")) if fs.isdir(path) else sorted(fs.glob(path))
        if not found:
            raise FileNotFoundError(f"no parquet files at {spec}")
        paths += found
    return fs, paths


def _numeric_columns(config: PrefilterConfig, names: Sequence[str]) -> list[str]:
    cols = ["WIDTH", "HEIGHT", "pwatermark", "punsafe"]
    if config.min_aesthetic is not None and AESTHETIC in names:
        cols.append(AESTHETIC)
    if config.min_similarity is not None:
        cols.append(SIMILARITY)
    return cols


def check_schemas(fs: fsspec.AbstractFileSystem, paths: Sequence[str], config: PrefilterConfig) -> None:
    """Fail before any work on a file that lacks a needed column or holds one of a type that
    cannot be read as intended. Numbers stored as strings are accepted: they are coerced, and a
    value that is not a number rejects its row as invalid_<column>."""
    for path in paths:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
        needed = [*REQUIRED, SIMILARITY] if config.min_similarity is not None else REQUIRED
        for name in needed:
            if name not in schema.names:
                raise ValueError(f"{fs.unstrip_protocol(path)}: missing required column {name!r} (has {schema.names})")
        for name in ("URL", "TEXT"):
            if not (pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(schema.field(name).type)):
                raise TypeError(
                    f"{fs.unstrip_protocol(path)}: column {name!r} is {schema.field(name).type}, expected string"
                )
        for name in _numeric_columns(config, schema.names):
            t = schema.field(name).type
            if not any(accepts(t) for accepts in _NUMBER_TYPES):
                raise TypeError(f"{fs.unstrip_protocol(path)}: column {name!r} is {t}, expected a number")


def _flag(batch: pd.DataFrame, config: PrefilterConfig) -> pd.DataFrame:
    """Add the first failing check's name (or "") and the URL's 64-bit hash to each row."""
    reason = np.full(len(batch), "", dtype=object)

    def reject(mask, name: str) -> None:
        reason[np.asarray(mask, dtype=bool) & (reason == "")] = name

    reject(batch["URL"].isna() | (batch["URL"] == ""), "invalid_URL")
    values = {}
    for name in _numeric_columns(config, batch.columns):
        values[name] = pd.to_numeric(batch[name], errors="coerce").astype("float64")
        if name != AESTHETIC:  # an unscored row is only exempt from the aesthetic check
            reject(values[name].isna(), f"invalid_{name}")
    short = np.minimum(values["WIDTH"], values["HEIGHT"])
    reject(short < config.min_side, "min_side")
    reject(np.maximum(values["WIDTH"], values["HEIGHT"]) > config.max_aspect_ratio * short, "aspect_ratio")
    reject(values["pwatermark"] > config.max_pwatermark, "watermark")
    reject(values["punsafe"] > config.max_punsafe, "nsfw")
    if AESTHETIC in values:
        reject(values[AESTHETIC] < config.min_aesthetic, "aesthetic")
    if config.min_similarity is not None:
        reject(values[SIMILARITY] < config.min_similarity, "similarity")
    coerced = {col: v for col, v in values.items() if not pd.api.types.is_numeric_dtype(batch[col])}
    url_key = pd.util.hash_pandas_object(batch["URL"], index=False).to_numpy()
    return batch.assign(**coerced, **{_REJECT: reason, _URL_KEY: url_key})


def _add_url_bucket(batch: pd.DataFrame, buckets: int) -> pd.DataFrame:
    return batch.assign(**{_URL_BUCKET: batch[_URL_KEY].to_numpy(dtype=np.uint64) % np.uint64(buckets)})


def _one_per_url(bucket: pd.DataFrame) -> pd.DataFrame:
    """One row per URL in a bucket (every row of a URL is in the same one), in URL-hash order."""
    keys = [_URL_KEY, "URL", SIMILARITY, "TEXT"] if SIMILARITY in bucket else [_URL_KEY, "URL", "TEXT"]
    ascending = [k != SIMILARITY for k in keys]
    return bucket.sort_values(keys, ascending=ascending, kind="stable").drop_duplicates("URL")


def _count_reasons(block: pd.DataFrame) -> pd.DataFrame:
    counts = block[_REJECT].value_counts()
    return pd.DataFrame({"reason": counts.index.astype(str), "rows": counts.to_numpy()})


def _replace_dir(fs: fsspec.AbstractFileSystem, new: str, path: str) -> None:
    """Put the complete directory `new` in place of `path`. Locally both are renames: `path`
    holds the old files or the new ones, never a mix (object stores copy, without that promise)."""
    old = f"{path}.old-{uuid.uuid4().hex}"
    if fs.exists(path):
        fs.mv(path, old, recursive=True)
    fs.mv(new, path, recursive=True)
    if fs.exists(old):
        fs.rm(old, recursive=True)


def _remove_leftovers(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """What a killed run left beside `path`: its unfinished output, or the output it replaced."""
    for leftover in fs.glob(f"{path}.tmp-*") + fs.glob(f"{path}.old-*"):
        fs.rm(leftover, recursive=True)


def prefilter(
    inputs: str | Path | Sequence[str | Path], output_dir: str | Path, config: PrefilterConfig | None = None
) -> PrefilterResult:
    """Filter LAION metadata parquet (`inputs`: files, directories, globs or fsspec URLs) into
    parquet files of kept rows (all input columns) under `output_dir`, which is replaced only
    once the new output is complete; no temporary folder outlives the call (one a killed run left
    is removed by the next). Returns and logs the counts per rejection reason."""
    config = config or PrefilterConfig()
    fs, paths = parquet_files(inputs)
    check_schemas(fs, paths, config)
    ensure_ray()

    # One block and shuffle partition per 128 MiB of input: Ray's default of 200 makes a small
    # input crawl through thousands of tiny tasks.
    partitions = max(1, math.ceil(sum(fs.size(p) for p in paths) / PARTITION_BYTES))
    ds = ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(fs)), override_num_blocks=partitions)
    ds.context.default_hash_shuffle_parallelism = partitions
    ds.context.execution_options.preserve_order = True  # output files in partition order, for determinism
    flagged = ds.map_batches(_flag, batch_format="pandas", fn_kwargs={"config": config})
    # Two passes over the input (per-block counts, then the kept rows) rather than holding it in memory.
    counts = Counter()
    for row in flagged.map_batches(_count_reasons, batch_format="pandas", batch_size=None).iter_rows():
        counts[row["reason"]] += int(row["rows"])
    kept = flagged.filter(expr=col(_REJECT) == "")
    if config.dedup_urls:
        buckets = partitions * BUCKETS_PER_PARTITION
        kept = kept.map_batches(_add_url_bucket, batch_format="pandas", fn_kwargs={"buckets": buckets})
        kept = kept.groupby(_URL_BUCKET).map_groups(_one_per_url, batch_format="pandas").drop_columns([_URL_BUCKET])
    kept = kept.drop_columns([_REJECT, _URL_KEY])

    out_fs, out_path = fsspec.core.url_to_fs(str(output_dir).rstrip("/"))
    _remove_leftovers(out_fs, out_path)
    tmp = f"{out_path}.tmp-{uuid.uuid4().hex}"
    try:
        out_fs.makedirs(tmp, exist_ok=True)
        kept.write_parquet(tmp, filesystem=PyFileSystem(FSSpecHandler(out_fs)))
        _replace_dir(out_fs, tmp, out_path)
    finally:
        if out_fs.exists(tmp):  # the write failed
            out_fs.rm(tmp, recursive=True)

    files = sorted(out_fs.glob(f"{out_path}/*.parquet"))
    n_kept = 0
    for f in files:
        with out_fs.open(f, "rb") as fh:
            n_kept += pq.ParquetFile(fh).metadata.num_rows
    files = [f"{str(output_dir).rstrip('/')}/{f.rsplit('/', 1)[-1]}" for f in files]  # as the caller named the dir
    passed_count = counts.pop("", 0)
    rejected = dict(sorted(counts.items()))
    if config.dedup_urls:
        rejected["duplicate_url"] = passed_count - n_kept
    result = PrefilterResult(str(output_dir), files, passed_count + sum(counts.values()), n_kept, rejected)
    log.info("prefilter: kept %d of %d rows; rejected %s", result.kept, result.total, result.rejected)
    return result
