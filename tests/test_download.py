"""Download through real img2dataset from the loopback sample server, as Ray tasks on a real
local Ray: the shards, their failures by reason, the size cap, and resuming after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds

from pipelines.download import DownloadConfig, _download_shard, download, failure_reason, plan_shards
from pipelines.prefilter import parquet_files
from pipelines.ray_env import ensure_ray
from pipelines.sample import embedded_sample

from conftest import kill_when_a_shard_is_done

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"shard_size": 5, "timeout": 2.0, "thread_count": 8}  # 17 rows: shards of 5, 5, 5 and 2
SHARDS = ["00000", "00001", "00002", "00003"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    with embedded_sample(tmp_path_factory.mktemp("sample"), slow_seconds=60) as manifest:
        yield manifest


@pytest.fixture(scope="module")
def fates(sample) -> dict[int, dict]:
    return {r["hash"]: r for r in sample.rows}


@pytest.fixture(scope="module")
def prefiltered(sample, fates, tmp_path_factory) -> Path:
    """The rows the prefilter keeps, straight from the manifest, in two files (shard 1 spans
    both) and with the slow URL last (so the last shard is the slow one)."""
    table = pq.read_table(sample.metadata)
    rows = [r for r in table.to_pylist() if not fates[r["hash"]]["fate"].startswith("prefilter:")]
    rows.sort(key=lambda r: fates[r["hash"]]["served"] == "slow")
    folder = tmp_path_factory.mktemp("prefiltered")
    pq.write_table(pa.Table.from_pylist(rows[:8], table.schema), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[8:], table.schema), folder / "part-1.parquet")
    return folder


@pytest.fixture(scope="module")
def downloaded(prefiltered, tmp_path_factory):
    ensure_ray()
    return download(prefiltered, tmp_path_factory.mktemp("download"), DownloadConfig(**CONFIG))


def _samples(folder: Path) -> dict[str, dict]:
    return {
        s["__key__"]: s for tar in sorted(folder.glob("*.tar")) for s in wds.WebDataset(str(tar), shardshuffle=False)
    }


def _contents(folder: Path) -> dict:
    """What a later stage reads, without timings: tar members and the per-row outcome."""
    tars = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            tars[tar.name] = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    rows = pq.read_table(
        sorted(folder.glob("*.parquet")), columns=["key", "hash", "status", "error_message"]
    ).to_pylist()
    outcomes = sorted((r["key"], r["hash"], r["status"], failure_reason(r["error_message"] or "")) for r in rows)
    return {"files": sorted(p.name for p in folder.iterdir()), "tars": tars, "rows": outcomes}


def test_shards_hold_exactly_the_expected_images(sample, fates, downloaded):
    out = Path(downloaded.output_dir)
    files = sorted(["_plan.json"] + [f"{s}{suffix}" for s in SHARDS for suffix in (".tar", ".parquet", "_stats.json")])
    assert sorted(p.name for p in out.iterdir()) == files

    samples = _samples(out)
    meta = {json.loads(s["json"])["hash"]: s | {"meta": json.loads(s["json"])} for s in samples.values()}
    survive = {h for h, r in fates.items() if r["fate"] == "kept" or r["fate"].startswith(("quality:", "dedup:"))}
    assert set(meta) == survive
    for h, s in meta.items():
        row = fates[h]
        assert s["jpg"] == (sample.root / row["file"]).read_bytes(), row["variant"]  # the original bytes
        assert s["txt"].decode() == s["meta"]["caption"]
        assert s["__key__"][:5] in SHARDS and s["meta"]["key"] == s["__key__"]
        assert s["meta"]["url"] == row["url"] and s["meta"]["status"] == "success"
        size = [s["meta"][k] for k in ("width", "height", "original_width", "original_height")]
        assert size == row["size"] * 2
        assert {"WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE"} <= set(s["meta"])

    rows = pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()
    failed = {r["hash"]: failure_reason(r["error_message"]) for r in rows if r["status"] != "success"}
    assert failed == {h: r["fate"].split(":")[1] for h, r in fates.items() if r["fate"].startswith("download:")}

    assert (downloaded.count, downloaded.successes) == (len(rows), len(survive))
    assert downloaded.failures == dict(sorted(Counter(failed.values()).items()))
    assert [s.shard for s in downloaded.shards] == [0, 1, 2, 3] and not any(s.resumed for s in downloaded.shards)
    assert downloaded.images_per_s_per_core > 0


def test_images_above_the_cap_are_downscaled(fates, prefiltered, tmp_path):
    (astronaut,) = [r for r in pq.read_table(prefiltered).to_pylist() if fates[r["hash"]]["variant"] == "astronaut"]
    pq.write_table(pa.Table.from_pylist([astronaut]), tmp_path / "astronaut.parquet")
    ensure_ray()
    result = download(tmp_path / "astronaut.parquet", tmp_path / "out", DownloadConfig(**CONFIG, max_short_side=400))
    assert result.successes == 1
    (s,) = _samples(tmp_path / "out").values()
    meta = json.loads(s["json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (400, 400, 512, 512)
    assert s["jpg"][:2] == b"\xff\xd8"  # re-encoded in the configured format


def test_killed_download_resumes_to_the_same_shards(prefiltered, downloaded, tmp_path):
    out = tmp_path / "resumed"
    code = (
        "from pipelines.download import DownloadConfig, download\n"
        f"download({str(prefiltered)!r}, {str(out)!r}, DownloadConfig(**{CONFIG!r}))"
    )
    # The killed run joins this test's Ray, as a job submitted to a cluster would.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_when_a_shard_is_done(proc, out, timeout=180)
    finished = {p.name[:5] for p in out.glob("*_stats.json")}
    assert len(finished) < len(SHARDS)  # the slow last shard cannot have finished
    for tar in out.glob("*.tar"):  # whatever is in place is a complete tar
        with tarfile.open(tar) as t:
            t.getmembers()
    # What a crash between moving the tar and the stats would leave: must be redone, not read.
    (out / f"{min(set(SHARDS) - finished)}.tar").write_bytes(b"half a tar")

    resumed = download(prefiltered, out, DownloadConfig(**CONFIG))
    assert [s.resumed for s in resumed.shards] == [f"{s.shard:05d}" in finished for s in resumed.shards]
    totals = lambda r: (r.count, r.successes, r.failures)  # noqa: E731
    assert totals(resumed) == totals(downloaded)
    assert _contents(out) == _contents(Path(downloaded.output_dir))
    with pytest.raises(ValueError, match="another input or shard size"):
        download(prefiltered, out, DownloadConfig(**{**CONFIG, "shard_size": 4}))


def test_a_download_task_finishes_no_shard_by_itself(prefiltered, downloaded, tmp_path):
    """Only the driver commits a shard: a task whose driver was killed (Ray lets it run on for a
    while) must not finish a shard under a rerun, with whatever its dying run fed it."""
    ensure_ray()
    fs, paths = parquet_files(prefiltered)
    pieces = plan_shards(fs, paths, CONFIG["shard_size"])[0]
    out = tmp_path / "orphan"
    out.mkdir()
    tmp = ray.get(_download_shard.remote(0, pieces, fs, str(out), DownloadConfig(**CONFIG)))
    assert [p.name for p in out.iterdir()] == ["_tmp"] and Path(tmp).parent == out / "_tmp"
    assert {"00000.parquet", "00000.tar", "00000_stats.json"} <= {p.name for p in Path(tmp).iterdir()}

    resumed = download(prefiltered, out, DownloadConfig(**CONFIG))  # the rerun redoes shard 0, drops the orphan's
    assert not any(s.resumed for s in resumed.shards) and not (out / "_tmp").exists()
    assert _contents(out) == _contents(Path(downloaded.output_dir))
