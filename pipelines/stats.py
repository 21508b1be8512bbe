"""Run report: counts in/out per stage, rejections by reason, score distributions.

`write_report` writes `stats.json` (machine-readable), `stats.md` (for people) and
`score_histograms.png` (each score's histogram with its thresholds marked) to a local directory
or fsspec URL. With the quality stage, distributions are taken over the assessed samples (kept
and rejected), or a uniform sample of them at scale; counts and failed checks are exact. The data
pipeline takes both from the streaming pass's per-shard fate parquets, counted in Ray tasks:

    counts, scores = summarize_fates(result.fates, SCORE_NAMES, max_rows=1_000_000)
    write_report(out, [StageStats("download", counts.total, counts.scored, counts.by_status["failed"]),
                       StageStats("quality", counts.scored, counts.n("kept"), counts.by_status["rejected"]), ...],
                 scores, config.thresholds(), counts.failed_checks, counts.scored)

(`summarize_scored` does the same for a materialised `pipelines.quality.score_quality` result.)
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa

if TYPE_CHECKING:
    import ray.data

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
Thresholds = Mapping[str, Sequence[tuple[str, float]]]  # score → [("min"|"max", value)], as QualityConfig.thresholds()


@dataclass
class StageStats:
    name: str
    n_in: int
    n_out: int
    rejected: dict[str, int] = field(default_factory=dict)  # by primary reason: sums to n_in - n_out


def _numeric(scores: pd.DataFrame) -> dict[str, np.ndarray]:
    """Finite values of each numeric column that has any (an unconfigured learned scorer's
    all-null column is left out)."""
    out = {}
    for name in scores.columns:
        if pd.api.types.is_numeric_dtype(scores[name]) and not pd.api.types.is_bool_dtype(scores[name]):
            values = scores[name].to_numpy(dtype=float)
            if np.isfinite(values).any():
                out[name] = values[np.isfinite(values)]
    return out


def score_distributions(scores: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """For each numeric column: count of finite values, mean and QUANTILES."""
    return {
        name: {
            "count": int(v.size),
            "mean": float(v.mean()),
            "quantiles": {str(q): float(x) for q, x in zip(QUANTILES, np.quantile(v, QUANTILES))},
        }
        for name, v in _numeric(scores).items()
    }


def count_failed_checks(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Every failed check (rows' `reasons` lists), most frequent first: a sample can fail several."""
    return dict(Counter(r for row in rows for r in row["reasons"]).most_common())


def summarize_scored(
    scored: ray.data.Dataset, columns: Sequence[str], max_rows: int, seed: int = 0
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The quality stage's scored rows (materialised) → (`columns` of a uniform sample of about
    `max_rows` rows, or of all rows if there are no more; `count_failed_checks` over all rows,
    streamed), so that the driver never holds every row."""
    failed = count_failed_checks(scored.select_columns(["reasons"]).iter_rows())
    n, sample = scored.count(), scored.select_columns(list(columns))
    if n > max_rows:
        sample = sample.random_sample(max_rows / n, seed=seed)
    return sample.to_pandas(), failed


FAILED = "failed"  # the fate of a row that was never scored (pipelines.download.FATE_SCHEMA)
_COUNTS = pa.schema([("check", pa.bool_()), ("status", pa.string()), ("reason", pa.string()), ("n", pa.int64())])


@dataclass
class FateCounts:
    """Rows of fate parquets by status and reason (reason "" for none), and every failed check of
    the scored rows (all but FAILED; a row can fail several)."""

    by_status: dict[str, dict[str, int]] = field(default_factory=dict)
    failed_checks: dict[str, int] = field(default_factory=dict)

    def n(self, status: str) -> int:
        return sum(self.by_status.get(status, {}).values())

    @property
    def total(self) -> int:
        return sum(map(sum, (d.values() for d in self.by_status.values())))

    @property
    def scored(self) -> int:
        return self.total - self.n(FAILED)


def _count_fates(batch: pa.Table) -> pa.Table:
    """One block of fate rows → its counts (a few rows), so only counts reach the driver."""
    status, reason, reasons = (batch[c].to_pylist() for c in ("status", "reason", "reasons"))
    fates = Counter(zip(status, (r or "" for r in reason)))
    checks = Counter(r for s, rs in zip(status, reasons) if s != FAILED for r in rs or ())
    rows = [(False, s, r, n) for (s, r), n in fates.items()] + [(True, "", r, n) for r, n in checks.items()]
    return pa.Table.from_pylist([dict(zip(_COUNTS.names, row)) for row in rows], schema=_COUNTS)


def summarize_fates(
    files: Sequence[str], columns: Sequence[str], max_rows: int, seed: int = 0
) -> tuple[FateCounts, pd.DataFrame]:
    """Fate parquets (`status`, `reason`, `reasons` and score columns) → (exact counts, `columns`
    of a uniform sample of about `max_rows` scored rows, or of all if there are no more). Both
    are computed in Ray tasks; the driver holds the counts and the sample only."""
    if not files:
        return FateCounts(), pd.DataFrame(columns=list(columns))
    import ray.data
    from ray.data.expressions import col

    counts = FateCounts()
    blocks = ray.data.read_parquet(list(files)).select_columns(["status", "reason", "reasons"])
    for row in blocks.map_batches(_count_fates, batch_format="pyarrow").iter_rows():
        into = counts.failed_checks if row["check"] else counts.by_status.setdefault(row["status"], {})
        into[row["reason"]] = into.get(row["reason"], 0) + row["n"]
    counts.by_status = {s: dict(sorted(d.items())) for s, d in sorted(counts.by_status.items())}
    counts.failed_checks = dict(sorted(counts.failed_checks.items(), key=lambda kv: (-kv[1], kv[0])))
    sample = (
        ray.data.read_parquet(list(files)).select_columns(["status", *columns]).filter(expr=col("status") != FAILED)
    )
    if counts.scored > max_rows:
        sample = sample.random_sample(max_rows / counts.scored, seed=seed)
    scores = sample.drop_columns(["status"]).to_pandas() if counts.scored else pd.DataFrame(columns=list(columns))
    return counts, scores


def build_report(
    stages: Sequence[StageStats],
    scores: pd.DataFrame | None = None,
    thresholds: Thresholds | None = None,
    failed_checks: Mapping[str, int] | None = None,
    scores_of: int | None = None,
    failed_shards: Sequence[Mapping[str, Any]] = (),
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """`scores`: score columns of the assessed samples (kept and rejected), all of them or a
    uniform sample of `scores_of`; `failed_checks`: `count_failed_checks` over all of them;
    `failed_shards`: one mapping per shard task that failed (stage, shard, rows, error);
    `warnings`: what the run's operator must know. `consistent` is true when each stage's
    rejections account for its losses and each stage starts with what the previous one kept."""
    rows = [asdict(s) | {"unaccounted": s.n_in - s.n_out - sum(s.rejected.values())} for s in stages]
    chained = all(a.n_out == b.n_in for a, b in zip(stages, stages[1:]))
    report = {
        "stages": rows,
        "total": {"in": stages[0].n_in, "out": stages[-1].n_out} if stages else {"in": 0, "out": 0},
        "consistent": chained and all(r["unaccounted"] == 0 for r in rows),
        "thresholds": {k: [list(t) for t in v] for k, v in (thresholds or {}).items()},
        "scores": {},
        "failed_checks": dict(failed_checks or {}),
        "failed_shards": [dict(f) for f in failed_shards],
        "warnings": list(warnings),
    }
    if scores is not None:
        report["scores"] = score_distributions(scores)
        report["scores_sampled"] = {"rows": len(scores), "of": scores_of if scores_of is not None else len(scores)}
    return report


def summary_markdown(report: Mapping[str, Any]) -> str:
    total = report["total"]
    lines = [
        "# Data pipeline report",
        "",
        f"{total['in']} samples in, {total['out']} out "
        f"({100 * total['out'] / max(total['in'], 1):.1f} % kept). "
        f"Counts consistent: {'yes' if report['consistent'] else 'NO'}.",
        "",
        "| stage | in | out | rejected | kept % |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in report["stages"]:
        lines.append(
            f"| {s['name']} | {s['n_in']} | {s['n_out']} | {s['n_in'] - s['n_out']} | "
            f"{100 * s['n_out'] / max(s['n_in'], 1):.1f} |"
        )
    if report["warnings"]:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in report["warnings"])]
    if report["failed_shards"]:
        lines += [
            "",
            "## Failed shards (rerun to retry)",
            "",
            "| stage | shard | rows | error |",
            "|---|---:|---:|---|",
        ]
        lines += [f"| {f['stage']} | {f['shard']} | {f['rows']} | {f['error']} |" for f in report["failed_shards"]]
    lines += ["", "## Rejections by reason", "", "| stage | reason | count | % of stage input |", "|---|---|---:|---:|"]
    for s in report["stages"]:
        for reason, n in sorted(s["rejected"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {s['name']} | {reason} | {n} | {100 * n / max(s['n_in'], 1):.1f} |")
    if report["failed_checks"]:
        lines += [
            "",
            "Failed checks (a sample can fail several; measuring stops at the first group of scores with "
            "a failure, so a rejected sample lacks the later checks and scores unless `quality.measure_all`): "
            + ", ".join(f"{k} {v}" for k, v in report["failed_checks"].items())
            + ".",
        ]
    if report["scores"]:
        sampled = report["scores_sampled"]
        over = (
            f"a uniform sample of {sampled['rows']} of the {sampled['of']} assessed samples"
            if sampled["rows"] < sampled["of"]
            else "every assessed sample"
        )
        lines += [
            "",
            "## Score distributions",
            "",
            f"Over {over}.",
            "",
            "| score | n | p1 | p5 | median | p95 | p99 | thresholds |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, d in report["scores"].items():
            q = d["quantiles"]
            limits = ", ".join(f"{b} {v:g}" for b, v in report["thresholds"].get(name, []))
            lines.append(
                f"| {name} | {d['count']} | "
                + " | ".join(f"{q[k]:.4g}" for k in ("0.01", "0.05", "0.5", "0.95", "0.99"))
                + f" | {limits} |"
            )
    return "\n".join(lines) + "\n"


def plot_histograms(scores: pd.DataFrame, thresholds: Thresholds | None = None) -> bytes:
    """PNG bytes: a histogram per numeric score, thresholds as red dashed lines."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    thresholds = thresholds or {}
    columns = _numeric(scores)
    ncols = 4
    nrows = max(1, math.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 2.8 * nrows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, columns.items()):
        ax.hist(values, bins=50, color="steelblue")
        for bound, value in thresholds.get(name, []):
            ax.axvline(value, color="red", linestyle="--", label=f"{bound} {value:g}")
        if thresholds.get(name):
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(columns) :]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_report(
    output: str,
    stages: Sequence[StageStats],
    scores: pd.DataFrame | None = None,
    thresholds: Thresholds | None = None,
    failed_checks: Mapping[str, int] | None = None,
    scores_of: int | None = None,
    failed_shards: Sequence[Mapping[str, Any]] = (),
    warnings: Sequence[str] = (),
) -> dict[str, str]:
    """Write stats.json, stats.md and (with scores) score_histograms.png; returns their URLs.
    The arguments are `build_report`'s."""
    report = build_report(stages, scores, thresholds, failed_checks, scores_of, failed_shards, warnings)
    files = {
        "json": ("stats.json", json.dumps(report, indent=2).encode()),
        "summary": ("stats.md", summary_markdown(report).encode()),
    }
    if scores is not None:
        files["histograms"] = ("score_histograms.png", plot_histograms(scores, thresholds))
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    paths = {}
    for kind, (name, data) in files.items():
        fs.pipe_file(f"{root}/{name}", data)
        paths[kind] = f"{output.rstrip('/')}/{name}"
    return paths
