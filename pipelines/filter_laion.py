"""LAION-2B-en metadata -> quality-filtered WebDataset shards: prefilter -> one streaming pass
from URL to candidate (download, decode, size checks, quality measures and judge in the same
task, per download shard) -> [learned IQA] -> near-duplicate removal -> final shards, index and
stats report.

    python -m pipelines.filter_laion                                  # the embedded sample
    python -m pipelines.filter_laion --metadata 's3://bucket/laion2B-en/*.parquet' --output s3://bucket/out
    python -m pipelines.filter_laion --config pipelines/configs/filter_laion.yaml [--output DIR]
    python -m pipelines.filter_laion --prefilter.min-side 512 --dedup '{"max_distance": 4}'   # any stage field

Every stage runs on Ray (RAY_ADDRESS joins a cluster). The streaming pass (`pipelines.download`)
writes, per shard, only the images that pass the CPU quality checks (candidate tars) and a small
parquet with every row's fate and reason; the rejected majority is never stored. Those parquets
are what the report counts and what the later stages read. A learned IQA scorer, when configured
(`quality.learned_iqa`), is a separate streaming Ray Data stage on (GPU) actors over the
candidates (`pipelines.quality.learned_iqa_stage`); it writes the scored candidates once, so that
a rerun reuses them. The pass commits each shard atomically and a rerun does only the missing
ones, so a run killed at any point and rerun produces the same shards. A shard that still fails
after its retries is named in the report and the run finishes without it (exit status 3); a
rerun does only the shards that are missing. A stage that keeps nothing ends the run with an
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
from ray.data.expressions import col

from diffbir.config import parse_config
from pipelines.dedup import DedupConfig, dedup
from pipelines.download import FAILED, KEPT, REJECTED, DownloadConfig, download
from pipelines.prefilter import PrefilterConfig, prefilter
from pipelines.quality import SCORE_NAMES, SCORED_SCHEMA, LearnedIQAConfig, QualityConfig, learned_iqa_stage
from pipelines.ray_env import ensure_ray
from pipelines.sample import embedded_sample
from pipelines.shards import ShardConfig, write_shards
from pipelines.stats import StageStats, summarize_fates, write_report

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
    scores: pd.DataFrame | None = None  # scores of (a uniform sample of) the assessed samples
    n_scored: int = 0
    failed_checks: dict[str, int] = field(default_factory=dict)
    unique: ray.data.Dataset | None = None  # the samples to write; None: a stage kept nothing


def candidates(fates: list[str]) -> ray.data.Dataset:
    """The kept rows of the streaming pass's fate parquets, as the quality filter's records
    (SCORED_SCHEMA): what dedup and the shard writer take."""
    ds = ray.data.read_parquet(fates).select_columns(["status", *SCORED_SCHEMA.names])
    return ds.filter(expr=col("status") == KEPT).drop_columns(["status"])


def _learned_iqa(
    kept: ray.data.Dataset, config: LearnedIQAConfig, folder: str, fates: list[str]
) -> tuple[ray.data.Dataset, dict[str, int]]:
    """Run the learned-IQA stage over the candidates `kept` (of the shards `fates`) once: its
    output (every candidate with its score) is written to `folder` by the workers and stamped
    with the config and the shards, so that a rerun over the same ones reuses it. Returns the
    candidates that pass and the rejections by reason, counted in Ray tasks."""
    fs, path = fsspec.core.url_to_fs(folder)
    stamp, stamp_path = json.dumps({"config": config.model_dump(), "shards": fates}), f"{path}.json"
    if not (fs.exists(stamp_path) and fs.cat_file(stamp_path).decode() == stamp):
        if fs.exists(path):
            fs.rm(path, recursive=True)
        learned_iqa_stage(kept, config).write_parquet(folder)
        fs.pipe_file(stamp_path, stamp.encode())
    scored = ray.data.read_parquet(folder)
    rejected = scored.filter(expr=~col("passed")).groupby("reason").count().take_all()
    return scored.filter(expr=col("passed")), {r["reason"]: r["count()"] for r in rejected}


def _filter(cfg: FilterLaionConfig, metadata: list[str], work: str) -> _Filtered:
    """Prefilter, the streaming pass (download and quality filter), learned IQA and dedup,
    each counted; stops after a stage that keeps nothing (the next would have no input)."""
    done = _Filtered()
    t = time.monotonic()
    pre = prefilter(metadata, f"{work}/prefiltered", cfg.prefilter)
    done.stages.append(StageStats("prefilter", pre.total, pre.kept, pre.rejected))
    log.info("prefilter: %d -> %d rows (%.0f s)", pre.total, pre.kept, time.monotonic() - t)
    if not pre.kept:
        return done

    t = time.monotonic()
    dl = download(pre.files, f"{work}/candidates", cfg.download, cfg.quality)
    done.failed_shards = [{"stage": "download"} | asdict(f) for f in dl.failed]
    fates, done.scores = summarize_fates(dl.fates, SCORE_NAMES, cfg.report_score_rows)
    done.n_scored, done.failed_checks = fates.scored, fates.failed_checks
    # rows of failed shards count as rejected, so that the stage still adds up
    rejected = fates.by_status.get(FAILED, {}) | ({"shard_failed": dl.failed_rows} if dl.failed else {})
    done.stages.append(StageStats("download", fates.total + dl.failed_rows, fates.scored, rejected))
    log.info(
        "download+score: %d -> %d images downloaded, %d candidates (%.0f s; %.1f images/s/core)",
        fates.total + dl.failed_rows,
        fates.scored,
        fates.n(KEPT),
        time.monotonic() - t,
        dl.images_per_s_per_core,
    )
    if not fates.scored:
        return done

    rejected, n_kept = dict(fates.by_status.get(REJECTED, {})), fates.n(KEPT)
    kept = candidates(dl.fates)
    if cfg.quality.learned_iqa and n_kept:
        t = time.monotonic()
        kept, iqa_rejected = _learned_iqa(kept, cfg.quality.learned_iqa, f"{work}/learned_iqa", dl.fates)
        for reason, n in iqa_rejected.items():
            rejected[reason] = rejected.get(reason, 0) + n
            done.failed_checks[reason] = done.failed_checks.get(reason, 0) + n
        n_kept -= sum(iqa_rejected.values())
        log.info("learned IQA: %d rejected (%.0f s)", sum(iqa_rejected.values()), time.monotonic() - t)
    done.stages.append(StageStats("quality", fates.scored, n_kept, rejected))
    log.info("quality: %d -> %d images", fates.scored, n_kept)
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
        scores = done.scores if done.scores is not None else pd.DataFrame(columns=list(SCORE_NAMES))
        files = write_report(
            out,
            done.stages,
            scores,
            cfg.quality.thresholds(),
            done.failed_checks,
            done.n_scored,
            done.failed_shards,
            warnings,
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
