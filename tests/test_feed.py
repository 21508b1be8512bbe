"""The training feed on WebDataset shards of real photos: shapes and ranges, disjoint ranks,
reproducibility from the seed, resumption from a position, plain image folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import skimage
import torch

from pipelines.feed import (
    TRAIN_PHOTOS,
    FeedConfig,
    index_samples,
    rank_batches,
    rank_samples,
    validation_batch,
    write_example_shards,
)
from pipelines.ray_env import ensure_ray


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_example_shards(str(out))
    return str(out)


@pytest.fixture(scope="module")
def local_ray():
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


def collect(cfg, index, rank, world, start, count, batch_size=4):
    return list(rank_batches(cfg, index, rank, world, batch_size, start, count))


def test_index_reads_shards_in_order(shards):
    index = index_samples(shards)
    assert index.num_rows == len(TRAIN_PHOTOS)
    assert index["key"].to_pylist() == [p.rsplit(".", 1)[0] for p in TRAIN_PHOTOS]
    assert index["caption"].to_pylist()[0] == "a photo: astronaut"
    assert all(u.endswith(".tar") for u in index["url"].to_pylist())


def test_plain_folder_of_images(tmp_path):
    for name in ("astronaut.png", "rocket.jpg"):
        shutil.copy(Path(skimage.__file__).parent / "data" / name, tmp_path / name)
    (tmp_path / "rocket.txt").write_text("a rocket on its launch pad")
    index = index_samples(str(tmp_path))
    assert index["key"].to_pylist() == ["astronaut.png", "rocket.jpg"]
    assert index["caption"].to_pylist() == ["", "a rocket on its launch pad"]
    batch = validation_batch(FeedConfig(data=str(tmp_path), crop_size=64, caption_drop_rate=0), index, 2)
    assert batch["prompt"] == ["", "a rocket on its launch pad"]


def test_ranks_are_disjoint_and_equal():
    n, world = 10, 3
    seen = [rank_samples(n, 7, r, world, np.arange(n // world)) for r in range(world)]
    ids = np.concatenate([ids for _, ids in seen])
    assert len(set(ids.tolist())) == len(ids) == 9  # one epoch: no sample twice, remainder dropped
    epochs, _ = rank_samples(n, 7, 0, world, np.arange(7))
    assert epochs.tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_batches_shapes_ranges_and_ranks(shards, local_ray):
    cfg = FeedConfig(data=shards, crop_size=64, caption_drop_rate=0.5, seed=3, data_workers=2)
    index = ray.put(index_samples(shards))
    per_rank = len(TRAIN_PHOTOS) // 2
    ranks = [collect(cfg, index, r, 2, 0, per_rank, batch_size=per_rank) for r in range(2)]
    for (batch,) in ranks:
        assert batch["hq"].shape == batch["lq"].shape == (per_rank, 3, 64, 64)
        assert batch["hq"].dtype == batch["lq"].dtype == torch.float32
        assert -1 <= batch["hq"].min() and batch["hq"].max() <= 1 and batch["hq"].min() < 0
        assert 0 <= batch["lq"].min() and batch["lq"].max() <= 1
        assert not torch.allclose((batch["hq"] + 1) / 2, batch["lq"], atol=1e-2)  # degraded
        assert all(p in ("", f"a photo: {k}") for p, k in zip(batch["prompt"], batch["key"]))
    keys = [set(b["key"]) for (b,) in ranks]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == len(TRAIN_PHOTOS)  # one epoch, no overlap


def test_same_seed_same_batches_and_resume(shards, local_ray):
    cfg = FeedConfig(data=shards, crop_size=64, seed=11, data_workers=2)
    index = ray.put(index_samples(shards))
    whole = collect(cfg, index, 1, 2, 0, 16)
    again = collect(cfg, index, 1, 2, 0, 16)
    resumed = collect(cfg, index, 1, 2, 8, 8)  # from position 8: the last two batches
    other_seed = collect(cfg.model_copy(update={"seed": 12}), index, 1, 2, 0, 16)
    assert [b["position"].tolist() for b in whole] == [list(range(i, i + 4)) for i in range(0, 16, 4)]
    for a, b in zip(whole, again):
        assert a["key"] == b["key"] and torch.equal(a["hq"], b["hq"]) and torch.equal(a["lq"], b["lq"])
    for a, b in zip(whole[2:], resumed):
        assert a["key"] == b["key"] and torch.equal(a["position"], b["position"]) and torch.equal(a["lq"], b["lq"])
    assert not all(torch.equal(a["lq"], b["lq"]) for a, b in zip(whole, other_seed))


def test_pipeline_output_is_read_by_its_index_not_by_a_glob(shards, tmp_path):
    """A stray or stale tar beside the pipeline's shards is not in index.parquet: never read."""
    from pipelines.shards import SHARD_INDEX_SCHEMA

    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    listed = sorted(p.name for p in out.glob("*.tar"))[:2]
    keys = index_samples(str(out))["key"].to_pylist()
    rows = [{"key": k, "shard": listed[i // 2]} for i, k in enumerate(keys[:4])]
    pq.write_table(pa.Table.from_pylist(rows, SHARD_INDEX_SCHEMA), out / "index.parquet")
    shutil.copy(out / listed[0], out / "00099.tar")  # a stray tar

    index = index_samples(str(out))
    assert index["key"].to_pylist() == keys[:4]
    assert {u.rsplit("/", 1)[1] for u in index["url"].to_pylist()} == set(listed)

    pq.write_table(SHARD_INDEX_SCHEMA.empty_table(), out / "index.parquet")  # a run that kept nothing
    with pytest.raises(FileNotFoundError, match="index.parquet lists no shards"):
        index_samples(str(out))
