"""LAION-2B-en metadata -> quality-filtered WebDataset shards: prefilter -> download -> quality
filter -> near-duplicate removal -> final shards, index and stats report.

    python -m pipelines.filter_laion                                  # the embedded sample
    python -m pipelines.filter_laion --metadata 's3://bucket/laion2B-en/*.parquet' --output s3://bucket/out
    python -m pipelines.filter_laion --config pipelines/configs/filter_laion.yaml [--output DIR]
    python -m pipelines.filter_laion --prefilter.min-side 512 --dedup '{"max_distance": 4}'   # any stage field

Every stage runs on Ray (RAY_ADDRESS joins a cluster). Each stage writes its output completely
before the next starts, and the download resumes finished shards, so a rerun after a crash
continues where it stopped and produces the same shards.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path

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


def run(cfg: FilterLaionConfig) -> dict:
    """Run every stage; returns the stats report (also written to <output>/stats.json)."""
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
        stages = []
        t = time.monotonic()
        pre = prefilter(metadata, f"{work}/prefiltered", cfg.prefilter)
        stages.append(StageStats("prefilter", pre.total, pre.kept, pre.rejected))
        log.info("prefilter: %d -> %d rows (%.0f s)", pre.total, pre.kept, time.monotonic() - t)

        t = time.monotonic()
        dl = download(pre.files, f"{work}/download", cfg.download)
        stages.append(StageStats("download", dl.count, dl.successes, dl.failures))
        log.info(
            "download: %d -> %d images (%.0f s; %.1f images/s/core)",
            dl.count,
            dl.successes,
            time.monotonic() - t,
            dl.images_per_s_per_core,
        )

        t = time.monotonic()
        scored = score_quality(f"{work}/download", cfg.quality).materialize()
        kept, rejected = split_quality(scored)
        kept = kept.materialize()
        n_scored, n_kept = scored.count(), kept.count()
        stages.append(StageStats("quality", n_scored, n_kept, rejected))
        log.info("quality: %d -> %d images (%.0f s)", n_scored, n_kept, time.monotonic() - t)

        t = time.monotonic()
        unique, dup_counts = dedup(kept, cfg.dedup)
        unique = unique.materialize()
        stages.append(StageStats("dedup", n_kept, unique.count(), dup_counts))
        log.info("dedup: %d -> %d images (%.0f s)", n_kept, unique.count(), time.monotonic() - t)

        written = write_shards(unique, f"{out}/shards", cfg.shards)
        stages.append(StageStats("shards", written.n_in, written.n_out, written.rejected))
        scores, failed = summarize_scored(scored, SCORE_NAMES, cfg.report_score_rows)
        files = write_report(out, stages, scores, cfg.quality.thresholds(), failed, n_scored)
    report = json.loads(Path(files["json"]).read_text()) if "://" not in files["json"] else {"files": files}
    log.info(
        "wrote %d shards to %s/shards; index %s; report %s", len(written.shards), out, written.index, files["summary"]
    )
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = parse_config(FilterLaionConfig, argv, __doc__, "python -m pipelines.filter_laion", DEFAULT_CONFIG)
        report = run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"filter-laion: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("stages",) if k in report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
