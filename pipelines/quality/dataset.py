"""The quality filter over shards: WebDataset tars read into rows, rows scored and judged, and the
Ray Data stages that do it at scale.

Rows keep a reference to their bytes (tar URL, offset, size) instead of the bytes themselves,
so everything after scoring moves kilobytes per image; `pipelines.shards` reads the bytes back
when it writes the final shards. The data pipeline scores inside its download tasks
(`pipelines.download`) and runs only `learned_iqa_stage` here; `score_quality`/`filter_quality`
score tars that already exist (any WebDataset shards).

Where the learned scorer runs: as a streaming stage over the candidates that filters them, not
between the CPU scoring and the candidate write. The pass's tasks each commit one shard (tar,
fate parquet, stats) atomically; a GPU stage inside them would make every download task wait on
the actor pool, so GPU capacity would throttle downloads and a killed actor would fail shards.
Over the candidates, the GPU actors see only what the cheap CPU checks kept (~1 in 8 at LAION
scale, so ~8× less GPU work) and Ray Data gives them backpressure and batching on their own;
the cost is that the candidate tars hold the few images the learned scorer then rejects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import tarfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pyarrow as pa

from diffbir.image_io import READABLE_SUFFIXES, ImageError, decode_image
from pipelines.arrow import batched_tables
from pipelines.quality.judge import Decoded, QualityConfig, assess_batch
from pipelines.quality.learned import LearnedIQA, LearnedIQAConfig, learned_iqa_class, load_learned_iqa
from pipelines.quality.measures import SCORE_NAMES, SCORE_TYPES
from pipelines.tars import iter_samples, read_members

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

# a sample of a WebDataset tar, as iter_tar_samples reads it
DOWNLOADED_SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("ext", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("meta", pa.string()),
        ("error", pa.string()),
    ]
)
SCORED_SCHEMA = pa.schema(
    [f for f in DOWNLOADED_SAMPLE_SCHEMA if f.name != "image"]
    + [("sha256", pa.string()), ("phash", pa.string())]
    + [(name, t) for name, t in SCORE_TYPES.items()]
    + [("reasons", pa.list_(pa.string())), ("reason", pa.string()), ("passed", pa.bool_())]
)
_IMAGE_EXTS = tuple(s[1:] for s in READABLE_SUFFIXES)


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Stream one WebDataset tar (fsspec URL) as DOWNLOADED_SAMPLE_SCHEMA rows. A sample without
    an image gets error 'missing_image'; a malformed or truncated tar ends with one row with
    error 'tar_error' (its last, possibly incomplete, sample is dropped)."""
    try:
        for key, members in iter_samples(url):
            ext = next((e for e in _IMAGE_EXTS if e in members), None)
            image = members.get(ext)
            text = {k: members[k].data.decode("utf-8", "replace") if k in members else "" for k in ("txt", "json")}
            yield {
                "key": key,
                "source": url,
                "offset": image and image.offset,
                "size": image and image.size,
                "ext": ext,
                "image": image and image.data,
                "caption": text["txt"],
                "meta": text["json"],
                "error": None if ext else "missing_image",
            }
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        log.warning("unreadable tar %s: %s", url, exc)
        yield dict.fromkeys(DOWNLOADED_SAMPLE_SCHEMA.names) | {
            "key": f"{posixpath.basename(url)}:tar_error",
            "source": url,
            "caption": "",
            "meta": "",
            "error": "tar_error",
        }


def _parse_meta(text: str) -> dict | None:
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def score_rows(
    rows: Sequence[Mapping[str, Any]],
    config: QualityConfig,
    iqa: LearnedIQA | None = None,
    decoded: Sequence[Decoded | None] | None = None,
) -> list[dict]:
    """DOWNLOADED_SAMPLE_SCHEMA rows → SCORED_SCHEMA rows (bytes replaced by their SHA-256).
    `decoded`: per row, its image already decoded (None: decoded here)."""
    out, todo = [], []
    for row, done in zip(rows, decoded or [None] * len(rows)):
        rec = {k: row[k] for k in DOWNLOADED_SAMPLE_SCHEMA.names if k != "image"}
        rec |= dict.fromkeys(SCORE_NAMES) | {
            "sha256": None,
            "phash": None,
            "reasons": [],
            "reason": None,
            "passed": False,
        }
        meta = None if row["error"] else _parse_meta(row["meta"])
        if meta is None and not rec["error"]:
            rec["error"] = "bad_metadata"
        if rec["error"]:
            rec["reasons"] = [rec["error"]]
        else:
            rec["sha256"] = hashlib.sha256(row["image"]).hexdigest()
            todo.append((rec, row["image"], meta, done))
        out.append(rec)
    items = [(img, meta) for _, img, meta, _ in todo]
    for (rec, *_), result in zip(todo, assess_batch(items, config, iqa, [done for *_, done in todo])):
        rec |= result.scores
        rec |= {"phash": result.phash, "reasons": result.reasons}
    for rec in out:
        rec["passed"] = not rec["reasons"]
        rec["reason"] = rec["reasons"][0] if rec["reasons"] else None
    return out


class _Scorer:
    """Ray Data actor: loads the learned scorer (if any) once per worker."""

    def __init__(self, config: QualityConfig):
        cv2.setNumThreads(1)  # parallelism comes from the actors; OpenCV threads would oversubscribe
        self.config = config
        self.iqa = load_learned_iqa(config.learned_iqa) if config.learned_iqa else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(score_rows(batch.to_pylist(), self.config, self.iqa), schema=SCORED_SCHEMA)


def _read_tar_batch(batch: pa.Table, rows_per_block: int = 32) -> Iterator[pa.Table]:
    for url in batch["path"].to_pylist():
        yield from batched_tables(iter_tar_samples(url), DOWNLOADED_SAMPLE_SCHEMA, rows_per_block)


def list_tars(source: str | Sequence[str]) -> list[str]:
    """A directory (local or fsspec URL) → its *.tar, a glob → its matches, a list → itself."""
    import fsspec

    if not isinstance(source, str):
        return list(source)
    fs, path = fsspec.core.url_to_fs(source)
    pattern = path if any(c in path for c in "*?[") else (path.rstrip("/") + "/*.tar" if fs.isdir(path) else path)
    found = sorted(fs.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no tar files at {source}")
    has_protocol = fsspec.core.split_protocol(source)[0] is not None
    return [fs.unstrip_protocol(p) if has_protocol else p for p in found]


def read_tars(source: str | Sequence[str], *, num_cpus: float = 0.25) -> ray.data.Dataset:
    """Streaming read of WebDataset tars: one read task per tar, blocks of 32 samples.
    Reads take a fraction of a CPU (they wait on I/O) so they still get scheduled beside the
    scoring actors on a 2-core machine."""
    import ray.data

    paths = list_tars(source)
    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)).map_batches(
        _read_tar_batch, batch_size=1, batch_format="pyarrow", num_cpus=num_cpus
    )


def score_quality(
    source: str | Sequence[str] | ray.data.Dataset,
    config: QualityConfig | None = None,
    *,
    concurrency: int | None = None,
    num_cpus: float = 0.5,
) -> ray.data.Dataset:
    """Lazy dataset of every sample (kept and rejected) with scores, `reasons` and `passed`.
    `source` is what `list_tars` accepts, or a dataset from `read_tars`. Scoring actors take
    `num_cpus` each (fractional: whole-CPU actors starve the reads on small machines), one per
    cluster CPU by default."""
    import ray

    from pipelines.ray_env import ensure_ray

    ensure_ray()
    ds = source if isinstance(source, ray.data.Dataset) else read_tars(source)
    concurrency = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return ds.map_batches(
        _Scorer,
        fn_constructor_args=(config or QualityConfig(),),
        batch_size=16,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
    )


def split_quality(scored: ray.data.Dataset) -> tuple[ray.data.Dataset, dict[str, int]]:
    """(kept rows, rejected counts by primary reason) of a materialised `score_quality` result."""
    counts = Counter()
    for batch in scored.select_columns(["reason"]).iter_batches(batch_format="pyarrow"):
        counts.update(r for r in batch["reason"].to_pylist() if r)
    from ray.data.expressions import col

    return scored.filter(expr=col("passed")), dict(counts)


def filter_quality(
    source: str | Sequence[str] | ray.data.Dataset, config: QualityConfig | None = None, **kwargs
) -> tuple[ray.data.Dataset, dict[str, int]]:
    """Score every sample once (materialised: rows are small), then split. The counts sum to
    the rejected samples; a broken tar counts once as 'tar_error'. For score distributions over
    all samples, call `score_quality(...).materialize()` and `split_quality` yourself."""
    return split_quality(score_quality(source, config, **kwargs).materialize())


# --------------------------------------------------------------------------- learned IQA stage


class _LearnedScorer:
    """Ray Data actor of `learned_iqa_stage`: loads the scorer once, then per batch reads the
    candidates' bytes by offset, scores the decoded images in one call and judges the score."""

    def __init__(self, config: LearnedIQAConfig, cls: type):
        cv2.setNumThreads(1)
        self.config = config
        self.iqa = load_learned_iqa(config, cls)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        data = read_members(*([r[c] for r in rows] for c in ("source", "offset", "size")))
        scored = []  # (row, pixels) of the decodable ones (the CPU pass decoded every candidate)
        for row, image in zip(rows, data):
            try:
                scored.append((row, decode_image(image, dtype=np.uint8)[0]))
            except ImageError:
                row |= {"reasons": [*row["reasons"], "decode_error"], "passed": False}
        values = np.asarray(self.iqa.score([px for _, px in scored]), dtype=float).reshape(-1) if scored else []
        for (row, _), value in zip(scored, values):
            row["learned_iqa"] = float(value)
            if value < self.config.min_score:
                row |= {"reasons": [*row["reasons"], "low_learned_iqa"], "passed": False}
        for row in rows:
            row["reason"] = row["reasons"][0] if row["reasons"] else None
        return pa.Table.from_pylist(rows, schema=SCORED_SCHEMA)


def learned_iqa_stage(candidates: ray.data.Dataset, config: LearnedIQAConfig) -> ray.data.Dataset:
    """Lazy: `candidates` (SCORED_SCHEMA rows that passed the CPU checks, their bytes in tars)
    with `learned_iqa` scored on `config.actors` actors holding `config.num_gpus` GPUs each, and
    `passed`/`reasons` updated. Ray Data streams it: batches flow through the actors as they are
    read, and backpressure holds the reads when the actors fall behind."""
    import ray.data

    return candidates.map_batches(
        _LearnedScorer,
        fn_constructor_args=(config, learned_iqa_class(config)),
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_cpus=1 if config.num_gpus else 0.5,
        num_gpus=config.num_gpus or None,
        compute=ray.data.ActorPoolStrategy(size=config.actors),
    )
