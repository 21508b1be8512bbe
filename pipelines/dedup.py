"""Global near-duplicate removal with 64-bit perceptual hashes, as Ray Data group-bys.

Duplicates are grouped across the whole dataset, not per shard: byte-identical files (same
SHA-256), identical pHashes, and pHashes within `max_distance` bits are joined into connected
components, and each component keeps one member: the most pixels, then the least compressed
(lossless, then higher JPEG quality), then the sharpest, then the smallest key. Compression comes
before sharpness because JPEG ringing can raise the Laplacian variance: astronaut re-saved at
q=90 measures 870 against 861 for the PNG it came from.

The search is multi-index hashing, not an O(n²) scan (1.1e14 pairs for 15M images). The 64-bit
hash is cut into `bands` bands. Two hashes at distance ≤ d differ in at most d bands, so with
d < bands they agree *exactly* on at least k = bands − d of them (pigeonhole). For each of the
C(bands, k) band combinations, hashes with the same concatenated bands (the band key) are
compared by popcount: no pair within d is missed. The candidates number ≈ C(bands, k) · n² /
2^(64k/bands+1) for uniform hashes, so `bands` trades rows against candidates:
  bands=8,  d=6: 28 combinations, candidates ≈ 2e-4 · n² — the default, best up to a few million;
  bands=10, d=6: 210 combinations of 24–28-bit keys, candidates ≈ 2e-6 · n²: the setting for 15M.

How it runs, and why the driver stays small. Nothing about every image reaches the driver:
  1. near pairs: each image becomes one row (bucket, combination, band key, pHash; 26 B) per
     combination, so the shuffle moves n · C(bands, k) rows: 11 GB for 15M images at bands=8,
     82 GB at bands=10. A Ray Data group-by on the bucket, a hash of (combination, band key) with
     a few buckets per shuffle partition (one call per bucket, vectorised over its many keys),
     hands each worker whole runs of equal keys; the worker collapses repeated hashes (a
     placeholder image repeated 10⁵ times makes one row, not 10¹⁰ pairs), compares inside each
     run by popcount and returns only the distinct pairs of hash values within d.
  2. exact links: a group-by on SHA-256 and on the pHash returns the rows whose value another
     row shares.
  3. members: the rows of step 2, plus the rows whose pHash is in a pair of step 1 (a filter in
     the workers against that set).
The driver holds the pairs (16 B each) and the members, i.e. only the duplicates (a few hundred
bytes per member as pandas rows: ~0.5 GB when 1.5M of 15M images have a duplicate), resolves the
components (scipy's connected components) and picks the keepers, sorted by key, so the result
never depends on block order or partitioning; the workers then drop the losers with a
set-membership filter against the dropped keys. A component has no edge outside the members, so
this is exactly the in-one-process result (`plan_dedup`, the same functions on one table).
The comparisons are those of the one-process search, spread over the cluster: measured in one
process (one core of a shared 2-core box) 1M random hashes took 54 s at bands=8 and 163 s at 10,
2M took 205 s at 8 (quadratic); for 15M that projects to ~3 core-hours at bands=8 and ~50
core-minutes at bands=10, so the shuffle, not the search, sets the stage's time on a cluster.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

if TYPE_CHECKING:
    import ray.data

DEDUP_COLUMNS = ["key", "sha256", "phash", "width", "height", "jpeg_quality", "sharpness"]
MAX_COMBINATIONS = 1024  # rows per image in the near-pair shuffle: C(bands, bands - max_distance)
PARTITION_BYTES = 128 * 2**20  # shuffle input per group-by partition
BAND_ROW_BYTES, LINK_ROW_BYTES = 26, 200  # a near-search row (bucket, combination, key, hash); a link row
BUCKETS_PER_PARTITION = 4  # groups per partition: each call is vectorised over its whole bucket
_BUCKET, _COMBO, _BAND, _LINK = "_bucket", "_combo", "_band", "_link"
_LINKS = (("s", "sha256"), ("p", "phash"))  # exact duplicates: same file, or same pHash
_MIX = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: spreads band keys over buckets


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # ≤ 6 of 64 bits: resized or recompressed copies measure 0–4 here, different photos ≥ 20.
    max_distance: int = Field(6, ge=0, le=63)
    bands: int = Field(8, le=64, description="hash bands for the candidate search (see module docstring)")

    @model_validator(mode="after")
    def _check_bands(self):
        if self.bands <= self.max_distance:
            raise ValueError("bands must exceed max_distance, so that some band must match exactly")
        if self.combinations > MAX_COMBINATIONS:
            raise ValueError(
                f"C(bands, bands - max_distance) = {self.combinations} band combinations (rows per image "
                f"in the shuffle) exceeds {MAX_COMBINATIONS}: use fewer bands"
            )
        return self

    @property
    def combinations(self) -> int:
        return math.comb(self.bands, self.bands - self.max_distance)


def phash(img: np.ndarray) -> int:
    """The DCT hash of imagehash.phash: gray, 32×32, 2-D DCT, the 8×8 lowest frequencies
    compared with their median, row-major from bit 63 (the DC term). OpenCV's area resize and
    orthonormal DCT make the values differ from imagehash's: compare hashes from this function only."""
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    low = cv2.dct(cv2.resize(gray.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA))[:8, :8]
    return int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big")


def phash_hex(img: np.ndarray) -> str:
    return f"{phash(img):016x}"


def hamming(a: int | str, b: int | str) -> int:
    a, b = (int(x, 16) if isinstance(x, str) else x for x in (a, b))
    return (a ^ b).bit_count()


def hash_values(hexes) -> np.ndarray:
    """16-digit hex pHashes → uint64, vectorised (one bytes.fromhex for the whole column)."""
    hexes = list(hexes)
    if any(not isinstance(h, str) or len(h) != 16 for h in hexes):
        raise ValueError("every phash must be 16 hex digits")
    return np.frombuffer(bytes.fromhex("".join(hexes)), ">u8").astype(np.uint64)


def _pairs_within(ids: np.ndarray, hashes: np.ndarray, max_distance: int, chunk: int = 1024) -> np.ndarray:
    """Pairs (i < j) of `ids` whose hashes are within `max_distance`; chunked rows bound memory."""
    h = hashes[ids]
    out = [np.empty((0, 2), np.int64)]
    for a in range(0, len(ids) - 1, chunk):
        i, j = np.nonzero(np.bitwise_count(h[a : a + chunk, None] ^ h[None, :]) <= max_distance)
        i += a
        keep = j > i
        out.append(np.stack([ids[i[keep]], ids[j[keep]]], axis=1))
    return np.concatenate(out)


def _pairs_in_runs(
    order: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    hashes: np.ndarray,
    max_distance: int,
    budget: int = 1 << 22,
) -> list[np.ndarray]:
    """Pairs within each run order[s:s+L] of equal keys. Runs of one length are compared
    together by broadcasting (~`budget` comparisons at a time): a Python loop per run would cost
    more than the comparisons. Runs longer than 1024 go row-chunked, one at a time."""
    out = []
    for length in np.unique(lengths[lengths > 1]):
        run_starts = starts[lengths == length]
        if length > 1024:
            out += [_pairs_within(order[s : s + length], hashes, max_distance) for s in run_starts]
            continue
        step = max(1, budget // (length * length))
        for c in range(0, len(run_starts), step):
            ids = order[run_starts[c : c + step, None] + np.arange(length)]  # (runs, L)
            h = hashes[ids]
            close = np.triu(np.bitwise_count(h[:, :, None] ^ h[:, None, :]) <= max_distance, k=1)
            r, i, j = np.nonzero(close)
            out.append(np.stack([ids[r, i], ids[r, j]], axis=1))
    return out


def band_rows(hashes: np.ndarray, max_distance: int, bands: int) -> dict[str, np.ndarray]:
    """One row (combination id, band key, hash) per hash and band combination: hashes within
    `max_distance` share the (combination, band key) of at least one row."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    widths = [64 // bands + (b < 64 % bands) for b in range(bands)]
    shifts = 64 - np.cumsum(widths)
    band = [(hashes >> np.uint64(s)) & np.uint64((1 << w) - 1) for s, w in zip(shifts, widths)]
    combos, keys = [], []
    for c, combo in enumerate(combinations(range(bands), bands - max_distance)):
        key = np.zeros(len(hashes), np.uint64)
        for b in combo:
            key = (key << np.uint64(widths[b])) | band[b]
        combos.append(np.full(len(hashes), c, np.int16))
        keys.append(key)
    n = len(keys)
    return {_COMBO: np.concatenate(combos), _BAND: np.concatenate(keys), "phash": np.tile(hashes, n)}


def near_in_group(rows: dict[str, np.ndarray], max_distance: int) -> dict[str, np.ndarray]:
    """The search on one group of `band_rows` (all rows of each (combination, band key) it holds):
    the pairs (a < b, unique) of distinct hash values within `max_distance`.
    Repeated hashes are collapsed first, so a hash repeated 10⁵ times costs one row."""
    rows = np.unique(np.stack([rows[_COMBO].astype(np.uint64), rows[_BAND], rows["phash"]], axis=1), axis=0)
    combo, key, hashes = rows.T  # sorted by (combination, band key, hash): runs are contiguous
    starts = np.flatnonzero(np.r_[True, (key[1:] != key[:-1]) | (combo[1:] != combo[:-1])])
    found = _pairs_in_runs(np.arange(len(rows)), starts, np.diff(np.r_[starts, len(rows)]), hashes, max_distance)
    pairs = hashes[np.concatenate([np.empty((0, 2), np.int64), *found])]  # distinct: rows are unique in a run
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)  # one pair can share several combinations
    return {"a": pairs[:, 0], "b": pairs[:, 1]}


def near_value_pairs(hashes: np.ndarray, max_distance: int = 6, bands: int = 8) -> np.ndarray:
    """All pairs (a < b, sorted, unique) of distinct uint64 hash values within `max_distance`
    bits, in this process: the whole table as one group of `near_in_group`."""
    found = near_in_group(band_rows(hashes, max_distance, bands), max_distance)
    return np.stack([found["a"], found["b"]], axis=1)


def _resolve(table: pd.DataFrame, pairs: np.ndarray) -> pd.DataFrame:
    """The plan of `plan_dedup` from rows and the near pairs of their hash values (every value in
    `pairs` is some row's hash). One graph: rows link to their SHA node and their hash node; near
    pairs link hash nodes."""
    n = len(table)
    sha_id, sha_values = pd.factorize(table["sha256"])
    values, hash_id = np.unique(hash_values(table["phash"]), return_inverse=True)
    ends = np.searchsorted(values, pairs)
    if ends.size and (ends.max() >= len(values) or not np.array_equal(values[ends], pairs)):
        raise RuntimeError("a near pair names a hash that no row has")
    hash_node = n + len(sha_values)
    rows = np.arange(n)
    src = np.concatenate([rows, rows, hash_node + ends[:, 0]])
    dst = np.concatenate([n + sha_id, hash_node + hash_id, hash_node + ends[:, 1]])
    size = hash_node + len(values)
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(size, size))
    group = connected_components(graph, directed=False)[1][:n]

    out = table.reset_index(drop=True).assign(
        group=group,
        _pixels=table["width"].to_numpy() * table["height"].to_numpy(),
        _quality=pd.to_numeric(table["jpeg_quality"]).fillna(101).to_numpy(),
    )
    ranked = out.sort_values(
        ["group", "_pixels", "_quality", "sharpness", "key"], ascending=[True, False, False, False, True]
    )
    keeper = ranked.drop_duplicates("group").set_index("group")
    kept_key = keeper.loc[out["group"], "key"].to_numpy()
    kept_sha = keeper.loc[out["group"], "sha256"].to_numpy()
    is_dup = kept_key != out["key"].to_numpy()
    out["dup_of"] = np.where(is_dup, kept_key, None)
    out["dup_reason"] = np.where(
        is_dup, np.where(kept_sha == out["sha256"].to_numpy(), "exact_duplicate", "near_duplicate"), None
    )
    return out.drop(columns=["_pixels", "_quality"])


def plan_dedup(table: pd.DataFrame, config: DedupConfig | None = None) -> pd.DataFrame:
    """`table` with DEDUP_COLUMNS (keys unique) → the same rows plus `group` (component id),
    `dup_of` (the kept key, None for kept rows) and `dup_reason` ('exact_duplicate' when
    byte-identical to the kept row, else 'near_duplicate'; None for kept rows).
    Components are transitive: A~B and B~C group A and C even when A and C are further apart.
    In this process, for a table that fits in memory; `dedup` runs the same steps on Ray."""
    config = config or DedupConfig()
    pairs = near_value_pairs(np.unique(hash_values(table["phash"])), config.max_distance, config.bands)
    return _resolve(table, pairs)


# ---- the distributed steps (see the module docstring), each a function of one batch or group


def _bucket(values: np.ndarray, buckets: int) -> np.ndarray:
    return ((values * _MIX) >> np.uint64(32)) % np.uint64(buckets)


def _band_batch(batch: pa.Table, config: DedupConfig, buckets: int) -> dict[str, np.ndarray]:
    rows = band_rows(hash_values(batch["phash"].to_pylist()), config.max_distance, config.bands)
    rows[_BUCKET] = _bucket(rows[_BAND] ^ (rows[_COMBO].astype(np.uint64) * _MIX), buckets)
    return rows


def _link_batch(batch: pa.Table, buckets: int) -> pa.Table:
    """Each row twice, linked by its SHA-256 and by its pHash (prefixes keep the two apart)."""
    table = pa.concat_tables(
        [
            batch.append_column(_LINK, pc.binary_join_element_wise(tag, batch[col].cast(pa.string()), ""))
            for tag, col in _LINKS
        ]
    )
    hashed = pd.util.hash_array(table[_LINK].to_numpy(zero_copy_only=False))  # fixed hash key: same in every worker
    return table.append_column(_BUCKET, pa.array(_bucket(hashed, buckets)))


def _shared_in_group(batch: pa.Table) -> pa.Table:
    """The rows whose link value another row of the group has too."""
    shared = pd.Series(batch[_LINK].to_numpy(zero_copy_only=False)).duplicated(keep=False).to_numpy()
    return batch.filter(pa.array(shared)).select(DEDUP_COLUMNS)


def _collect(ds: ray.data.Dataset) -> pa.Table | None:
    """The (few) rows of `ds` in the driver; None when there are none."""
    tables = [t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    return pa.concat_tables(tables, promote_options="default") if tables else None


def _partitions(rows: int, row_bytes: int) -> int:
    return max(1, math.ceil(rows * row_bytes / PARTITION_BYTES))


def dedup(records: ray.data.Dataset, config: DedupConfig | None = None) -> tuple[ray.data.Dataset, dict[str, int]]:
    """Drop duplicates from quality-stage rows (a Ray dataset with DEDUP_COLUMNS, keys unique;
    materialise it first, it is read four times). Returns (kept rows, removed counts by reason);
    no rows: nothing removed. The driver holds only the duplicates (module docstring)."""
    config = config or DedupConfig()
    n = records.count()
    if not n:
        return records, {}
    small = records.select_columns(DEDUP_COLUMNS)

    parts = _partitions(n * config.combinations, BAND_ROW_BYTES)
    near = small.map_batches(
        _band_batch, batch_format="pyarrow", fn_kwargs={"config": config, "buckets": parts * BUCKETS_PER_PARTITION}
    )
    near = near.groupby(_BUCKET, num_partitions=parts).map_groups(
        near_in_group, batch_format="numpy", fn_kwargs={"max_distance": config.max_distance}
    )
    found = _collect(near)
    pairs = np.empty((0, 2), np.uint64)
    if found is not None:
        pairs = np.unique(np.stack([found["a"].to_numpy(), found["b"].to_numpy()], axis=1).astype(np.uint64), axis=0)

    parts = _partitions(2 * n, LINK_ROW_BYTES)
    shared = small.map_batches(
        _link_batch, batch_format="pyarrow", fn_kwargs={"buckets": parts * BUCKETS_PER_PARTITION}
    )
    shared = shared.groupby(_BUCKET, num_partitions=parts).map_groups(_shared_in_group, batch_format="pyarrow")
    near_hashes = pa.array([f"{v:016x}" for v in np.unique(pairs)], pa.string())
    close = small.map_batches(lambda b: b.filter(pc.is_in(b["phash"], value_set=near_hashes)), batch_format="pyarrow")
    found = [t for t in (_collect(shared), _collect(close)) if t is not None]
    if not found:
        return records, {}
    members = pa.concat_tables(found, promote_options="default").to_pandas()
    members = members.drop_duplicates("key").sort_values("key", ignore_index=True)  # input order never matters
    plan = _resolve(members, pairs)

    drop = pa.array(plan.loc[plan["dup_reason"].notna(), "key"], pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch["key"], value_set=drop)))

    counts = {reason: int(k) for reason, k in plan["dup_reason"].value_counts().items()}
    return records.map_batches(keep, batch_format="pyarrow"), counts
