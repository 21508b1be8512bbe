"""pHash, the banded near-duplicate search, keeper choice, and dedup across shards on Ray."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from itertools import combinations

import cv2
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from skimage import data

from diffbir.image_io import decode_image
from pipelines import dedup as dd
from pipelines.quality import QualityConfig, filter_quality
from pipelines.shards import ShardConfig, write_shards, write_tar

from conftest import PHOTOS, at_least_512, encode

# ------------------------------------------------------------------ pHash


@pytest.mark.parametrize("name", PHOTOS)
def test_phash_stable_under_resize_and_recompression(name):
    img = PHOTOS[name]
    h, w = img.shape[:2]
    assert dd.phash(img) == dd.phash(img.copy()) == dd.phash(decode_image(encode(img), dtype=np.uint8)[0])
    half = cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    jpegs = [decode_image(encode(im, "JPEG", quality=q), dtype=np.uint8)[0] for im, q in ((img, 50), (half, 40))]
    for copy in (half, *jpegs):
        assert dd.hamming(dd.phash(copy), dd.phash(img)) <= 4


def test_phash_far_apart_for_different_photos():
    hashes = [dd.phash_hex(img) for img in PHOTOS.values()]
    assert min(dd.hamming(a, b) for a, b in combinations(hashes, 2)) >= 20
    assert all(len(h) == 16 for h in hashes)


# ------------------------------------------------------------------ banded search


def brute_force(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int]]:
    """Pairs of distinct hash values within `max_distance`, by comparing every pair."""
    values = np.unique(hashes)
    dist = np.bitwise_count(values[:, None] ^ values[None, :])
    i, j = np.nonzero(np.triu(dist <= max_distance, k=1))
    return set(zip(values[i].tolist(), values[j].tolist()))


def planted_hashes(rng: np.random.Generator, n: int, near: int, max_distance: int, repeats: int) -> np.ndarray:
    """`n` random hashes, `near` neighbours of the first ones at 0..max_distance+3 flipped bits (so
    pairs sit on both sides of the limit), and exact repeats of the first `repeats`."""
    base = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    planted = []
    for h in base[:near]:
        flips = rng.choice(64, size=rng.integers(0, max_distance + 4), replace=False)
        planted.append(h ^ np.uint64(sum(1 << int(b) for b in flips)))
    return np.concatenate([base, np.array(planted, dtype=np.uint64), base[:repeats]])


@pytest.mark.parametrize("max_distance,bands", [(6, 8), (6, 10), (0, 8), (7, 8), (3, 4), (14, 16)])
def test_banded_search_finds_every_pair_brute_force_finds(max_distance, bands):
    hashes = planted_hashes(np.random.default_rng(max_distance), 2500, 600, max_distance, 50)
    expected = brute_force(hashes, max_distance)
    found = dd.near_value_pairs(hashes, max_distance, bands)
    assert set(map(tuple, found.tolist())) == expected and len(found) == len(expected)
    # non-trivial: planted pairs and their overlaps (at distance 0 no two distinct values are close)
    assert len(expected) > 100 or max_distance == 0


def test_dedup_config_validation():
    with pytest.raises(ValidationError):
        dd.DedupConfig(max_distance=8, bands=8)
    with pytest.raises(ValidationError):
        dd.DedupConfig(threshold=3)


# ------------------------------------------------------------------ keeper choice


def test_plan_keeps_best_member_of_each_group():
    h = 0x0123456789ABCDEF
    rows = [  # key, sha, phash, width, height, jpeg_quality, sharpness
        ("a", "s1", h, 800, 600, None, 100.0),
        ("b", "s1", h, 800, 600, None, 100.0),  # same bytes as a: a wins on key order
        ("c", "s2", h ^ 0b111, 800, 600, 95, 300.0),  # 3 bits from a: same group, loses on compression
        ("d", "s3", 0xFEDCBA9876543210, 640, 480, 90, 50.0),
        ("e", "s4", 0xFEDCBA9876543210 ^ (1 << 40), 1024, 768, 80, 10.0),  # bigger wins over sharper
        ("f", "s5", 0x5555555555555555, 800, 600, 90, 50.0),  # alone
    ]
    table = pd.DataFrame(rows, columns=dd.DEDUP_COLUMNS).assign(phash=lambda t: [f"{x:016x}" for x in t["phash"]])
    plan = dd.plan_dedup(table).set_index("key").fillna({"dup_of": "-", "dup_reason": "-"})
    assert plan["dup_of"].to_dict() == {"a": "-", "b": "a", "c": "a", "d": "e", "e": "-", "f": "-"}
    assert plan["dup_reason"].to_dict() == {
        "a": "-",
        "b": "exact_duplicate",
        "c": "near_duplicate",
        "d": "near_duplicate",
        "e": "-",
        "f": "-",
    }
    assert plan.loc["a", "group"] == plan.loc["c", "group"] != plan.loc["e", "group"]


def test_groups_are_transitive():
    chain = [0, 0b111, 0b111111, 0b111111111]  # each 3 bits from the next, 9 from end to end
    table = pd.DataFrame(
        {
            "key": list("wxyz"),
            "sha256": list("1234"),
            "phash": [f"{x:016x}" for x in chain],
            "width": [600, 600, 600, 700],
            "height": 600,
            "jpeg_quality": None,
            "sharpness": 1.0,
        }
    )
    plan = dd.plan_dedup(table, dd.DedupConfig(max_distance=3))
    assert plan["dup_of"].fillna("-").tolist() == ["z", "z", "z", "-"]


# ------------------------------------------------------------------ across shards, on Ray


@pytest.fixture(scope="module")
def ray_local():
    from pipelines.ray_env import ensure_ray

    ensure_ray(num_cpus=2)  # shared by the session; conftest stops it at the end
    yield


def test_dedup_across_shards_keeps_the_better_copy(tmp_path, ray_local):
    chelsea = data.chelsea()
    coffee_png = encode(PHOTOS["coffee"])
    shard0 = {
        "s0_astronaut": encode(PHOTOS["astronaut"]),
        "s0_coffee": coffee_png,
        "s0_chelsea": encode(at_least_512(chelsea, 512)),
    }
    shard1 = {
        "s1_astronaut": encode(PHOTOS["astronaut"], "JPEG", quality=90),  # recompressed copy
        "s1_coffee": coffee_png,  # the same file again
        "s1_chelsea": encode(at_least_512(chelsea, 600)),  # a larger rendition
        "s1_rocket": encode(PHOTOS["rocket"]),
    }
    for name, shard in (("00000.tar", shard0), ("00001.tar", shard1)):
        with open(tmp_path / name, "wb") as f:
            write_tar(
                f, [(k, {"png": v, "txt": b"", "json": json.dumps({"url": k}).encode()}) for k, v in shard.items()]
            )

    kept, rejected = filter_quality(str(tmp_path), QualityConfig())
    assert rejected == {} and kept.count() == 7
    deduped, removed = dd.dedup(kept)
    assert sorted(r["key"] for r in deduped.take_all()) == ["s0_astronaut", "s0_coffee", "s1_chelsea", "s1_rocket"]
    assert removed == {"near_duplicate": 2, "exact_duplicate": 1}

    # the deduplicated dataset goes straight to the shard writer, bytes read back from the download
    written = write_shards(deduped, str(tmp_path / "final"), ShardConfig(samples_per_shard=3))
    assert (written.n_out, written.shards) == (4, ["00000.tar", "00001.tar"])
    with tarfile.open(tmp_path / "final" / "00001.tar") as tar:
        assert tar.extractfile("s1_rocket.png").read() == shard1["s1_rocket"]


def test_dedup_of_no_rows_removes_nothing(ray_local):
    """What the quality stage passes on when it rejected every image: a dataset with the
    columns but no rows."""
    import ray.data
    from ray.data.expressions import col

    row = {"key": "a", "sha256": "0" * 64, "phash": "0" * 16, "width": 600, "height": 600}
    rows = ray.data.from_items([row | {"jpeg_quality": 90, "sharpness": 1.0, "passed": False}])
    none_kept = rows.filter(expr=col("passed")).materialize()
    unique, removed = dd.dedup(none_kept)
    assert (unique.count(), removed) == (0, {})


# ------------------------------------------------------------------ distributed = in one process = brute force


def synthetic_rows(seed: int = 0, n: int = 300) -> pd.DataFrame:
    """`n` rows with DEDUP_COLUMNS: random hashes with planted near copies (0–9 bits apart: both
    sides of the limit, and chains), repeated pHashes, byte-identical files (shared SHA-256) and
    ties in size, compression and sharpness, so every keeper rule decides somewhere."""
    rng = np.random.default_rng(seed)
    hashes = planted_hashes(rng, n - 120, 90, 6, 30)
    sha = [f"{i:064x}" for i in range(len(hashes))]
    for i in rng.choice(len(hashes), 20, replace=False):  # same file as another row: same hash too
        j = int(rng.integers(len(hashes)))
        sha[i], hashes[i] = sha[j], hashes[j]
    keys = [f"k{i:04d}" for i in rng.permutation(len(hashes))]  # key order is not row order
    return pd.DataFrame(
        {
            "key": keys,
            "sha256": sha,
            "phash": [f"{h:016x}" for h in hashes],
            "width": rng.choice([512, 640, 800], len(hashes)),
            "height": 600,
            "jpeg_quality": pd.array(rng.choice([0, 80, 95], len(hashes)), dtype="Int64").map(lambda q: q or None),
            "sharpness": rng.choice([10.0, 50.0], len(hashes)),
        }
    )


def brute_force_plan(table: pd.DataFrame, max_distance: int) -> dict[str, tuple[str, str] | None]:
    """key → (kept key, reason) or None for kept rows, by comparing every pair of rows and a
    union-find: the old in-driver plan, written out."""
    h = np.array([int(x, 16) for x in table["phash"]], dtype=np.uint64)
    close = (np.bitwise_count(h[:, None] ^ h[None, :]) <= max_distance) | (
        table["sha256"].to_numpy()[:, None] == table["sha256"].to_numpy()[None, :]
    )
    parent = list(range(len(table)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(close)):
        parent[root(i)] = root(j)
    rows = table.to_dict("records")
    best = {}
    for i, r in enumerate(rows):
        rank = (-r["width"] * r["height"], -(101 if pd.isna(r["jpeg_quality"]) else r["jpeg_quality"]), -r["sharpness"])
        best[root(i)] = min(best.get(root(i), (rank + (r["key"],), r)), (rank + (r["key"],), r))
    out = {}
    for i, r in enumerate(rows):
        kept = best[root(i)][1]
        same = kept["sha256"] == r["sha256"]
        out[r["key"]] = None if kept is r else (kept["key"], "exact_duplicate" if same else "near_duplicate")
    return out


def test_plan_matches_brute_force():
    table = synthetic_rows()
    expected = brute_force_plan(table, 6)
    plan = dd.plan_dedup(table)
    got = {r.key: None if pd.isna(r.dup_of) else (r.dup_of, r.dup_reason) for r in plan.itertuples()}
    assert got == expected
    reasons = Counter(v[1] for v in expected.values() if v)
    assert reasons["near_duplicate"] > 30 and reasons["exact_duplicate"] > 10  # the planted ones


def test_distributed_dedup_matches_brute_force_for_any_blocks_and_partitions(ray_local, monkeypatch):
    import ray.data

    table = synthetic_rows(seed=1).assign(payload=lambda t: "p-" + t["key"])
    expected = brute_force_plan(table, 6)
    want_kept = sorted(k for k, v in expected.items() if v is None)
    want_counts = dict(Counter(v[1] for v in expected.values() if v))
    results = []
    for blocks, order_seed, partition_bytes in ((1, 0, dd.PARTITION_BYTES), (7, 1, 55_000), (3, 2, 27_000)):
        monkeypatch.setattr(dd, "PARTITION_BYTES", partition_bytes)  # 1, ~4, ~8 shuffle partitions
        shuffled = table.sample(frac=1, random_state=order_seed)
        records = ray.data.from_pandas(shuffled).repartition(blocks).materialize()
        kept, counts = dd.dedup(records)
        rows = kept.take_all()
        assert all(r["payload"] == "p-" + r["key"] for r in rows)  # whole records pass through
        results.append((sorted(r["key"] for r in rows), counts))
    assert results == [(want_kept, want_counts)] * 3
