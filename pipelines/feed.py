"""The training feed: WebDataset shards (or a plain folder of images) → batches of
(HQ in [-1, 1], LQ in [0, 1], prompt) for one training rank.

    index = index_samples("s3://bucket/shards")            # once, on the driver
    for batch in rank_batches(cfg, index, rank, world, batch_size=32, start=pos, count=n):
        batch["hq"], batch["lq"], batch["prompt"]          # (B,3,H,W), (B,3,H,W), B strings

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
import json
import posixpath
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
from pydantic import BaseModel, ConfigDict, Field
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from ray.data.collate_fn import NumpyBatchCollateFn

from diffbir.config import Arg, parse_config
from diffbir.image_io import READABLE_SUFFIXES, decode_image
from pipelines.config import Degradation, Location
from pipelines.degradations import degrade, load_degradation
from pipelines.shards import SHARD_INDEX, atomic_write, write_tar

# index_samples: where each sample's image bytes lie (built from the shards pipelines.shards' index lists)
FEED_INDEX_SCHEMA = pa.schema(
    [("url", pa.string()), ("key", pa.string()), ("offset", pa.int64()), ("size", pa.int64()), ("caption", pa.string())]
)
# Ray Data plans every read task of a dataset up front: a long run reads in segments of this many batches
SEGMENT_BATCHES = 1000
# salts of the generators drawn from the seed: epoch order, training samples, validation samples
_ORDER, _SAMPLE, _VAL = 0, 1, 2


class FeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: Location = Field(
        description="WebDataset shards (the data pipeline's output directory, read by its index.parquet; "
        "a directory, glob or fsspec URL of *.tar) or a folder of images"
    )
    crop_size: int = Field(512, ge=8, description="side of the random square crop")
    degradation: Degradation = Field(
        "first_order",
        description="degradation model: a bundled name (first_order, realesrgan, codeformer_face) or a YAML file",
    )
    caption_drop_rate: float = Field(
        1.0, ge=0, le=1, description="probability of an empty prompt (DiffBIR: 1, always empty)"
    )
    seed: int = Field(231, ge=0, description="seeds the sample order, crops, degradations and training noise")
    data_cpus: float = Field(
        0.25,
        gt=0,
        description="CPUs reserved by each crop+degrade task (fractional: tasks must fit beside the trainers)",
    )
    data_workers: int = Field(4, ge=1, description="most crop+degrade tasks in flight per rank")
    prefetch_batches: int = Field(2, ge=0, description="batches prepared ahead of the training loop")


# ---------------------------------------------------------------------------------------------
# The sample index


def index_samples(source: str) -> pa.Table:
    """Every sample of `source` as (url, key, offset, size, caption) in a fixed order: shards by
    name, samples in tar order; or images by path, their caption from a sibling `.txt` file.
    A directory with the data pipeline's `index.parquet` is read as the shards that index lists
    (a stale or stray tar beside them is not); one without, as its *.tar."""
    fs, path = fsspec.core.url_to_fs(source)
    index = f"{path.rstrip('/')}/{SHARD_INDEX}"
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
            rows = [row for shard in pool.map(functools.partial(_index_tar, fs), tars) for row in shard]
    else:
        rows = _index_folder(fs, path)
    if not rows:
        raise FileNotFoundError(
            f"no samples at {source}: expected *.tar WebDataset shards or {' '.join(READABLE_SUFFIXES)} images"
        )
    return pa.Table.from_pylist(rows, schema=FEED_INDEX_SCHEMA)


def _listed_shards(fs: fsspec.AbstractFileSystem, index: str) -> list[str]:
    """The paths of the shards the pipeline's index lists, by name (names are relative to it)."""
    with fs.open(index, "rb") as f:
        names = set(pq.read_table(f, columns=["shard"])["shard"].to_pylist())
    return [posixpath.join(posixpath.dirname(index), name) for name in sorted(names)]


def _index_tar(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """Scan the tar headers (the image bytes are skipped by seeking), read the captions."""
    samples: dict[str, dict] = {}
    url = fs.unstrip_protocol(path)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            # webdataset's convention: the key is the name up to the first dot of the basename
            base = posixpath.basename(member.name)
            key, ext = (
                posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0]),
                base.split(".", 1)[-1].lower(),
            )
            sample = samples.setdefault(key, {"url": url, "key": key, "offset": None, "size": None, "caption": ""})
            if f".{ext}" in READABLE_SUFFIXES:
                sample["offset"], sample["size"] = member.offset_data, member.size
            elif ext == "txt":
                sample["caption"] = tar.extractfile(member).read().decode("utf-8", "replace")
    return [s for s in samples.values() if s["offset"] is not None]


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


def read_images(index: pa.Table, ids: np.ndarray) -> list[bytes]:
    """The image bytes of samples `ids`, one ranged read each (concurrent on object stores)."""
    rows = index.take(ids)
    urls, offsets, sizes = (rows[c].to_pylist() for c in ("url", "offset", "size"))
    fs, _ = fsspec.core.url_to_fs(urls[0])
    paths = [fsspec.core.url_to_fs(u)[1] for u in urls]
    return fs.cat_ranges(paths, offsets, [o + s for o, s in zip(offsets, sizes)])


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
    h, w = img.shape[:2]
    if min(h, w) < size:
        scale = size / min(h, w)
        h, w = max(size, round(h * scale)), max(size, round(w * scale))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    crop = img[top : top + size, left : left + size]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def make_sample(data: bytes, caption: str, rng: np.random.Generator, cfg: FeedConfig, name: str = "<bytes>"):
    """Image bytes -> (HQ (3,H,W) in [-1,1], LQ (3,H,W) in [0,1], prompt), all draws from `rng`."""
    # uint8 until cropped: converting a whole big photo to float would cost more than the crop
    hq = random_crop(decode_image(data, name, dtype=np.uint8)[0], cfg.crop_size, rng).astype(np.float32) / 255
    lq, _ = degrade(hq, rng, _degradation(cfg.degradation))
    if lq.shape != hq.shape:  # LQ is fed at HQ size (a Real-ESRGAN config without resize_back)
        lq = np.clip(cv2.resize(lq, hq.shape[1::-1], interpolation=cv2.INTER_CUBIC), 0, 1)
    prompt = "" if rng.random() < cfg.caption_drop_rate else caption
    return hq.transpose(2, 0, 1) * 2 - 1, lq.transpose(2, 0, 1), prompt


@functools.lru_cache(maxsize=4)
def _degradation(name: str):
    return load_degradation(name)


def _samples(cfg: FeedConfig, index: pa.Table, epochs: np.ndarray, ids: np.ndarray, salt: int) -> dict[str, np.ndarray]:
    captions = index["caption"].take(ids).to_pylist()
    keys = index["key"].take(ids).to_pylist()
    made = [
        make_sample(data, caption, np.random.default_rng([cfg.seed, salt, int(e), int(i)]), cfg, key)
        for data, caption, key, e, i in zip(read_images(index, ids), captions, keys, epochs, ids)
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


class ExampleDataConfig(BaseModel):
    """Write the example training data (scikit-image photos) as WebDataset shards."""

    model_config = ConfigDict(extra="forbid")
    out_dir: Annotated[Location, Arg(positional=True)] = Field(
        description="gets train/ and val/ (held-out photos) shard directories"
    )
    per_shard: int = Field(2, ge=1, description="photos per shard")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ExampleDataConfig, argv, ExampleDataConfig.__doc__, "python -m pipelines.feed")
    for split, photos in (("train", TRAIN_PHOTOS), ("val", VAL_PHOTOS)):
        print("\n".join(write_example_shards(f"{cfg.out_dir}/{split}", photos, cfg.per_shard)))


if __name__ == "__main__":
    main()
