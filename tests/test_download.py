"""The streaming pass (download through real img2dataset from the loopback sample server, scored
in the same Ray tasks on a real local Ray): the candidate shards hold only what passes, every
row's fate and reason, the size cap, the per-URL bounds (deadline, body size, declared image
area), failed shards, and resuming after a kill."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from PIL import Image
from skimage import data

from pipelines.download import DownloadConfig, _download_shard, download, plan_shards
from pipelines.prefilter import parquet_files
from pipelines.quality import CHECKS, QualityConfig
from pipelines.ray_env import ensure_ray
from pipelines.sample import SampleServer, embedded_sample

from conftest import kill_when_a_shard_is_done

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"shard_size": 5, "timeout": 2.0, "thread_count": 8}  # 17 rows: shards of 5, 5, 5 and 2
SHARDS = ["00000", "00001", "00002", "00003"]
# every check off: each decodable download is a candidate (for tests of the download itself)
LENIENT = QualityConfig(**{name: None for *_, name in CHECKS})


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
        s["__key__"]: s
        for tar in sorted(folder.glob("*.tar"))
        for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)
    }


def _fates(folder: Path) -> list[dict]:
    return pq.read_table(sorted(folder.glob("*.parquet"))).to_pylist()


def _contents(folder: Path) -> dict:
    """What a later stage reads, without timings: tar members (by name: the order and so the
    offsets follow download completion) and each row's fate and scores."""
    tars = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            tars[tar.name] = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    fates = [{k: v for k, v in r.items() if k not in ("offset", "source")} for r in _fates(folder)]
    return {"files": sorted(p.name for p in folder.iterdir()), "tars": tars, "fates": fates}


def test_shards_hold_exactly_the_candidates_and_every_rows_fate(sample, fates, downloaded):
    out = Path(downloaded.output_dir)
    files = sorted(["_plan.json"] + [f"{s}{suffix}" for s in SHARDS for suffix in (".tar", ".parquet", "_stats.json")])
    assert sorted(p.name for p in out.iterdir()) == files

    samples = _samples(out)
    meta = {json.loads(s["json"])["hash"]: s | {"meta": json.loads(s["json"])} for s in samples.values()}
    survive = {h for h, r in fates.items() if r["fate"] == "kept" or r["fate"].startswith("dedup:")}
    assert set(meta) == survive  # the quality-rejected were downloaded and scored, never stored
    for h, s in meta.items():
        row = fates[h]
        assert s["jpg"] == (sample.root / row["file"]).read_bytes(), row["variant"]  # the original bytes
        assert s["txt"].decode() == s["meta"]["caption"]
        assert s["__key__"][:5] in SHARDS and s["meta"]["key"] == s["__key__"]
        assert s["meta"]["url"] == row["url"] and s["meta"]["status"] == "success"
        size = [s["meta"][k] for k in ("width", "height", "original_width", "original_height")]
        assert size == row["size"] * 2
        assert {"WIDTH", "HEIGHT", "similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE"} <= set(s["meta"])

    rows = _fates(out)
    by_url = {r["url"]: r for r in fates.values()}
    failed = {r["url"]: r["reason"] for r in rows if r["status"] == "failed"}
    assert failed == {u: r["fate"].split(":")[1] for u, r in by_url.items() if r["fate"].startswith("download:")}
    rejected = {r["url"] for r in rows if r["status"] == "rejected"}
    assert rejected == {u for u, r in by_url.items() if r["fate"].startswith("quality:")}
    for r in rows:  # a candidate record for each kept row, pointing at its bytes in the tar
        assert (r["status"] == "kept") == (r["source"] is not None) == r["passed"]
        if r["passed"]:
            assert r["source"] == f"{out}/{r['key'][:5]}.tar" and samples[r["key"]]["jpg"] == _read(r)
            assert json.loads(r["meta"]) == meta[json.loads(r["meta"])["hash"]]["meta"]

    assert (downloaded.count, downloaded.successes) == (len(rows), len(survive) + len(rejected))
    assert [s.shard for s in downloaded.shards] == [0, 1, 2, 3] and not any(s.resumed for s in downloaded.shards)
    assert downloaded.images_per_s_per_core > 0


def _read(rec: dict) -> bytes:
    with open(rec["source"], "rb") as f:
        f.seek(rec["offset"])
        return f.read(rec["size"])


def test_images_above_the_cap_are_downscaled(fates, prefiltered, tmp_path):
    (astronaut,) = [r for r in pq.read_table(prefiltered).to_pylist() if fates[r["hash"]]["variant"] == "astronaut"]
    pq.write_table(pa.Table.from_pylist([astronaut]), tmp_path / "astronaut.parquet")
    ensure_ray()
    config = DownloadConfig(**CONFIG, max_short_side=400)
    result = download(tmp_path / "astronaut.parquet", tmp_path / "out", config, LENIENT)
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
    totals = lambda r: (r.count, r.successes)  # noqa: E731
    assert totals(resumed) == totals(downloaded)
    assert _contents(out) == _contents(Path(downloaded.output_dir))
    with pytest.raises(ValueError, match="another input, shard size or quality config"):
        download(prefiltered, out, DownloadConfig(**{**CONFIG, "shard_size": 4}))
    with pytest.raises(ValueError, match="another input, shard size or quality config"):
        download(prefiltered, out, DownloadConfig(**CONFIG), QualityConfig(min_sharpness=1))


def test_a_download_task_finishes_no_shard_by_itself(prefiltered, downloaded, tmp_path):
    """Only the driver commits a shard: a task whose driver was killed (Ray lets it run on for a
    while) must not finish a shard under a rerun, with whatever its dying run fed it."""
    ensure_ray()
    fs, paths = parquet_files(prefiltered)
    pieces = plan_shards(fs, paths, CONFIG["shard_size"])[0]
    out = tmp_path / "orphan"
    out.mkdir()
    tmp = ray.get(_download_shard.remote(0, pieces, fs, str(out), DownloadConfig(**CONFIG), QualityConfig()))
    assert [p.name for p in out.iterdir()] == ["_tmp"] and Path(tmp).parent == out / "_tmp"
    assert {"00000.parquet", "00000.tar", "00000_stats.json"} <= {p.name for p in Path(tmp).iterdir()}

    resumed = download(prefiltered, out, DownloadConfig(**CONFIG))  # the rerun redoes shard 0, drops the orphan's
    assert not any(s.resumed for s in resumed.shards) and not (out / "_tmp").exists()
    assert _contents(out) == _contents(Path(downloaded.output_dir))


def _jpeg(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height RGB pixels, with almost no data: what a
    decompression bomb looks like until it is decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")


def _url_table(urls: list[str]) -> pa.Table:
    return pa.table({"URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))]})


def test_every_url_is_bounded_and_none_fails_its_shard(tmp_path):
    """A server that drips a small image over 20 s ends at the 2 s deadline although no read
    waits 2 s; bodies over the cap fail with or without a Content-Length, reading stopping at the
    cap; a header declaring 64 Mpx fails before decoding (cv2 would call this one undecodable)."""
    www = tmp_path / "www"
    www.mkdir()
    small = _jpeg(data.astronaut()[::8, ::8])  # 64×64, a few kB
    (www / "small.jpg").write_bytes(small)
    (www / "big.jpg").write_bytes(_jpeg(data.astronaut()))  # ~100 kB
    (www / "bomb.png").write_bytes(_png_header_only(8000, 8000))
    routes = {
        "img/small.jpg": "success",
        "drip/small.jpg?seconds=0.3": "success",  # no Content-Length, complete
        "drip/small.jpg?seconds=20": "deadline",
        "img/big.jpg": "body_too_large",  # declared too big
        "drip/big.jpg?seconds=2": "body_too_large",  # no Content-Length: counted while read
        "img/bomb.png": "too_large",
    }
    config = DownloadConfig(
        shard_size=len(routes),
        thread_count=len(routes),
        timeout=2.0,
        deadline=2.0,
        max_bytes=20_000,
        max_image_area=1_000_000,
        min_side=0,
        shard_retries=0,
    )
    assert len(small) < config.max_bytes < (www / "big.jpg").stat().st_size
    ensure_ray()
    with SampleServer(www, slow_seconds=60) as server:
        pq.write_table(_url_table([f"{server.base_url}/{r}" for r in routes]), tmp_path / "urls.parquet")
        result = download(tmp_path / "urls.parquet", tmp_path / "out", config, LENIENT)

    assert not result.failed and [s.shard for s in result.shards] == [0]
    assert result.shards[0].duration < 10  # the 20 s drip did not hold the shard
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    outcome = {r["url"].split("/", 3)[3]: "success" if r["status"] == "kept" else r["reason"] for r in rows}
    assert outcome == routes
    assert [s["jpg"] for s in _samples(tmp_path / "out").values()] == [small, small]  # bytes intact
    assert Counter(r["reason"] for r in rows if r["status"] == "failed") == {
        "body_too_large": 2,
        "deadline": 1,
        "too_large": 1,
    }


def _corrupt_pages(path: Path) -> None:
    """Garbage over the first page header: the footer (row counts) still reads, the rows do not."""
    raw = bytearray(path.read_bytes())
    raw[4:68] = b"\xff" * 64
    path.write_bytes(bytes(raw))


def test_a_failing_shard_is_recorded_and_a_rerun_retries_only_it(prefiltered, fates, tmp_path):
    rows = [r for r in pq.read_table(prefiltered).to_pylist() if fates[r["hash"]]["served"] != "slow"][:10]
    inputs = tmp_path / "in"
    inputs.mkdir()
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 5), inputs / "a.parquet")
    pq.write_table(table.slice(5), inputs / "b.parquet")
    intact = (inputs / "b.parquet").read_bytes()
    _corrupt_pages(inputs / "b.parquet")
    config = DownloadConfig(**{**CONFIG, "shard_retries": 1})
    out = tmp_path / "out"

    first = download(inputs, out, config)  # returns: shard 0 finished, shard 1 recorded
    assert [s.shard for s in first.shards] == [0] and first.count == 5
    (failed,) = first.failed
    assert (failed.shard, failed.rows) == (1, 5) and "thrift" in failed.error
    assert first.failed_rows == 5 and first.to_dict()["failed"][0]["shard"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json", "_plan.json"]

    (inputs / "b.parquet").write_bytes(intact)
    rerun = download(inputs, out, config)
    assert [(s.shard, s.resumed) for s in rerun.shards] == [(0, True), (1, False)] and not rerun.failed
    assert rerun.count == 10 and rerun.successes == sum(
        fates[r["hash"]]["fate"] == "kept" or fates[r["hash"]]["fate"].startswith(("quality:", "dedup:")) for r in rows
    )


def _encoded(img: Image.Image, fmt: str, **kw) -> io.BytesIO:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    buf.seek(0)
    return buf


def test_the_decoding_resizer_matches_img2dataset_and_keeps_the_pixels():
    from img2dataset.resizer import Resizer

    from diffbir.image_io import decode_image
    from pipelines.download import _DecodingResizer

    kw = dict(
        image_size=300,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        encode_format="jpg",
        skip_reencode=True,
        min_image_size=64,
        max_image_area=600 * 600,
        max_aspect_ratio=3.0,
    )
    ours, theirs = _DecodingResizer(**kw), Resizer(**kw)
    astronaut = Image.fromarray(data.astronaut())  # 512²: downscaled to 300 and re-encoded
    rgba = Image.fromarray(data.astronaut()[:200, :250]).convert("RGBA")
    rgba.putalpha(128)
    cases = {
        "jpeg kept": _encoded(astronaut.resize((280, 200)), "JPEG", quality=90),
        "jpeg downscaled": _encoded(astronaut, "JPEG", quality=90),
        "mpo kept": _encoded(astronaut.resize((280, 200)), "MPO", save_all=True, append_images=[rgba.convert("RGB")]),
        "png re-encoded": _encoded(astronaut.resize((250, 200)), "PNG"),
        "transparent": _encoded(rgba, "PNG"),
        "too small": _encoded(astronaut.resize((60, 60)), "PNG"),
        "aspect": _encoded(astronaut.resize((400, 100)), "PNG"),
        "area": _encoded(Image.new("L", (700, 700)), "PNG"),
        "corrupt": io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\0" * 100),
    }
    for name, stream in cases.items():
        mine = ours(io.BytesIO(stream.getvalue()))
        ref = theirs(io.BytesIO(stream.getvalue()))
        assert mine[1:] == ref[1:], name  # sizes and failure message
        pixels = ours.take(mine[0])
        if mine[0] is None:
            assert pixels is None, name
            continue
        stored = decode_image(mine[0], dtype="uint8")[0]
        assert pixels.pixels.shape == stored.shape == (mine[2], mine[1], 3), name
        kept = name.endswith("kept")
        assert (mine[0] == stream.getvalue()) == kept, name  # original bytes where possible
        error = abs(pixels.pixels.astype(int) - stored).mean()
        assert error == 0 if kept else error < 3, name  # re-encoded: the pixels before the JPEG
        assert ours.take(mine[0]) is None  # handed over once
    white = decode_image(ours(io.BytesIO(cases["transparent"].getvalue()))[0], dtype="uint8")[0]
    assert white.mean() > data.astronaut()[:200, :250].mean() + 40  # flattened onto white, as img2dataset does
