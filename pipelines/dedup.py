"""Global near-duplicate removal with 64-bit perceptual hashes.

Duplicates are grouped across the whole dataset, not per shard: byte-identical files (same
SHA-256), identical pHashes, and pHashes within `max_distance` bits are joined into connected
components, and each component keeps one member: the most pixels, then the least compressed
(lossless, then higher JPEG quality), then the sharpest. Compression comes before sharpness
because JPEG ringing can raise the Laplacian variance: astronaut re-saved at q=90 measures 870
against 861 for the PNG it came from.

How this scales to 15M images. Only a few small columns per image reach this stage (~100 B,
~1.5 GB for 15M) and the search is multi-index hashing, not an O(n²) scan (1.1e14 pairs). The
64-bit hash is cut into `bands` bands. Two hashes at distance ≤ d differ in at most d bands, so
with d < bands they agree *exactly* on at least k = bands − d of them (pigeonhole). For each of
the C(bands, k) band combinations we sort the hashes by the concatenated bands and compare, by
popcount, only hashes inside equal-key runs: no pair within d is missed. The two costs are the
sorts (C(bands, k) of n keys) and the candidates (≈ C(bands, k) · n² / 2^(64k/bands+1) for
uniform hashes), so `bands` trades one for the other:
  bands=8,  d=6: 28 sorts, candidates ≈ 2e-4 · n² — the default, best up to a few million;
  bands=10, d=6: 210 sorts of 24–28-bit keys, candidates ≈ 2e-6 · n² — near-linear in n: the
                 setting for 15M (210 sorts of 15M keys, ~5e8 candidate checks).
Measured on random hashes, one core of a heavily shared 2-core box: 1M hashes take 54 s with
bands=8, 91 s with 9, 163 s with 10; 2M take 205 s with 8 (quadratic), 250 s with 9. Projected
to 15M: ~3 h with 8, ~50 min with 10.
Every combination is independent: if one core is ever too slow, the combinations can be spread
over Ray tasks that return only the pairs found (few); this module runs them in one process.
Real pHashes are less uniform than random ones, which is why
identical hashes are collapsed before the search (a placeholder image repeated 10⁵ times would
otherwise make one huge run).
"""

from __future__ import annotations

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


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # ≤ 6 of 64 bits: resized or recompressed copies measure 0–4 here, different photos ≥ 20.
    max_distance: int = Field(6, ge=0, le=63)
    bands: int = Field(8, le=64, description="hash bands for the candidate search (see module docstring)")

    @model_validator(mode="after")
    def _check_bands(self):
        if self.bands <= self.max_distance:
            raise ValueError("bands must exceed max_distance, so that some band must match exactly")
        return self


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


def near_pairs(hashes: np.ndarray, max_distance: int = 6, bands: int = 8) -> np.ndarray:
    """All index pairs (i < j, sorted, unique) of uint64 `hashes` within `max_distance` bits,
    by the banded candidate search explained in the module docstring."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    widths = [64 // bands + (b < 64 % bands) for b in range(bands)]
    shifts = 64 - np.cumsum(widths)
    band = [(hashes >> np.uint64(s)) & np.uint64((1 << w) - 1) for s, w in zip(shifts, widths)]
    found = [np.empty((0, 2), np.int64)]
    for combo in combinations(range(bands), bands - max_distance):
        key = np.zeros(len(hashes), np.uint64)
        for b in combo:
            key = (key << np.uint64(widths[b])) | band[b]
        order = np.argsort(key)
        starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
        found += _pairs_in_runs(order, starts, np.diff(np.r_[starts, len(order)]), hashes, max_distance)
    pairs = np.sort(np.concatenate(found), axis=1)
    return np.unique(pairs, axis=0)


def plan_dedup(table: pd.DataFrame, config: DedupConfig | None = None) -> pd.DataFrame:
    """`table` with DEDUP_COLUMNS (keys unique) → the same rows plus `group` (component id),
    `dup_of` (the kept key, None for kept rows) and `dup_reason` ('exact_duplicate' when
    byte-identical to the kept row, else 'near_duplicate'; None for kept rows).
    Components are transitive: A~B and B~C group A and C even when A and C are further apart."""
    config = config or DedupConfig()
    n = len(table)
    sha_id, sha_values = pd.factorize(table["sha256"])
    values, hash_id = np.unique(np.array([int(h, 16) for h in table["phash"]], dtype=np.uint64), return_inverse=True)
    pairs = near_pairs(values, config.max_distance, config.bands)
    # One graph: rows link to their SHA node and their hash node; near pairs link hash nodes.
    hash_node = n + len(sha_values)
    rows = np.arange(n)
    src = np.concatenate([rows, rows, hash_node + pairs[:, 0]])
    dst = np.concatenate([n + sha_id, hash_node + hash_id, hash_node + pairs[:, 1]])
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


def dedup(records: ray.data.Dataset, config: DedupConfig | None = None) -> tuple[ray.data.Dataset, dict[str, int]]:
    """Drop duplicates from quality-stage rows (a Ray dataset; materialise it first, it is read
    twice). Returns (kept rows, removed counts by reason); no rows: nothing removed."""
    table = records.select_columns(DEDUP_COLUMNS).to_pandas()
    if table.empty:  # Ray's pandas of an empty dataset has no columns at all
        return records, {}
    plan = plan_dedup(table, config)
    drop = pa.array(plan.loc[plan["dup_reason"].notna(), "key"], pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.invert(pc.is_in(batch["key"], value_set=drop)))

    counts = {reason: int(n) for reason, n in plan["dup_reason"].value_counts().items()}
    return records.map_batches(keep, batch_format="pyarrow"), counts
