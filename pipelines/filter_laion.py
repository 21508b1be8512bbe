"""LAION-2B-en metadata -> quality-filtered WebDataset shards: prefilter -> download -> quality
filter -> near-duplicate removal -> final shards, index and stats report.

    python -m pipelines.filter_laion                                  # the embedded sample
    python -m pipelines.filter_laion --metadata 's3://bucket/laion2B-en/*.parquet' --output s3://bucket/out
    python -m pipelines.filter_laion --config pipelines/configs/filter_laion.yaml [--output DIR]
    python -m pipelines.filter_laion --prefilter.min-side 512 --dedup '{"max_distance": 4}'   # any stage field

Every stage runs on Ray (RAY_ADDRESS joins a cluster). Each stage writes its output completely
before the next starts, and the download resumes finished shards, so a rerun after a crash
continues where it stopped and produces the same shards. A download shard that still fails after
its retries is named in the report and the run finishes without it (exit status 3); a rerun
downloads only the shards that are missing. A stage that keeps nothing ends the run with an
empty shard set, its index and the report (exit status 0, a warning).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import pandas as pd
import ray.data
from pydantic import BaseModel, ConfigDict, Field

from diffbir.config import parse_config
from pipelines.dedup import DedupConfig, dedup
from pipelines.download import DownloadConfig, download
from pipelines.prefilter import PrefilterConfig, prefilter
from pipelines.quality import SCORE_NAMES, QualityConfig, score_quality, split_quality
from pipelines.ray_env import ensure_ray
from pipelines.sample import embedded_sample
from pipelines.shards import ShardConfig, write_shards
from pipelines.stats import StageStats, summarize_scored, write_report

log = logging.getLogger("filter_laion")
DEFAULT_CONFIG = Path(__file__).parent / "configs" / "filter_laion.yaml"


class SampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slow_seconds: float = Field(30.0, gt=0, description="the deliberately slow URL answers after this")
    port: int = Field(
        0,
        ge=0,
        le=65535,
        description="loopback port of the sample's server; 0: any free one "
        "(a rerun on the same output reuses the previous)",
    )


class FilterLaionConfig(BaseModel):
    """The whole pipeline; each section is one stage's config."""

    model_config = ConfigDict(extra="forbid")
    metadata: list[str] | None = Field(
        None, description="LAION parquet files, globs or URLs; None: the embedded sample"
    )
    output: str = Field("runs/laion", description="output directory or fsspec URL")
    sample: SampleConfig = Field(default_factory=SampleConfig)
    prefilter: PrefilterConfig = Field(default_factory=PrefilterConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    report_score_rows: int = Field(
        1_000_000,
        ge=1000,
        description="score distributions and histograms in the report use a uniform "
        "sample of at most this many assessed samples (bounds the driver's memory; counts are never sampled)",
    )


STAGES = ("prefilter", "download", "quality", "dedup", "shards")
EXIT_FAILED_SHARDS = 3  # the run finished, but some download shards failed: rerun to retry them


@dataclass
class _Filtered:
    """What the stages before the shard writer produced and reported."""

    stages: list[StageStats] = field(default_factory=list)
    failed_shards: list[dict] = field(default_factory=list)
    scored: ray.data.Dataset | None = None  # every assessed sample, for the report's scores
    unique: ray.data.Dataset | None = None  # the samples to write; None: a stage kept nothing


def _filter(cfg: FilterLaionConfig, metadata: list[str], work: str) -> _Filtered:
    """Prefilter, download, quality filter and dedup, each counted; stops after a stage that
    keeps nothing (the next would have no input to read)."""
    done = _Filtered()
    t = time.monotonic()
    pre = prefilter(metadata, f"{work}/prefiltered", cfg.prefilter)
    done.stages.append(StageStats("prefilter", pre.total, pre.kept, pre.rejected))
    log.info("prefilter: %d -> %d rows (%.0f s)", pre.total, pre.kept, time.monotonic() - t)
    if not pre.kept:
        return done

    t = time.monotonic()
    dl = download(pre.files, f"{work}/download", cfg.download)
    # rows of failed shards count as rejected, so that the stage still adds up
    rejected = dl.failures | ({"shard_failed": dl.failed_rows} if dl.failed else {})
    done.stages.append(StageStats("download", dl.count + dl.failed_rows, dl.successes, rejected))
    done.failed_shards = [{"stage": "download"} | asdict(f) for f in dl.failed]
    log.info(
        "download: %d -> %d images (%.0f s; %.1f images/s/core)",
        dl.count + dl.failed_rows,
        dl.successes,
        time.monotonic() - t,
        dl.images_per_s_per_core,
    )
    if not dl.successes:
        return done

    t = time.monotonic()
    done.scored = score_quality(dl.tars, cfg.quality).materialize()
    kept, rejected = split_quality(done.scored)
    kept = kept.materialize()
    n_scored, n_kept = done.scored.count(), kept.count()
    done.stages.append(StageStats("quality", n_scored, n_kept, rejected))
    log.info("quality: %d -> %d images (%.0f s)", n_scored, n_kept, time.monotonic() - t)
    if not n_kept:
        return done

    t = time.monotonic()
    unique, dup_counts = dedup(kept, cfg.dedup)
    done.unique = unique.materialize()
    n_unique = done.unique.count()
    done.stages.append(StageStats("dedup", n_kept, n_unique, dup_counts))
    log.info("dedup: %d -> %d images (%.0f s)", n_kept, n_unique, time.monotonic() - t)
    return done


def _warnings(done: _Filtered) -> list[str]:
    warnings = []
    if done.failed_shards:
        shards = ", ".join(str(f["shard"]) for f in done.failed_shards)
        warnings.append(f"download shard(s) {shards} failed: rerun the same command to retry only them")
    if done.unique is None:
        warnings.append(f"the {done.stages[-1].name} stage kept nothing: the shard set is empty")
    return warnings


def run(cfg: FilterLaionConfig) -> dict:
    """Run every stage; returns the stats report (also written to <output>/stats.json). A stage
    that keeps nothing ends the run with an empty shard set, its index and the report, and a
    warning; download shards that failed are named in the report's `failed_shards`."""
    out = cfg.output.rstrip("/")
    work = f"{out}/_work"
    with ExitStack() as stack:
        metadata = cfg.metadata
        if metadata is None:
            sample = stack.enter_context(
                embedded_sample(Path(work) / "sample", cfg.sample.slow_seconds, cfg.sample.port)
            )
            metadata = [str(p) for p in sample.metadata]
            log.info("embedded sample: %d metadata rows served from %s", len(sample.rows), sample.base_url)
        ensure_ray()
        done = _filter(cfg, metadata, work)
        warnings = _warnings(done)
        if done.unique is None:  # the stages after the empty one had nothing to do
            done.stages += [StageStats(name, 0, 0) for name in STAGES[len(done.stages) : -1]]
        for warning in warnings:
            log.warning(warning)

        written = write_shards(done.unique if done.unique is not None else [], f"{out}/shards", cfg.shards)
        done.stages.append(StageStats("shards", written.n_in, written.n_out, written.rejected))
        if done.scored is not None:
            scores, failed = summarize_scored(done.scored, SCORE_NAMES, cfg.report_score_rows)
            n_scored = done.scored.count()
        else:
            scores, failed, n_scored = pd.DataFrame(columns=list(SCORE_NAMES)), {}, 0
        files = write_report(
            out, done.stages, scores, cfg.quality.thresholds(), failed, n_scored, done.failed_shards, warnings
        )
    with fsspec.open(files["json"]) as f:
        report = json.load(f)
    log.info(
        "wrote %d shards to %s/shards; index %s; report %s", len(written.shards), out, written.index, files["summary"]
    )
    return report


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 an error, EXIT_FAILED_SHARDS done without some download shards."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = parse_config(FilterLaionConfig, argv, __doc__, "python -m pipelines.filter_laion", DEFAULT_CONFIG)
        report = run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"filter-laion: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("stages", "failed_shards", "warnings")}, indent=1))
    return EXIT_FAILED_SHARDS if report["failed_shards"] else 0


if __name__ == "__main__":
    sys.exit(main())
