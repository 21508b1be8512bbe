"""Run report: counts in/out per stage, rejections by reason, score distributions.

`write_report` writes `stats.json` (machine-readable), `stats.md` (for people) and
`score_histograms.png` (each score's histogram with its thresholds marked) to a local directory
or fsspec URL. With the quality stage, distributions are best taken over every assessed sample:

    scored = score_quality(tars, config).materialize()
    kept, rejected = split_quality(scored)
    scores = scored.select_columns([*SCORE_NAMES, "reasons"]).to_pandas()
    write_report(out, [StageStats("quality", scored.count(), kept.count(), rejected), ...],
                 scores, config.thresholds())
"""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import fsspec
import numpy as np
import pandas as pd

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
    return {name: {"count": int(v.size), "mean": float(v.mean()),
                   "quantiles": {str(q): float(x) for q, x in zip(QUANTILES, np.quantile(v, QUANTILES))}}
            for name, v in _numeric(scores).items()}


def build_report(stages: Sequence[StageStats], scores: pd.DataFrame | None = None,
                 thresholds: Thresholds | None = None) -> dict[str, Any]:
    """`scores`: one row per assessed sample (e.g. the quality stage's score columns, kept and
    rejected); a `reasons` column (lists) adds counts of every failed check, not only the primary.
    `consistent` is true when each stage's rejections account for its losses and each stage
    starts with what the previous one kept."""
    rows = [asdict(s) | {"unaccounted": s.n_in - s.n_out - sum(s.rejected.values())} for s in stages]
    chained = all(a.n_out == b.n_in for a, b in zip(stages, stages[1:]))
    report = {
        "stages": rows,
        "total": {"in": stages[0].n_in, "out": stages[-1].n_out} if stages else {"in": 0, "out": 0},
        "consistent": chained and all(r["unaccounted"] == 0 for r in rows),
        "thresholds": {k: [list(t) for t in v] for k, v in (thresholds or {}).items()},
        "scores": {},
        "failed_checks": {},
    }
    if scores is not None:
        report["scores"] = score_distributions(scores)
        if "reasons" in scores:
            report["failed_checks"] = dict(Counter(r for reasons in scores["reasons"] for r in reasons).most_common())
    return report


def summary_markdown(report: Mapping[str, Any]) -> str:
    total = report["total"]
    lines = ["# Data pipeline report", "",
             f"{total['in']} samples in, {total['out']} out "
             f"({100 * total['out'] / max(total['in'], 1):.1f} % kept). "
             f"Counts consistent: {'yes' if report['consistent'] else 'NO'}.", "",
             "| stage | in | out | rejected | kept % |", "|---|---:|---:|---:|---:|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['n_in']} | {s['n_out']} | {s['n_in'] - s['n_out']} | "
                     f"{100 * s['n_out'] / max(s['n_in'], 1):.1f} |")
    lines += ["", "## Rejections by reason", "", "| stage | reason | count | % of stage input |", "|---|---|---:|---:|"]
    for s in report["stages"]:
        for reason, n in sorted(s["rejected"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {s['name']} | {reason} | {n} | {100 * n / max(s['n_in'], 1):.1f} |")
    if report["failed_checks"]:
        lines += ["", "Every failed check (a sample can fail several): "
                  + ", ".join(f"{k} {v}" for k, v in report["failed_checks"].items()) + "."]
    if report["scores"]:
        lines += ["", "## Score distributions", "", "| score | n | p1 | p5 | median | p95 | p99 | thresholds |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, d in report["scores"].items():
            q = d["quantiles"]
            limits = ", ".join(f"{b} {v:g}" for b, v in report["thresholds"].get(name, []))
            lines.append(f"| {name} | {d['count']} | " + " | ".join(f"{q[k]:.4g}" for k in ("0.01", "0.05", "0.5", "0.95", "0.99"))
                         + f" | {limits} |")
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
    for ax in list(axes.flat)[len(columns):]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_report(output: str, stages: Sequence[StageStats], scores: pd.DataFrame | None = None,
                 thresholds: Thresholds | None = None) -> dict[str, str]:
    """Write stats.json, stats.md and (with scores) score_histograms.png; returns their URLs."""
    report = build_report(stages, scores, thresholds)
    files = {"json": ("stats.json", json.dumps(report, indent=2).encode()),
             "summary": ("stats.md", summary_markdown(report).encode())}
    if scores is not None:
        files["histograms"] = ("score_histograms.png", plot_histograms(scores, thresholds))
    fs, root = fsspec.core.url_to_fs(output)
    fs.makedirs(root, exist_ok=True)
    paths = {}
    for kind, (name, data) in files.items():
        fs.pipe_file(f"{root}/{name}", data)
        paths[kind] = f"{output.rstrip('/')}/{name}"
    return paths
