"""The whole data pipeline on the embedded sample: exactly the expected images survive, every
rejection is counted under the stage and reason the sample's manifest expects, the streaming pass
stores only the candidates (with every row's fate), and a run killed mid-pass reruns to the same
shards."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
import yaml

from pipelines.filter_laion import FilterLaionConfig, _learned_iqa, candidates, main, run
from pipelines.quality import LearnedIQAConfig, register_learned_iqa
from pipelines.ray_env import free_port
from pipelines.sample import SCHEMA, load_manifest

from conftest import kill_when_a_shard_is_done

# The sample names what is wrong with an image; the quality and dedup stages name the check.
QUALITY_CHECKS = {
    "blur": {"blurry", "low_effective_resolution"},
    "jpeg": {"low_jpeg_quality", "blocky"},
    "noise": {"noisy"},
    "flat": {"flat", "low_entropy"},
}
DEDUP_REASONS = {"exact": "exact_duplicate", "near": "near_duplicate"}


ROOT = Path(__file__).resolve().parents[1]


# One port for every run here: the sample's URLs (and so the LAION row hashes and the order rows
# reach the download shards in) are then the same in each, and so must be the final shards.
CONFIG = dict(
    sample={"slow_seconds": 8, "port": free_port()},
    download={"shard_size": 8, "thread_count": 4, "timeout": 3},
    shards={"samples_per_shard": 3},
)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("laion")
    return out, run(FilterLaionConfig(output=str(out), **CONFIG))


def shard_contents(out: Path) -> list[list[tuple]]:
    """Per final shard: (key, image sha256, caption) of each sample, in order."""
    return [
        [
            (s["__key__"], json.loads(s["json"])["sha256"], s["txt"])
            for s in wds.WebDataset(str(tar), shardshuffle=False)
        ]
        for tar in sorted((out / "shards").glob("*.tar"))
    ]


def test_exactly_the_expected_images_survive(result):
    out, report = result
    manifest = load_manifest(out / "_work" / "sample" / "manifest.json")
    root = Path(manifest.root)
    expected = Counter(
        hashlib.sha256((root / r["file"]).read_bytes()).hexdigest() for r in manifest.rows if r["fate"] == "kept"
    )
    got = Counter()
    shards = sorted((out / "shards").glob("*.tar"))
    assert [len(list(wds.WebDataset(str(s), shardshuffle=False))) for s in shards][:-1] == [3] * (len(shards) - 1)
    for sample in wds.WebDataset([str(s) for s in shards], shardshuffle=False):
        image = next(v for k, v in sample.items() if k in ("jpg", "png", "webp"))
        meta = json.loads(sample["json"])
        assert hashlib.sha256(image).hexdigest() == meta["sha256"]  # original bytes, not re-encoded
        assert sample["txt"].decode() == meta["caption"]
        got[meta["sha256"]] += 1
    assert got == expected
    index = pd.read_parquet(out / "shards" / "index.parquet")
    assert len(index) == sum(expected.values()) and set(index["sha256"]) == set(expected)


def test_every_rejection_has_the_expected_stage_and_reason(result):
    out, report = result
    manifest = load_manifest(out / "_work" / "sample" / "manifest.json")
    fates = Counter(r["fate"] for r in manifest.rows if r["fate"] != "kept")
    stages = {s["name"]: s for s in report["stages"]}
    assert report["consistent"] and report["total"]["in"] == len(manifest.rows)
    for stage in ("prefilter", "download"):
        want = {f.split(":")[1]: n for f, n in fates.items() if f.startswith(stage + ":")}
        assert stages[stage]["rejected"] == want, stage
    want_dedup = Counter({DEDUP_REASONS[f.split(":")[1]]: n for f, n in fates.items() if f.startswith("dedup:")})
    assert Counter(stages["dedup"]["rejected"]) == want_dedup
    quality = [f.split(":")[1] for f in fates.elements() if f.startswith("quality:")]
    assert sum(stages["quality"]["rejected"].values()) == len(quality)
    failed = report["failed_checks"]
    for problem in quality:  # each degradation tripped a check that looks for it
        assert QUALITY_CHECKS[problem] & set(failed), problem
    assert (out / "stats.md").read_text().startswith("# Data pipeline report")
    assert (out / "score_histograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_streaming_pass_stores_only_candidates_and_every_rows_fate(result):
    out, report = result
    manifest = load_manifest(out / "_work" / "sample" / "manifest.json")
    by_url = {r["url"]: r for r in manifest.rows}
    candidates = out / "_work" / "candidates"
    fates = pq.read_table(sorted(candidates.glob("*.parquet"))).to_pylist()
    stages = {s["name"]: s for s in report["stages"]}
    assert len(fates) == stages["download"]["n_in"]  # one fate per row that reached the pass
    for row in fates:
        want = by_url[row["url"]]["fate"]
        status = {"download": "failed", "quality": "rejected"}.get(want.split(":")[0], "kept")
        assert row["status"] == status, (want, row)
        assert (row["reason"] is None) == (status == "kept")
        # scores wherever measured: the first group always, the others until a check fails
        assert (row["entropy"] is None) == (status == "failed")
        assert (row["noise_sigma"] is None) == (status != "kept" and row["reason"] != "noisy")
    stored = {
        s["__key__"]: s for s in wds.WebDataset([str(t) for t in sorted(candidates.glob("*.tar"))], shardshuffle=False)
    }
    kept = [r for r in fates if r["status"] == "kept"]
    assert sorted(stored) == sorted(r["key"] for r in kept)  # the rejected are not stored
    for r in kept:  # each candidate record points at its bytes
        with open(r["source"], "rb") as f:
            f.seek(r["offset"])
            image = f.read(r["size"])
        assert image == stored[r["key"]][r["ext"]] and hashlib.sha256(image).hexdigest() == r["sha256"]


@register_learned_iqa("mean-brightness-test")
class MeanBrightness:
    """A learned scorer's stand-in: mean brightness in [0, 1]."""

    def load(self, weights_path: str) -> None:
        pass

    def score(self, batch):
        return [im.mean() / 255 for im in batch]


def test_learned_iqa_runs_once_per_candidate_set(result, tmp_path):
    """The learned-IQA stage over the pass's candidates: every candidate scored from its bytes,
    counted; a rerun reuses the written result, another config redoes it."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # a test module: workers cannot import it
    out, _ = result
    fates = sorted(str(p) for p in (out / "_work" / "candidates").glob("*.parquet"))
    n = pq.read_table(fates, columns=["status"])["status"].to_pylist().count("kept")
    (tmp_path / "weights.bin").write_bytes(b"")
    cfg = LearnedIQAConfig(name="mean-brightness-test", weights_path=str(tmp_path / "weights.bin"), min_score=0.45)
    folder, stamp = tmp_path / "iqa", tmp_path / "iqa.json"

    kept, rejected = _learned_iqa(candidates(fates), cfg, str(folder), fates)
    rows = kept.take_all()
    assert 0 < len(rows) < n and len(rows) + rejected["low_learned_iqa"] == n
    assert all(r["learned_iqa"] >= 0.45 for r in rows)
    written = stamp.stat().st_mtime_ns
    again, rejected_again = _learned_iqa(candidates(fates), cfg, str(folder), fates)
    assert stamp.stat().st_mtime_ns == written and rejected_again == rejected and again.count() == len(rows)
    everything, none = _learned_iqa(candidates(fates), cfg.model_copy(update={"min_score": 0.0}), str(folder), fates)
    assert everything.count() == n and none == {} and stamp.stat().st_mtime_ns != written


def test_missing_metadata_column_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "meta.parquet"
    pd.DataFrame({"URL": ["http://127.0.0.1:9/x.jpg"], "TEXT": ["x"]}).to_parquet(bad)
    assert main(["--metadata", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "meta.parquet" in err and "WIDTH" in err


def test_killed_pipeline_reruns_to_the_same_shards_and_counts(result, tmp_path):
    """`python -m pipelines.filter_laion` killed mid-pass (a candidate shard committed, the slow
    one not), then rerun on the same output: it does only the missing shards."""
    done, report = result
    out, config = tmp_path / "laion", tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # joins this test's Ray
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.filter_laion", "--config", str(config), "--output", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    kill_when_a_shard_is_done(proc, out / "_work" / "candidates", timeout=300)
    assert not (out / "shards").exists() and not (out / "stats.json").exists()  # killed mid-way
    finished = {p: p.stat().st_mtime_ns for p in (out / "_work" / "candidates").glob("*_stats.json")}

    rerun = run(FilterLaionConfig(output=str(out), **CONFIG))
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # a rerun redoes no finished shard
    assert shard_contents(out) == shard_contents(done)
    counts = lambda r: [(s["name"], s["n_in"], s["n_out"], s["rejected"]) for s in r["stages"]]  # noqa: E731
    assert counts(rerun) == counts(report)


def test_a_run_whose_downloads_all_fail_ends_with_empty_shards_index_and_report(tmp_path, caplog):
    """Every URL fails (nothing listens on the port): the run still ends, exit status 0, with no
    shards (an earlier run's are gone), an empty index, the whole report and a warning."""
    dead = f"http://127.0.0.1:{free_port()}"
    good_metadata = {"WIDTH": 1024, "HEIGHT": 768, "similarity": 0.33, "punsafe": 0.01, "pwatermark": 0.01}
    rows = [
        {"URL": f"{dead}/{i}.jpg", "TEXT": f"photo {i}", "hash": i, "AESTHETIC_SCORE": 6.0, **good_metadata}
        for i in range(3)
    ]
    pq.write_table(pa.Table.from_pylist(rows, SCHEMA), tmp_path / "metadata.parquet")
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "00000.tar").write_bytes(b"a shard of an earlier run")

    argv = ["--metadata", str(tmp_path / "metadata.parquet"), "--output", str(out), "--download.timeout", "2"]
    assert main(argv) == 0

    assert sorted(p.name for p in (out / "shards").iterdir()) == ["index.parquet"]
    assert pq.read_table(out / "shards" / "index.parquet").num_rows == 0
    report = json.loads((out / "stats.json").read_text())
    counts = {s["name"]: (s["n_in"], s["n_out"]) for s in report["stages"]}
    assert counts == {"prefilter": (3, 3), "download": (3, 0), "quality": (0, 0), "dedup": (0, 0), "shards": (0, 0)}
    assert report["stages"][1]["rejected"] == {"connection_error": 3} and report["consistent"]
    assert report["warnings"] == ["the download stage kept nothing: the shard set is empty"]
    assert "the download stage kept nothing" in caplog.text
    assert "the download stage kept nothing" in (out / "stats.md").read_text()
    assert (out / "score_histograms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
