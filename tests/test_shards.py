"""Final shards (read back with webdataset), the parquet index, atomic commits, the stats report."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from PIL import Image
from skimage import data

from pipelines import shards as sh
from pipelines.quality import SCORE_NAMES, QualityConfig, iter_tar_samples, score_rows
from pipelines.ray_env import ensure_ray
from pipelines.stats import StageStats, build_report, count_failed_checks, summarize_scored, write_report


def encode(img: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def download(tmp_path_factory):
    """An img2dataset-style download tar with five usable photos (crops of the bundled ones in
    several formats) and one that the quality filter rejects."""
    root = tmp_path_factory.mktemp("download")
    astronaut, coffee, motorcycle = data.astronaut(), data.coffee(), data.stereo_motorcycle()[0]
    images = {
        "000000000": ("png", encode(astronaut)),
        "000000001": ("jpg", encode(np.ascontiguousarray(astronaut[:, ::-1]), "JPEG", quality=93)),
        "000000002": ("webp", encode(motorcycle[:, :600], "WEBP", lossless=True)),
        "000000003": ("jpg", encode(np.ascontiguousarray(coffee[::-1]), "JPEG", quality=88)),
        "000000004": ("png", encode(astronaut[:, :, ::-1])),
        "000000005": ("png", encode(np.full((600, 600, 3), 30, np.uint8))),
    }
    samples = [
        (
            key,
            {
                ext: img,
                "txt": f"caption {key}".encode(),
                "json": json.dumps(
                    {
                        "url": f"http://127.0.0.1/{key}.{ext}",
                        "caption": f"caption {key}",
                        "status": "success",
                        "punsafe": 0.01,
                        "AESTHETIC_SCORE": 5.5,
                    }
                ).encode(),
            },
        )
        for key, (ext, img) in images.items()
    ]
    with open(root / "00000.tar", "wb") as f:
        sh.write_tar(f, samples)
    rows = score_rows(
        list(iter_tar_samples(str(root / "00000.tar"))), QualityConfig(min_short_side=400, min_effective_short_side=400)
    )
    return {"images": images, "rows": rows, "kept": [r for r in rows if r["passed"]]}


def test_shards_read_back_by_webdataset_with_identical_bytes(download, tmp_path):
    kept = download["kept"]
    assert len(kept) == 5
    result = sh.write_shards(kept, str(tmp_path / "out"), sh.ShardConfig(samples_per_shard=2))
    assert result.shards == ["00000.tar", "00001.tar", "00002.tar"] and (result.n_in, result.n_out) == (5, 5)

    urls = [str(tmp_path / "out" / name) for name in result.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [r["key"] for r in kept]
    assert [len([s for s in samples if s["__url__"] == u]) for u in urls] == [2, 2, 1]
    for sample in samples:
        ext, original = download["images"][sample["__key__"]]
        assert sample[ext] == original  # the downloaded bytes, not a re-encode
        assert sample["txt"].decode() == f"caption {sample['__key__']}"
        meta = json.loads(sample["json"])
        assert meta["AESTHETIC_SCORE"] == 5.5 and meta["url"].endswith(f"{sample['__key__']}.{ext}")
        assert set(SCORE_NAMES) <= set(meta["quality"]) and meta["quality"]["sharpness"] > 40
        assert len(meta["quality"]["phash"]) == 16

    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pandas()
    by_key = {r["key"]: r for r in kept}
    assert index["key"].tolist() == [s["__key__"] for s in samples]
    assert index["shard"].tolist() == ["00000.tar"] * 2 + ["00001.tar"] * 2 + ["00002.tar"]
    for row in index.itertuples():
        rec = by_key[row.key]
        assert (row.url, row.caption, row.width, row.height) == (
            json.loads(rec["meta"])["url"],
            rec["caption"],
            rec["width"],
            rec["height"],
        )
        assert row.sharpness == pytest.approx(rec["sharpness"]) and row.sha256 == rec["sha256"]
    assert pd.isna(index.set_index("key").loc["000000000", "jpeg_quality"])
    assert index.set_index("key").loc["000000001", "jpeg_quality"] == 93


def test_crash_before_rename_leaves_no_visible_partial_shard(download, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_replace, calls = os.replace, []

    def crash_on_second_commit(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash before rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second_commit)
    with pytest.raises(OSError, match="simulated crash"):
        sh.write_shards(download["kept"], str(out), sh.ShardConfig(samples_per_shard=2, workers=1))
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    # 00001 crashed; shards already in flight may still commit, whole; the index never does
    assert "00001.tar" not in visible and "00000.tar" in visible and "index.parquet" not in visible
    for name in visible:
        with tarfile.open(out / name) as tar:
            assert len(tar.getnames()) == {"00000.tar": 6, "00002.tar": 3}[name]  # complete shards only
    assert not list(out.glob(".*.tmp-*"))  # the interrupted shard's temporary file is gone too

    monkeypatch.setattr(os, "replace", real_replace)
    (out / ".00001.tar.tmp-leftover").write_bytes(b"partial")  # as a killed process would leave it
    result = sh.write_shards(download["kept"], str(out), sh.ShardConfig(samples_per_shard=2))
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar", "index.parquet"]
    assert result.n_out == 5


def test_object_store_url_and_unreadable_sources(download, tmp_path):
    kept = [dict(r) for r in download["kept"]]
    kept[2]["sha256"] = "0" * 64  # the download tar changed since scoring
    kept[3]["source"] = str(tmp_path / "gone.tar")
    result = sh.write_shards(kept, "memory://bucket/shards", sh.ShardConfig(samples_per_shard=2))
    assert result.rejected == {"checksum_mismatch": 1, "read_error": 1} and (result.n_in, result.n_out) == (5, 3)
    # the numbering never depends on what could be read: shard 00001 lost both samples and is not written
    assert result.shards == ["00000.tar", "00002.tar"]
    fs = fsspec.filesystem("memory")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("/bucket/shards", detail=False)) == [
        "00000.tar",
        "00002.tar",
        "index.parquet",
    ]
    with fs.open("/bucket/shards/00000.tar", "rb") as f, tarfile.open(fileobj=f) as tar:
        assert len(tar.getnames()) == 6
    with fs.open("/bucket/shards/index.parquet", "rb") as f:
        index = pq.read_table(f)
    assert index["key"].to_pylist() == [kept[i]["key"] for i in (0, 1, 4)]
    assert index["shard"].to_pylist() == ["00000.tar"] * 2 + ["00002.tar"]


def test_stats_report_counts_add_up(download, tmp_path):
    rows = download["rows"]
    rejected = {}
    for r in rows:
        if r["reason"]:
            rejected[r["reason"]] = rejected.get(r["reason"], 0) + 1
    scores = pd.DataFrame(rows)[list(SCORE_NAMES)]
    thresholds = QualityConfig().thresholds()
    stages = [
        StageStats("download", 7, 6, {"http_error": 1}),
        StageStats("quality", len(rows), len(download["kept"]), rejected),
        StageStats("dedup", 5, 5),
        StageStats("shards", 5, 5),
    ]
    failed = count_failed_checks(rows)
    assert sum(failed.values()) >= sum(rejected.values()) and list(failed.values()) == sorted(failed.values())[::-1]
    paths = write_report(str(tmp_path / "stats"), stages, scores.iloc[:4], thresholds, failed, scores_of=len(rows))

    report = json.loads(open(paths["json"]).read())
    assert report["consistent"] and report["total"] == {"in": 7, "out": 5}
    quality = report["stages"][1]
    assert quality["n_in"] - quality["n_out"] == sum(quality["rejected"].values()) == 1
    assert report["scores"]["sharpness"]["count"] == 4 and "learned_iqa" not in report["scores"]
    assert report["scores_sampled"] == {"rows": 4, "of": 6} and report["failed_checks"] == failed
    q = report["scores"]["noise_sigma"]["quantiles"]
    assert q["0.0"] <= q["0.5"] <= q["1.0"]
    assert report["thresholds"]["short_side"] == [["min", 512]] and report["failed_checks"]
    summary = open(paths["summary"]).read()
    assert "| quality | 6 | 5 | 1 |" in summary and "Counts consistent: yes" in summary
    assert "a uniform sample of 4 of the 6 assessed samples" in summary
    png = open(paths["histograms"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] > 800

    broken = build_report([StageStats("quality", 10, 7, {"blurry": 2}), StageStats("dedup", 6, 6)])
    assert not broken["consistent"] and broken["stages"][0]["unaccounted"] == 1


def test_report_scores_are_sampled_but_failed_checks_are_exact():
    ensure_ray()
    rng = np.random.default_rng(0)
    rows = [
        {"sharpness": float(x), "reasons": ["blurry"] * int(x < 0.2) + ["noisy"] * int(x > 0.9), "caption": "c"}
        for x in rng.random(20_000)
    ]
    scored = ray.data.from_items(rows).materialize()
    scores, failed = summarize_scored(scored, ["sharpness"], max_rows=2000)
    assert failed == count_failed_checks(rows) and failed["blurry"] > failed["noisy"] > 1900
    assert list(scores.columns) == ["sharpness"] and 1700 < len(scores) < 2300
    assert abs(scores["sharpness"].median() - 0.5) < 0.05  # uniform: the sample's median is the population's
    everything, _ = summarize_scored(scored, ["sharpness"], max_rows=20_000)
    assert len(everything) == 20_000


def test_a_rerun_removes_the_shards_its_index_does_not_list(download, tmp_path):
    out = tmp_path / "out"
    first = sh.write_shards(download["kept"], str(out), sh.ShardConfig(samples_per_shard=2))
    assert first.shards == ["00000.tar", "00001.tar", "00002.tar"]

    smaller = sh.write_shards(download["kept"][:3], str(out), sh.ShardConfig(samples_per_shard=2))
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "index.parquet"]
    assert pq.read_table(out / "index.parquet")["shard"].to_pylist() == ["00000.tar"] * 2 + ["00001.tar"]
    assert smaller.n_out == 3

    empty = sh.write_shards([], str(out), sh.ShardConfig(samples_per_shard=2))  # a run that kept nothing
    assert (empty.shards, empty.n_in, empty.n_out) == ([], 0, 0)
    assert sorted(p.name for p in out.iterdir()) == ["index.parquet"]
    index = pq.read_table(out / "index.parquet")
    assert index.num_rows == 0 and index.schema == sh.SHARD_INDEX_SCHEMA


def test_report_names_failed_shards_and_warnings(tmp_path):
    failed = [{"stage": "download", "shard": 7, "rows": 10, "error": "OSError: disk full"}]
    stages = [StageStats("download", 30, 15, {"http_404": 5, "shard_failed": 10}), StageStats("shards", 15, 15)]
    paths = write_report(str(tmp_path), stages, failed_shards=failed, warnings=["download shard(s) 7 failed"])
    report = json.loads(open(paths["json"]).read())
    assert report["failed_shards"] == failed and report["warnings"] == ["download shard(s) 7 failed"]
    assert report["consistent"]
    summary = open(paths["summary"]).read()
    assert "| download | 7 | 10 | OSError: disk full |" in summary and "- download shard(s) 7 failed" in summary
    assert build_report(stages)["failed_shards"] == [] == build_report(stages)["warnings"]


# ---- the Ray path: tasks write the shards


@pytest.fixture(scope="module")
def big_download(tmp_path_factory):
    """40 samples of incompressible bytes (60–700 KB, ~15 MB) in two download tars, as scored
    rows in (source, key) order. The writer never decodes: random bytes are as good as images."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    rows = []
    for part in range(2):
        samples = [
            (f"{part}{i:08d}", {"jpg": rng.bytes(int(rng.integers(60_000, 700_000))), "txt": b"c", "json": b"{}"})
            for i in range(20)
        ]
        source = str(root / f"{part:05d}.tar")
        with open(source, "wb") as f:
            sh.write_tar(f, samples)
        with tarfile.open(source) as tar:
            offsets = {m.name: m.offset_data for m in tar}
        for key, members in samples:
            data = members["jpg"]
            rows.append(
                {
                    "key": key,
                    "source": source,
                    "offset": offsets[f"{key}.jpg"],
                    "size": len(data),
                    "ext": "jpg",
                    "caption": f"caption {key}",
                    "meta": json.dumps({"url": f"http://127.0.0.1/{key}.jpg"}),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "phash": f"{len(data):016x}",
                    "sharpness": float(len(data) % 97),
                }
            )
    return rows


def files_of(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_tasks_write_shards_by_samples_and_bytes(big_download, tmp_path, monkeypatch):
    ensure_ray()
    config = sh.ShardConfig(samples_per_shard=6, max_shard_bytes=2**20, shards_per_task=2, workers=2)
    here = sh.write_shards(big_download, str(tmp_path / "here"), config)  # this process: the reference

    def no_bytes_here(rec):
        raise AssertionError("the driver read image bytes")

    monkeypatch.setattr(sh, "_fetch", no_bytes_here)  # the driver's copy only: Ray workers import their own
    rng = np.random.default_rng(1)
    for run, blocks in enumerate((5, 3)):  # rows shuffled over other blocks each time: the same shards
        shuffled = [big_download[i] for i in rng.permutation(len(big_download))]
        records = ray.data.from_items(shuffled, override_num_blocks=blocks)
        result = sh.write_shards(records, str(tmp_path / "ray"), config)
        assert files_of(tmp_path / "ray") == files_of(tmp_path / "here"), run
        assert (result.shards, result.n_in, result.n_out, result.rejected) == (here.shards, 40, 40, {})

    # every sample once, in (source, key) order, in the shard the index names
    index = pq.read_table(tmp_path / "ray" / "index.parquet").to_pandas()
    assert index["key"].tolist() == [r["key"] for r in big_download]
    by_key = {r["key"]: r for r in big_download}
    cost = {}  # a sample's bytes in its tar, from the tar itself
    members = []
    for name in here.shards:
        with tarfile.open(tmp_path / "ray" / name) as tar:
            infos = tar.getmembers()
        keys = sorted({m.name.split(".")[0] for m in infos})
        assert index.loc[index["shard"] == name, "key"].tolist() == keys
        for m in infos:
            key = m.name.split(".")[0]
            cost[key] = cost.get(key, 0) + 512 + -(-m.size // 512) * 512
            if m.name.endswith(".jpg"):
                with tarfile.open(tmp_path / "ray" / name) as tar:
                    data = tar.extractfile(m).read()
                assert hashlib.sha256(data).hexdigest() == by_key[key]["sha256"]
        members.append(keys)
    # each shard: at most 6 samples and 1 MiB (unless one sample alone); closed only when the next
    # sample would not fit, or at the end of a task's range of 12 rows
    position = 0
    for keys, following in zip(members, members[1:] + [None]):
        size = sum(cost[k] for k in keys)
        assert len(keys) <= 6 and (size <= 2**20 or len(keys) == 1)
        position += len(keys)
        if following and position % 12:
            assert len(keys) == 6 or size + cost[following[0]] > 2**20
    assert any(len(k) < 6 and sum(cost[x] for x in k) + cost[n[0]] > 2**20 for k, n in zip(members, members[1:]))
    assert len(members) > 40 / 6 + 1  # the byte cap split some shards
