"""The metadata prefilter on a real local Ray, against the embedded sample's expected fates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.prefilter import PrefilterConfig, _flag, check_schemas, parquet_files, prefilter
from pipelines.ray_env import ensure_ray
from pipelines.sample import build_sample


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    # The prefilter never fetches a URL: no server needed.
    return build_sample(tmp_path_factory.mktemp("sample"), "http://127.0.0.1:9")


def test_keeps_and_rejects_exactly_the_expected_rows(sample, tmp_path):
    ensure_ray()
    result = prefilter(str(sample.root / "metadata" / "*.parquet"), tmp_path / "kept")
    kept = pq.read_table(result.files).to_pylist()

    expected_kept = {r["hash"] for r in sample.rows if not r["fate"].startswith("prefilter:")}
    assert {r["hash"] for r in kept} == expected_kept
    expected_rejected = Counter(r["fate"].split(":")[1] for r in sample.rows if r["fate"].startswith("prefilter:"))
    assert result.rejected == dict(expected_rejected)
    assert (result.total, result.kept) == (len(sample.rows), len(expected_kept))
    # all LAION columns travel on, for img2dataset's save_additional_columns
    assert set(kept[0]) == set(pq.read_schema(sample.metadata[0]).names)
    # one row per URL (of a duplicated URL, the higher-similarity row: see expected_kept)
    assert len({r["URL"] for r in kept}) == len(kept)
    assert not list(tmp_path.glob("kept.tmp-*"))


def test_missing_column_is_named_with_its_file(sample, tmp_path):
    table = pq.read_table(sample.metadata[1]).drop_columns(["pwatermark"])
    pq.write_table(table, tmp_path / "no_watermark.parquet")
    with pytest.raises(ValueError, match=r"no_watermark\.parquet: missing required column 'pwatermark'"):
        prefilter([sample.metadata[0], tmp_path / "no_watermark.parquet"], tmp_path / "out")
    pq.write_table(pq.read_table(sample.metadata[0]).drop_columns(["similarity"]), tmp_path / "no_sim.parquet")
    no_sim = parquet_files(tmp_path / "no_sim.parquet")
    check_schemas(*no_sim, PrefilterConfig())  # needed only by the similarity check, off by default
    with pytest.raises(ValueError, match=r"no_sim\.parquet: missing required column 'similarity'"):
        check_schemas(*no_sim, PrefilterConfig(min_similarity=0.3))
    with pytest.raises(FileNotFoundError):
        prefilter(tmp_path / "nothing-*.parquet", tmp_path / "out")


def test_wrong_types_error_or_are_coerced_and_counted(tmp_path):
    bad = pa.table(
        {"URL": ["u"], "TEXT": ["t"], "WIDTH": pa.array([[1]]), "HEIGHT": [600], "pwatermark": [0.1], "punsafe": [0.1]}
    )
    pq.write_table(bad, tmp_path / "list_width.parquet")
    with pytest.raises(TypeError, match=r"list_width\.parquet: column 'WIDTH' is list<"):
        check_schemas(*parquet_files(tmp_path / "list_width.parquet"), PrefilterConfig())

    as_text = pd.DataFrame(
        {
            "URL": list("abcdef"),
            "TEXT": ["t"] * 6,
            "WIDTH": ["800", "eight hundred", "800", "300", "800", "800"],
            "HEIGHT": [600] * 6,
            "pwatermark": [0.1, 0.1, None, 0.1, 0.1, 0.1],
            "punsafe": [0.1] * 6,
            "AESTHETIC_SCORE": [5.0, 5.0, 5.0, 5.0, None, 3.0],
        }
    )
    flagged = _flag(as_text, PrefilterConfig())
    # an unscored row (e) escapes only the aesthetic check; a missing required value does not (c)
    assert flagged["_reject"].tolist() == ["", "invalid_WIDTH", "invalid_pwatermark", "min_side", "", "aesthetic"]
    assert flagged["WIDTH"].dtype == "float64"  # coerced for the output


def test_url_dedup_spans_files_and_buckets_and_keeps_the_best_row(tmp_path, monkeypatch):
    """Duplicates spread over 3 files and 12 buckets: the output is exactly the reference choice
    (highest similarity, then smallest TEXT, whatever the input order), in the same order on a rerun."""
    monkeypatch.setattr("pipelines.prefilter.PARTITION_BYTES", 20_000)  # 3 partitions × 4 buckets
    rng = np.random.default_rng(0)
    n = 3000
    df = pd.DataFrame(
        {
            "URL": [f"https://example.com/{u}.jpg" for u in rng.integers(0, 1200, n)],  # ~1200 URLs, most repeated
            "TEXT": [f"caption {t}" for t in rng.integers(0, 5, n)],
            "WIDTH": 800,
            "HEIGHT": 600,
            "similarity": rng.integers(0, 3, n) / 10,
            "pwatermark": 0.1,
            "punsafe": 0.1,
        }
    )
    (tmp_path / "meta").mkdir()
    for i in range(3):
        part = df.iloc[i * n // 3 : (i + 1) * n // 3]
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), tmp_path / "meta" / f"{i}.parquet")
    ensure_ray()
    first = prefilter(tmp_path / "meta", tmp_path / "a")
    kept = pq.read_table(first.files).to_pandas()

    best = df.sort_values(["URL", "similarity", "TEXT"], ascending=[True, False, True]).drop_duplicates("URL")
    assert first.kept == len(best) and first.rejected == {"duplicate_url": n - len(best)}
    assert kept.sort_values("URL").to_dict("records") == best.to_dict("records")
    again = pq.read_table(prefilter(tmp_path / "meta", tmp_path / "b").files).to_pandas()
    assert again["URL"].tolist() == kept["URL"].tolist()


def test_a_rerun_replaces_the_folder_whole_and_leaks_no_temporary_one(sample, tmp_path, monkeypatch):
    """A write that fails leaves the previous output as it was and no temporary folder; what a
    killed run left beside the output goes at the next run; a finished run replaces the folder."""
    import ray.data

    ensure_ray()
    metadata = str(sample.root / "metadata" / "*.parquet")
    out = tmp_path / "kept"
    out.mkdir()
    pq.write_table(pq.read_table(sample.metadata[0]), out / "part-of-an-earlier-run.parquet")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_write = ray.data.Dataset.write_parquet

    def write_then_fail(self, path, **kwargs):
        real_write(self, path, **kwargs)
        raise OSError("simulated crash after the write")

    monkeypatch.setattr(ray.data.Dataset, "write_parquet", write_then_fail)
    with pytest.raises(OSError, match="simulated crash"):
        prefilter(metadata, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]

    monkeypatch.setattr(ray.data.Dataset, "write_parquet", real_write)
    (tmp_path / "kept.tmp-0123abcd").mkdir()  # as a killed run leaves them
    (tmp_path / "kept.old-0123abcd").mkdir()
    result = prefilter(metadata, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert [Path(f).name for f in result.files] == sorted(p.name for p in out.iterdir())  # the earlier part is gone
    assert pq.read_table(result.files).num_rows == result.kept
