"""The embedded LAION sample: its manifest, its files and the loopback server that serves them."""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.sample import DRIP_BYTES, STAGES, embedded_sample, load_manifest


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    with embedded_sample(tmp_path_factory.mktemp("sample"), slow_seconds=10) as manifest:
        yield manifest


def _gray(row, root) -> np.ndarray:
    return np.asarray(Image.open(root / row["file"]).convert("L"), dtype=np.float64)


def _conv3(g: np.ndarray, kernel) -> np.ndarray:
    h, w = g.shape
    return sum(k * g[i : h - 2 + i, j : w - 2 + j] for i, row in enumerate(kernel) for j, k in enumerate(row))


def _sharpness(g: np.ndarray) -> float:
    """Variance of the Laplacian."""
    return float(_conv3(g, [[0, 1, 0], [1, -4, 1], [0, 1, 0]]).var())


def _noise_sigma(g: np.ndarray) -> float:
    """Immerkaer's estimate of the standard deviation of Gaussian noise."""
    return float(np.sqrt(np.pi / 2) / 6 * np.abs(_conv3(g, [[1, -2, 1], [-2, 4, -2], [1, -2, 1]])).mean())


def test_manifest_covers_every_metadata_row(sample):
    table = pq.read_table(sample.metadata).to_pylist()
    assert 20 <= len(table) <= 30
    assert [r["hash"] for r in table] == [r["hash"] for r in sample.rows]
    assert [r["URL"] for r in table] == [r["url"] for r in sample.rows]
    assert len({r["hash"] for r in sample.rows}) == len(sample.rows)
    assert load_manifest(sample.path) == sample
    kept = {r["hash"] for r in sample.rows if r["fate"] == "kept"}
    for row in sample.rows:
        assert row["fate"] == "kept" or row["fate"].split(":")[0] in STAGES
        assert row["duplicate_of"] is None or row["duplicate_of"] in kept
        assert row["url"].startswith("http://127.0.0.1:")
    fates = {r["fate"] for r in sample.rows}
    for fate in (
        "kept",
        "prefilter:min_side",
        "prefilter:aspect_ratio",
        "prefilter:watermark",
        "prefilter:nsfw",
        "prefilter:aesthetic",
        "prefilter:duplicate_url",
        "download:http_404",
        "download:timeout",
        "download:decode_error",
        "download:too_small",
        "quality:blur",
        "quality:jpeg",
        "quality:noise",
        "quality:flat",
        "dedup:exact",
        "dedup:near",
    ):
        assert fate in fates


def test_server_serves_every_variant(sample):
    for row in sample.rows:
        if row["served"] == "ok":
            with urllib.request.urlopen(row["url"], timeout=5) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "image/jpeg"
                assert response.read() == (sample.root / row["file"]).read_bytes(), row["variant"]
        elif row["served"] == "missing":
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(row["url"], timeout=5)
            assert err.value.code == 404


def test_slow_variant_outlasts_a_short_timeout(sample):
    (row,) = [r for r in sample.rows if r["served"] == "slow"]
    with pytest.raises((TimeoutError, urllib.error.URLError), match="timed out"):
        urllib.request.urlopen(row["url"], timeout=0.5).read()


def test_drip_route_spreads_the_body_over_the_seconds_asked_without_a_length(sample):
    (row,) = [r for r in sample.rows if r["variant"] == "astronaut"]
    body = (sample.root / row["file"]).read_bytes()
    url = row["url"].replace("/img/", "/drip/") + "?seconds=1"
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=5) as response:
        assert "Content-Length" not in response.headers
        first = response.read1(len(body))
        assert len(first) <= DRIP_BYTES
        assert first + response.read() == body
    assert 0.8 < time.monotonic() - started < 5


def test_files_are_what_the_manifest_says(sample):
    for row in sample.rows:
        if row["file"] is None:
            continue
        data = (sample.root / row["file"]).read_bytes()
        if row["fate"] == "download:decode_error":
            with pytest.raises(OSError):
                Image.open(io.BytesIO(data)).load()
            continue
        size = Image.open(io.BytesIO(data)).size
        assert list(size) == row["size"]
        if row["fate"] in ("kept", "download:too_small") or row["fate"].startswith(("quality", "dedup")):
            assert (min(size) >= 512) == (row["fate"] != "download:too_small"), row["variant"]


def test_degradations_are_unambiguous(sample):
    """Margins a fair quality filter can tell apart: blur, noise and flatness against every survivor."""
    by_fate = {}
    for row in sample.rows:
        by_fate.setdefault(row["fate"], []).append(row)
    kept = [_gray(r, sample.root) for r in by_fate["kept"]]
    assert _sharpness(_gray(by_fate["quality:blur"][0], sample.root)) < min(_sharpness(g) for g in kept) / 50
    assert _noise_sigma(_gray(by_fate["quality:noise"][0], sample.root)) > 4 * max(_noise_sigma(g) for g in kept)
    assert _gray(by_fate["quality:flat"][0], sample.root).std() < 2 < min(g.std() for g in kept) / 10
    crushed = Image.open(sample.root / by_fate["quality:jpeg"][0]["file"]).quantization[0]
    fine = min(np.mean(Image.open(sample.root / r["file"]).quantization[0]) for r in by_fate["kept"])
    assert np.mean(crushed) > 10 * fine  # quantisation steps of quality 8 against quality >= 75
