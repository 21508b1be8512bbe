"""The training feed: WebDataset shards (or a plain folder of images) → batches of
(HQ in [-1, 1], LQ in [0, 1], prompt) for one training rank.

    index = index_samples("s3://bucket/shards")            # once, on the driver
    for batch in rank_batches(cfg, index, rank, world, batch_size=32, start=pos, count=n):
        batch["hq"], batch["lq"], batch["prompt"]          # (B,3,H,W), (B,3,H,W), B strings

An HQ-only sample is degraded on the fly (cfg.degradation). A paired sample brings its own LQ: a
folder with hq/ and lq/ (or data + lq_data) matched by relative path, suffix aside, or shard
samples with hq.* and lq.* members. Both get the same crop (the LQ's at 1/lq_scale of the HQ's,
for super-resolution pairs) and flip; the LQ is then fed at the HQ size (bicubic), as DiffBIR
feeds every LQ. Pairs without a partner, of another size ratio or with an unreadable header are
left out of the index and reported by name (pair_report).

Every sample is a pure function of (seed, epoch, sample id), so a run is reproducible and can
resume from any position without replaying the samples before it:
- the index lists every sample once (shard URL, byte range of its image, caption), in shard order;
- epoch e visits the samples in a permutation drawn from (seed, e); rank r of W takes every W-th
  of them, from offset r, truncated to N // W so ranks never overlap and all see equal counts;
- a sample's crop, flip, degradation and caption drop come from its own generator, seeded with
  (seed, epoch, id): the same on any rank, worker or world size.

Ray Data does the work: a small datasource emits the rank's stream positions, `map_batches`
reads each sample's bytes by offset, decodes, crops and degrades on CPU tasks with fractional
CPUs (fused with the read, one task per batch), and `iter_torch_batches` hands the batches to the
training loop in order. Each rank builds its own dataset from its position rather than taking
`get_dataset_shard`: Ray's streaming split routes blocks to whichever rank asks first, which
neither keeps a rank's order nor lets a restarted worker start mid-epoch.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn

from diffbir.config import Arg, parse_config
from diffbir.image_io import READABLE_SUFFIXES, ImageError, decode_image, encode_image
from pipelines.config import Degradation, Location
from pipelines.degradations import degrade_pair, load_degradation
from pipelines.shards import SHARD_INDEX, atomic_write, write_tar
from pipelines.tars import iter_samples, read_members

# index_samples: where each sample's image bytes lie (built from the shards pipelines.shards' index lists);
# lq_*: a paired sample's LQ image (null: degrade the HQ on the fly)
FEED_INDEX_SCHEMA = pa.schema(
    [
        ("url", pa.string()),
        ("key", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("caption", pa.string()),
        ("lq_url", pa.string()),
        ("lq_offset", pa.int64()),
        ("lq_size", pa.int64()),
    ]
)
PAIRS_META = b"pairs"  # the index's schema metadata: the pair report (JSON), for paired data
HEADER_BYTES = 1 << 16  # read to find an image's size (the whole image when its header runs past it)
HEADER_CHUNK = 1024  # images whose headers are read at once (bounds the driver's memory)
log = logging.getLogger(__name__)
# Ray Data plans every read task of a dataset up front: a long run reads in segments of this many batches
SEGMENT_BATCHES = 1000
# salts of the generators drawn from the seed: epoch order, training samples, validation samples
_ORDER, _SAMPLE, _VAL = 0, 1, 2


class FeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Location = Field(
        description="WebDataset shards (the data pipeline's output directory, read by its index.parquet; "
        "a directory, glob or fsspec URL of *.tar) or a folder of images; paired data: a folder with hq/ "
        "and lq/ (matched by relative path), shards with hq.* and lq.* members, or the HQ folder of lq_data"
    )
    lq_data: Location | None = Field(
        None,
        description="paired data: the folder of LQ images matched to data's HQ images by relative path, "
        "suffix aside (not needed when data has hq/ and lq/)",
    )
    lq_scale: int = Field(
        1,
        ge=1,
        le=16,
        description="paired data: HQ size / LQ size, LQ = floor(HQ / scale) (4: x4 super-resolution pairs); "
        "pairs of another ratio are skipped and reported",
    )
    crop_size: int = Field(512, ge=8, description="side of the random square crop")
    degradation: Degradation = Field(
        "first_order",
        description="degradation model: a bundled name (first_order, realesrgan, codeformer_face) or a YAML file",
    )
    caption_drop_rate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="probability of an empty prompt (1: always empty, as the DiffBIR paper; the official code "
        "trains stage 2 with 0.5 (v2) and 0.2 (v2.1))",
    )
    seed: int = Field(231, ge=0, description="seeds the sample order, crops, degradations and training noise")
    data_cpus: float = Field(
        0.25,
        gt=0,
        description="CPUs reserved by each crop+degrade task (fractional: tasks must fit beside the trainers)",
    )
    data_workers: int = Field(4, ge=1, description="most crop+degrade tasks in flight per rank")
    prefetch_batches: int = Field(2, ge=0, description="batches prepared ahead of the training loop")

    @model_validator(mode="after")
    def _crop_fits_the_scale(self) -> FeedConfig:
        if self.crop_size % self.lq_scale:
            raise ValueError(
                f"crop_size {self.crop_size} must be a multiple of lq_scale {self.lq_scale}: the LQ crop is "
                "crop_size / lq_scale"
            )
        return self


# ---------------------------------------------------------------------------------------------
# The sample index


def index_samples(source: str, lq_source: str | None = None, scale: int = 1) -> pa.Table:
    """Every sample of `source` as (url, key, offset, size, caption[, lq_url, lq_offset, lq_size])
    in a fixed order: shards by name, samples in tar order; or images by path, their caption from
    a sibling `.txt` file. A directory with the data pipeline's `index.parquet` is read as the
    shards that index lists (a stale or stray tar beside them is not); one without, as its *.tar.

    Paired data: `lq_source`, a folder of LQ images matched to the folder `source` by relative
    path (suffix aside); a `source` folder with hq/ and lq/; or shard samples with hq.* and lq.*
    members. Pairs without a partner, whose LQ is not floor(HQ / scale) or whose header does not
    decode are left out and reported: a log warning, and the table's metadata (pair_report)."""
    fs, path = fsspec.core.url_to_fs(source)
    path = path.rstrip("/")
    if lq_source is None and fs.isdir(f"{path}/hq") and fs.isdir(f"{path}/lq"):
        path, lq_source = f"{path}/hq", fs.unstrip_protocol(f"{path}/lq")
    if lq_source is not None:
        rows = _pair_folders(fs, path, lq_source)
    else:
        rows = _index_source(fs, path, source)
    rows, report = _check_pairs(rows, scale)
    if report is not None:
        (log.warning if report.skipped else log.info)("%s: %s", source, report)
    if not rows:
        found = f" ({report})" if report is not None else ""
        raise FileNotFoundError(
            f"no samples at {source}: expected *.tar WebDataset shards or {' '.join(READABLE_SUFFIXES)} images{found}"
        )
    table = pa.Table.from_pylist(rows, schema=FEED_INDEX_SCHEMA)
    return table.replace_schema_metadata({PAIRS_META: json.dumps(asdict(report))}) if report else table


def _index_source(fs: fsspec.AbstractFileSystem, path: str, source: str) -> list[dict]:
    index = f"{path}/{SHARD_INDEX}"
    if any(c in path for c in "*?["):
        tars = sorted(fs.glob(path))
    elif path.endswith(".tar"):
        tars = [path]
    elif fs.isfile(index):
        tars = _listed_shards(fs, index)
        if not tars:
            raise FileNotFoundError(f"no samples at {source}: its {SHARD_INDEX} lists no shards")
    else:
        tars = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
    if tars:
        with ThreadPoolExecutor(8) as pool:  # header reads are I/O bound
            return [row for shard in pool.map(functools.partial(_index_tar, fs), tars) for row in shard]
    return _index_folder(fs, path)


def _listed_shards(fs: fsspec.AbstractFileSystem, index: str) -> list[str]:
    """The paths of the shards the pipeline's index lists, by name (names are relative to it)."""
    with fs.open(index, "rb") as f:
        names = set(pq.read_table(f, columns=["shard"])["shard"].to_pylist())
    return [posixpath.join(posixpath.dirname(index), name) for name in sorted(names)]


def _index_tar(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """Scan the tar headers (the image bytes are skipped by seeking), read the captions."""
    samples = []
    url = fs.unstrip_protocol(path)
    for key, members in iter_samples(path, read=lambda ext: ext == "txt", fs=fs):
        sample = {"url": url, "key": key, "offset": None, "size": None, "caption": ""}
        for ext, member in members.items():
            role, _, suffix = ext.rpartition(".")  # a pair's members: {key}.hq.png, {key}.lq.jpg
            if f".{suffix}" in READABLE_SUFFIXES and role in ("", "hq"):
                sample["offset"], sample["size"] = member.offset, member.size
                sample["paired"] = sample.get("paired") or role == "hq"
            elif f".{suffix}" in READABLE_SUFFIXES and role == "lq":
                sample.update(lq_url=url, lq_offset=member.offset, lq_size=member.size, paired=True)
            elif ext == "txt":
                sample["caption"] = member.data.decode("utf-8", "replace")
        samples.append(sample)
    # a pair missing a member stays, for _check_pairs to report
    return [s for s in samples if s["offset"] is not None or s.get("paired")]


def _index_folder(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    files = sorted(p for p in fs.find(path) if p.lower().endswith(READABLE_SUFFIXES))
    rows = []
    for p in files:
        caption_file = p.rsplit(".", 1)[0] + ".txt"
        caption = fs.cat_file(caption_file).decode("utf-8", "replace") if fs.exists(caption_file) else ""
        rows.append(
            {
                "url": fs.unstrip_protocol(p),
                "key": posixpath.relpath(p, path),
                "offset": 0,
                "size": fs.size(p),
                "caption": caption,
            }
        )
    return rows


def _pair_folders(fs: fsspec.AbstractFileSystem, hq_path: str, lq_source: str) -> list[dict]:
    """Rows of HQ images with their LQ partner (same relative path, suffix aside); a partner
    missing, or two images of one name on a side, is marked for _check_pairs to report."""
    lq_fs, lq_path = fsspec.core.url_to_fs(lq_source)
    stem = lambda key: key.rsplit(".", 1)[0]  # noqa: E731
    lq_rows: dict[str, list[dict]] = {}
    for row in _index_folder(lq_fs, lq_path.rstrip("/")):
        lq_rows.setdefault(stem(row["key"]), []).append(row)
    hq_rows: dict[str, list[dict]] = {}
    for row in _index_folder(fs, hq_path):
        hq_rows.setdefault(stem(row["key"]), []).append(row)
    rows = []
    for name in sorted(hq_rows.keys() | lq_rows.keys()):
        hq, lq = hq_rows.get(name, []), lq_rows.get(name, [])
        if len(hq) > 1 or len(lq) > 1:
            keys = ", ".join([f"HQ {r['key']}" for r in hq] + [f"LQ {r['key']}" for r in lq])
            rows.append({"key": f"{name} ({keys})", "paired": True, "skip": "several images of one name"})
        elif not hq:
            rows.append({"key": lq[0]["key"], "paired": True, "skip": "no HQ partner"})
        elif not lq:
            rows.append(hq[0] | {"paired": True, "skip": "no LQ partner"})
        else:
            (hq_row,), (lq_row,) = hq, lq
            rows.append(hq_row | {"lq_url": lq_row["url"], "lq_offset": 0, "lq_size": lq_row["size"], "paired": True})
    return rows


@dataclass
class PairReport:
    """What index_samples made of paired data: the pairs kept, and the ones skipped by reason
    with the first few names."""

    pairs: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(names := self.first.setdefault(reason, [])) < 5:
            names.append(name)

    def __str__(self) -> str:
        text = f"{self.pairs} LQ/HQ pairs"
        if self.skipped:
            reasons = "; ".join(f"{n} {r} (first: {', '.join(self.first[r])})" for r, n in self.skipped.items())
            text += f", {sum(self.skipped.values())} skipped: {reasons}"
        return text


def pair_report(index: pa.Table) -> PairReport | None:
    """The pair report index_samples kept with a paired index (None for HQ-only data)."""
    meta = (index.schema.metadata or {}).get(PAIRS_META)
    return PairReport(**json.loads(meta)) if meta else None


def _check_pairs(rows: list[dict], scale: int) -> tuple[list[dict], PairReport | None]:
    """Keep the HQ-only rows and the pairs whose LQ is floor(HQ / scale) in both sides; report the rest."""
    if not any(r.get("paired") for r in rows):
        return rows, None
    report, keep = PairReport(), {}
    candidates = []
    for i, row in enumerate(rows):
        if not row.get("paired"):
            keep[i] = row
        elif reason := row.get("skip") or (
            "no HQ partner" if row["offset"] is None else "no LQ partner" if row.get("lq_url") is None else None
        ):
            report.skip(reason, row["key"])
        else:
            candidates.append(i)
    for lo in range(0, len(candidates), HEADER_CHUNK):
        chunk = [rows[i] for i in candidates[lo : lo + HEADER_CHUNK]]
        hq_sizes = _image_sizes([(r["url"], r["offset"], r["size"]) for r in chunk])
        lq_sizes = _image_sizes([(r["lq_url"], r["lq_offset"], r["lq_size"]) for r in chunk])
        for i, row, hq, lq in zip(candidates[lo : lo + HEADER_CHUNK], chunk, hq_sizes, lq_sizes):
            if hq is None or lq is None:
                report.skip("not a readable image", f"{row['key']} ({'HQ' if hq is None else 'LQ'})")
            elif lq != (hq[0] // scale, hq[1] // scale):
                ratio = f"{hq[1] / lq[1]:.3g}" if lq[1] else "inf"
                detail = f"{row['key']} (HQ {hq[1]}x{hq[0]}, LQ {lq[1]}x{lq[0]}: x{ratio})"
                report.skip(f"size ratio not {scale}", detail)
            else:
                keep[i] = row
                report.pairs += 1
    return [keep[i] for i in sorted(keep)], report


def _image_sizes(refs: list[tuple[str, int, int]]) -> list[tuple[int, int] | None]:
    """(height, width) of the images at (url, offset, size), as decode_image will see them (EXIF
    orientation applied), from their headers; None where there is no readable image."""
    if not refs:
        return []
    fs, _ = fsspec.core.url_to_fs(refs[0][0])
    paths = [fsspec.core.url_to_fs(url)[1] for url, _, _ in refs]
    starts = [offset for _, offset, _ in refs]
    heads = fs.cat_ranges(paths, starts, [o + min(n, HEADER_BYTES) for _, o, n in refs], on_error="return")
    sizes = []
    for path, (_, offset, n), head in zip(paths, refs, heads):
        size = None if isinstance(head, Exception) else _oriented_size(head)
        if size is None and n > HEADER_BYTES and not isinstance(head, Exception):  # a header past the first bytes
            size = _oriented_size(fs.cat_file(path, start=offset, end=offset + n))
        sizes.append(size)
    return sizes


def _oriented_size(head: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(head)) as im:
            w, h = im.size
            # a PNG's eXIf chunk comes before its pixels; asking PIL for a PNG without one decodes it
            exif = im.getexif() if im.format != "PNG" or "exif" in im.info else {}
    except Exception:  # noqa: BLE001 -- PIL raises many types for bad or cut-off data
        return None
    return (w, h) if exif.get(0x0112, 1) in (5, 6, 7, 8) else (h, w)


def read_images(index: pa.Table, ids: np.ndarray) -> list[bytes]:
    """The image bytes of samples `ids`, one ranged read each (concurrent on object stores)."""
    rows = index.take(ids)
    return read_members(*(rows[c].to_pylist() for c in ("url", "offset", "size")))


# ---------------------------------------------------------------------------------------------
# Order, sharding and one sample


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _ORDER, epoch]).permutation(n)


def rank_samples(n: int, seed: int, rank: int, world: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(epoch, sample id) of a rank's stream positions (0, 1, ... across epochs)."""
    per_rank = n // world
    if per_rank == 0:
        raise ValueError(f"{n} samples cannot feed {world} ranks")
    epochs, i = np.divmod(np.asarray(positions, dtype=np.int64), per_rank)
    ids = np.empty_like(i)
    for e in np.unique(epochs):
        sel = epochs == e
        ids[sel] = epoch_order(n, seed, int(e))[i[sel] * world + rank]
    return epochs, ids


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size×size crop at native resolution (smaller images are first scaled up, bicubic, to
    `size` on the short side), flipped horizontally half the time."""
    return crop_pair(img, None, size, 1, rng)[0]


def crop_pair(
    hq: np.ndarray, lq: np.ndarray | None, size: int, scale: int, rng: np.random.Generator, name: str = "<bytes>"
) -> tuple[np.ndarray, np.ndarray | None]:
    """random_crop of an HQ image and the same crop of its LQ partner (floor(HQ / scale) in
    size): a (size / scale)² LQ crop and the size² HQ crop over it, both flipped or neither.
    Short pairs are scaled up together."""
    lsize = size // scale
    if lq is None:
        lh, lw = hq.shape[:2]
    else:
        lh, lw = lq.shape[:2]
        if (hq.shape[0] // scale, hq.shape[1] // scale) != (lh, lw):
            raise ImageError(f"{name}: HQ {hq.shape[1]}x{hq.shape[0]} is not {scale}x its LQ {lw}x{lh}")
        hq = hq[: lh * scale, : lw * scale]  # rows and columns past the last whole LQ pixel
    if min(lh, lw) < lsize:
        f = lsize / min(lh, lw)
        lh, lw = max(lsize, round(lh * f)), max(lsize, round(lw * f))
        hq = cv2.resize(hq, (lw * scale, lh * scale), interpolation=cv2.INTER_CUBIC)
        lq = None if lq is None else cv2.resize(lq, (lw, lh), interpolation=cv2.INTER_CUBIC)
    top, left = rng.integers(0, lh - lsize + 1), rng.integers(0, lw - lsize + 1)
    hq = hq[top * scale : (top + lsize) * scale, left * scale : (left + lsize) * scale]
    lq = None if lq is None else lq[top : top + lsize, left : left + lsize]
    if rng.random() < 0.5:
        hq, lq = hq[:, ::-1], None if lq is None else lq[:, ::-1]
    return hq, lq


def make_sample(
    data: bytes,
    caption: str,
    rng: np.random.Generator,
    cfg: FeedConfig,
    name: str = "<bytes>",
    lq_data: bytes | None = None,
):
    """Image bytes -> (HQ (3,H,W) in [-1,1], LQ (3,H,W) in [0,1], prompt), all draws from `rng`.
    With `lq_data` (a pair) the LQ is that image's crop; else the HQ crop degraded (the HQ then
    being the degradation's target: USM-sharpened where the config says so)."""
    # uint8 until cropped: converting a whole big photo to float would cost more than the crop
    hq = decode_image(data, name, dtype=np.uint8)[0]
    if lq_data is None:
        hq = random_crop(hq, cfg.crop_size, rng).astype(np.float32) / 255
        hq, lq, _ = degrade_pair(hq, rng, _degradation(cfg.degradation))
    else:
        lq = decode_image(lq_data, f"{name} (LQ)", dtype=np.uint8)[0]
        hq, lq = crop_pair(hq, lq, cfg.crop_size, cfg.lq_scale, rng, name)
        hq, lq = hq.astype(np.float32) / 255, lq.astype(np.float32) / 255
    if lq.shape != hq.shape:  # LQ is fed at HQ size (SR pairs; a Real-ESRGAN config without resize_back)
        lq = np.clip(cv2.resize(lq, hq.shape[1::-1], interpolation=cv2.INTER_CUBIC), 0, 1)
    prompt = "" if rng.random() < cfg.caption_drop_rate else caption
    return hq.transpose(2, 0, 1) * 2 - 1, lq.transpose(2, 0, 1), prompt


@functools.lru_cache(maxsize=4)
def _degradation(name: str):
    return load_degradation(name)


def _samples(cfg: FeedConfig, index: pa.Table, epochs: np.ndarray, ids: np.ndarray, salt: int) -> dict[str, np.ndarray]:
    captions = index["caption"].take(ids).to_pylist()
    keys = index["key"].take(ids).to_pylist()
    lq_data: list[bytes | None] = [None] * len(ids)
    if paired := [j for j, url in enumerate(index["lq_url"].take(ids).to_pylist()) if url is not None]:
        lq_index = index.select(["lq_url", "lq_offset", "lq_size"]).rename_columns(["url", "offset", "size"])
        for j, data in zip(paired, read_images(lq_index, np.asarray(ids)[paired])):
            lq_data[j] = data
    made = [
        make_sample(data, caption, np.random.default_rng([cfg.seed, salt, int(e), int(i)]), cfg, key, lq)
        for data, caption, key, e, i, lq in zip(read_images(index, ids), captions, keys, epochs, ids, lq_data)
    ]
    return {
        "hq": np.stack([m[0] for m in made]).astype(np.float32),
        "lq": np.stack([m[1] for m in made]),
        "prompt": np.array([m[2] for m in made], dtype=object),
        "key": np.array(keys, dtype=object),
        "epoch": epochs,
        "sample": ids,
    }


class _Collate(NumpyBatchCollateFn):
    """Numbers to (copied, writable) tensors, strings to lists."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        return {k: list(v) if v.dtype == object else torch.from_numpy(np.array(v)) for k, v in batch.items()}


def validation_batch(cfg: FeedConfig, index: pa.Table, n: int) -> dict:
    """A fixed batch of `n` samples: the index in order, cycling with new crops and degradations
    (their generators use a salt no training sample uses), as torch tensors."""
    epochs, ids = np.divmod(np.arange(n), index.num_rows)
    return _Collate()(_samples(cfg, index, epochs, ids, _VAL))


# ---------------------------------------------------------------------------------------------
# Ray Data


class _Positions(Datasource):
    """A rank's stream positions [start, start + count), one block (read task) per `block`."""

    def __init__(self, start: int, count: int, block: int):
        super().__init__()
        self.start, self.count, self.block = start, count, block

    def estimate_inmemory_data_size(self) -> int:
        return 8 * self.count

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        end, tasks = self.start + self.count, []
        for lo in range(self.start, end, self.block):
            hi = min(lo + self.block, end)
            meta = BlockMetadata(num_rows=hi - lo, size_bytes=8 * (hi - lo), input_files=None, exec_stats=None)
            tasks.append(ReadTask(functools.partial(_positions, lo, hi), meta))
        return tasks


def _positions(lo: int, hi: int) -> list[pa.Table]:
    return [pa.table({"position": np.arange(lo, hi, dtype=np.int64)})]


def _make_samples(batch: dict[str, np.ndarray], cfg: FeedConfig, index, rank: int, world: int) -> dict[str, np.ndarray]:
    """map_batches: stream positions -> samples (read bytes, decode, crop, degrade)."""
    cv2.setNumThreads(1)  # parallelism comes from the tasks
    index = ray.get(index) if isinstance(index, ray.ObjectRef) else index
    epochs, ids = rank_samples(index.num_rows, cfg.seed, rank, world, batch["position"])
    return _samples(cfg, index, epochs, ids, _SAMPLE) | {"position": batch["position"]}


def rank_dataset(cfg: FeedConfig, index, rank: int, world: int, start: int, count: int, batch_size: int):
    """Ray dataset of `count` samples of rank `rank`'s stream from position `start`, in order.
    `index`: the table of `index_samples` or an ObjectRef of it (shared by every task). The read
    and the map fuse into one task per batch, each taking `data_cpus` CPUs, `data_workers` at once."""
    tasks = dict(num_cpus=cfg.data_cpus, compute=ray.data.TaskPoolStrategy(size=cfg.data_workers))
    blocks = -(-count // batch_size)  # one per batch: Ray would split fewer blocks and not fuse
    ds = ray.data.read_datasource(
        _Positions(start, count, batch_size), override_num_blocks=blocks, **tasks
    ).map_batches(_make_samples, fn_kwargs=dict(cfg=cfg, index=index, rank=rank, world=world), batch_size=None, **tasks)
    ds.context.execution_options.preserve_order = True  # a rank's batches come in stream order
    ds.context.enable_progress_bars = False
    return ds


def rank_batches(
    cfg: FeedConfig, index, rank: int, world: int, batch_size: int, start: int, count: int
) -> Iterator[dict]:
    """Batches of `batch_size` samples (the last one may be smaller) of rank `rank`'s stream
    positions start … start + count - 1: {"hq", "lq": float tensors, "prompt", "key": lists,
    "epoch", "sample", "position": int64 tensors}."""
    segment = SEGMENT_BATCHES * batch_size
    for lo in range(start, start + count, segment):
        ds = rank_dataset(cfg, index, rank, world, lo, min(segment, start + count - lo), batch_size)
        yield from ds.iter_torch_batches(
            batch_size=batch_size, collate_fn=_Collate(), prefetch_batches=cfg.prefetch_batches
        )


# ---------------------------------------------------------------------------------------------
# Example data: real photos bundled with scikit-image, as the data pipeline's shards

TRAIN_PHOTOS = ("astronaut.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_left.png", "ihc.png")
VAL_PHOTOS = ("chelsea.png", "motorcycle_right.png")  # held out from training


def write_example_shards(out_dir: str, photos: tuple[str, ...] = TRAIN_PHOTOS, per_shard: int = 2) -> list[str]:
    """Write the photos' original bytes as WebDataset shards ({key}.{ext}, .txt, .json) into
    `out_dir` (local or fsspec URL); returns the shard URLs."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    fs, path = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(path, exist_ok=True)
    samples = []
    for name in photos:
        stem, ext = name.rsplit(".", 1)
        meta = {"source": "scikit-image", "file": name}
        samples.append(
            (
                stem,
                {
                    ext: (root / name).read_bytes(),
                    "txt": f"a photo: {stem}".encode(),
                    "json": json.dumps(meta).encode(),
                },
            )
        )
    urls = []
    for i in range(0, len(samples), per_shard):
        shard = f"{path}/{i // per_shard:05d}.tar"
        with atomic_write(fs, shard) as f:
            write_tar(f, samples[i : i + per_shard])
        urls.append(fs.unstrip_protocol(shard))
    return urls


def write_example_pairs(
    out_dir: str,
    photos: tuple[str, ...] = TRAIN_PHOTOS,
    degradation: str = "first_order",
    scale: int = 1,
    seed: int = 0,
) -> list[str]:
    """A folder of LQ/HQ pairs made from the photos: hq/<stem>.png (the degradation's target: the
    photo, USM-sharpened where the config says so) with its caption hq/<stem>.txt, and
    lq/<stem>.png, the photo degraded by the platform's model and, for scale > 1, reduced
    (area) to floor(HQ / scale). Returns the pair names."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    fs, path = fsspec.core.url_to_fs(out_dir)
    for side in ("hq", "lq"):
        fs.makedirs(f"{path}/{side}", exist_ok=True)
    config = load_degradation(degradation)
    names = []
    for i, name in enumerate(photos):
        stem = name.rsplit(".", 1)[0]
        photo = decode_image((root / name).read_bytes(), name)[0]
        hq, lq, _ = degrade_pair(photo, np.random.default_rng([seed, i]), config)
        h, w = hq.shape[:2]
        if scale > 1:
            lq = cv2.resize(lq, (w // scale, h // scale), interpolation=cv2.INTER_AREA)
        for side, img in (("hq", hq), ("lq", lq)):
            with atomic_write(fs, f"{path}/{side}/{stem}.png") as f:
                f.write(encode_image(np.clip(img, 0, 1)))
        fs.pipe_file(f"{path}/hq/{stem}.txt", f"a photo: {stem}".encode())
        names.append(stem)
    return names


class ExampleDataConfig(BaseModel):
    """Write the example training data (scikit-image photos): WebDataset shards of the photos, or
    with --pairs folders of LQ/HQ pairs made with the platform's degradations (train on them
    with `--data OUT_DIR/train --val-data OUT_DIR/val`)."""

    model_config = ConfigDict(extra="forbid")
    out_dir: Annotated[Location, Arg(positional=True)] = Field(
        description="gets train/ and val/ (held-out photos): shard directories, or with --pairs folders of hq/ and lq/"
    )
    per_shard: int = Field(2, ge=1, description="photos per shard")
    pairs: bool = Field(False, description="write LQ/HQ pair folders instead of shards")
    degradation: Degradation = Field("first_order", description="pairs: the degradation that makes the LQ")
    scale: int = Field(1, ge=1, le=16, description="pairs: LQ = floor(HQ / scale) (train with --lq-scale SCALE)")
    seed: int = Field(0, ge=0, description="pairs: seeds the degradations")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ExampleDataConfig, argv, ExampleDataConfig.__doc__, "python -m pipelines.feed")
    for split, photos in (("train", TRAIN_PHOTOS), ("val", VAL_PHOTOS)):
        out = f"{cfg.out_dir}/{split}"
        if cfg.pairs:
            names = write_example_pairs(out, photos, cfg.degradation, cfg.scale, cfg.seed)
            print(f"{out}: {len(names)} pairs ({', '.join(names)})")
        else:
            print("\n".join(write_example_shards(out, photos, cfg.per_shard)))


if __name__ == "__main__":
    main()
