"""Score models on benchmarks the way restoration papers do, on Ray, resumably.

    python -m training.evaluate --config training/configs/eval_tiny.yaml [--models URI ...] [--compare NAME=FOLDER ...]
    make evaluate CONFIG=training/configs/eval_paper_table2.yaml ARGS='--compare realesrgan=/data/realesrgan-div2k'

Models: registry versions (`models:/diffbir@champion`, pinned to the version the alias names when
the run starts; `models:/diffbir/3`) or platform model directories, each a column group of the
tables, labelled `<name>-v<version>` or the directory's name.

Benchmarks (the YAML's `benchmarks`, each named):
- real-world: `lq`, a folder of LQ images -> no-reference metrics only;
- synthetic: `hq`, a folder of HQ images (centre-cropped to `crop` when set), degraded by a
  `pipelines.degradations` config; image `name` uses the seed [seed, hash(name)], so every run
  on every machine makes the same LQ inputs -> full- and no-reference metrics.
Either kind may name a `fid_reference`, a folder of reference images (FFHQ faces for LFW-Test and
WIDER-Test, as the paper's Table 4): with "fid" in metrics.names, every column of the benchmark
also gets its FID, a set metric (one value for all its images) against that folder.
Folders are read recursively in path order (at most `max_images` images); an image is named by
its path in the folder.

Settings: every model restores every benchmark under every named setting, a set of
`RestoreOptions` overrides on top of the benchmark's `options` on top of the top-level `options`
(guidance scale, sampler, steps, ...). Image `name` is restored with seed options.seed + hash(name).
The restored size must equal the HQ size on a synthetic benchmark (set `upscale` to match).

`--compare NAME=FOLDER` (repeatable; `BENCHMARK:NAME=FOLDER` for one benchmark only) scores
another method's outputs, matched to the benchmark's images by path without suffix, as a column
of the same tables; every benchmark image needs its file there.

Outputs under `output`:
    per_image.parquet   benchmark, model, setting, image, metric, value (setting "-": a compared method)
    metrics.csv         benchmark, model, setting, metric, mean, std (population), n
                        (FID: its value as the mean, no std, n the images; not in per_image.parquet)
    table.md            one table per benchmark: a row per metric (↑ higher / ↓ lower is better),
                        a column per model and setting and per compared method, the best in bold
    grid_<benchmark>.png  LQ | stage 1 (first model, first setting) | each column's result | HQ,
                        for the first `grid_images` images
    images/<benchmark>/<model>/<setting>/<name>.png   restored images (+ .stage1.png for the grid)
    inputs/<benchmark>/{lq,hq}/<name>.png             a synthetic benchmark's LQ and HQ inputs
    parts/*.parquet, set_parts/*.parquet, run.json    results as they arrive (per image; FID); what
                                                      they belong to
and an MLflow run (experiment `experiment`) holding these files (not the images) as artifacts and
every mean as a metric `<benchmark>.<model>.<setting>.<metric>`. A registry version also gets the
tags `eval.<benchmark>.<setting>.<metric>` = mean and `eval.run_id`.

How: the driver lists the images, makes missing LQ inputs (in threads), then, model by model,
restores in an actor pool of RestorationPipelines (`concurrency` actors, `cpus_per_actor`,
`gpus_per_actor`) and scores in `metric_actors` actors that each build every metric network once.
Images travel as PNG bytes through the driver, which writes every file: on a cluster
(RAY_ADDRESS) only the driver needs the folders. FID is computed by the driver, once every image
is restored, with one FID network (on its GPU if it has one): the driver holds the folders (a
reference set such as FFHQ is tens of thousands of files no actor should be sent), an FID is one
value per finished column with nothing to overlap, and one instance computes each reference
folder's statistics once for every benchmark that names it.

Resuming: each scored batch is stored in parts/ as it arrives and each restored image in images/,
so a rerun on the same output restores only the images that are missing and scores only the
(benchmark, model, setting, image, metric) rows that are missing; an FID is stored in set_parts/
per (benchmark, model, setting, image names) and computed again only when missing. Adding models, settings,
metrics, benchmarks or images to a config adds work; changing what an existing name means (a
setting's options, a benchmark's inputs, a metric's convention) is refused (--overwrite starts afresh).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import cv2
import fsspec
import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric as MlflowMetric
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm import tqdm

from diffbir.config import Dtype, parse_config
from diffbir.image_io import READABLE_SUFFIXES, ImageError, decode_image, encode_image
from diffbir.metrics import FID, METRIC_NAMES, MetricsConfig, build_metric
from diffbir.pipeline import RestorationPipeline, RestoreOptions, canvas_size, name_seed, plan_sizes
from pipelines.degradations import DegradationConfig, RealESRGANConfig, degrade, load_degradation
from pipelines.ray_env import ensure_ray
from pipelines.shards import atomic_write
from training import registry

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # safe in paths, MLflow keys and tags
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
COMPARE_SETTING = "-"  # the setting column of a compared method's rows
SLOTS = 2  # calls queued per actor: the next batch is there when one finishes
GRID_THUMB, GRID_PAD, GRID_HEADER = 128, 6, 26  # grid cell height, gaps, title band (pixels)
PART_SCHEMA = pa.schema(
    [
        ("benchmark", pa.string()),
        ("model", pa.string()),
        ("setting", pa.string()),
        ("image", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)
KEY = ["benchmark", "model", "setting", "image"]
# a set metric's value (FID: one per column of a benchmark): the image is the digest of the benchmark's image names
SET_SCHEMA = pa.schema([pa.field("image_set", pa.string()) if f.name == "image" else f for f in PART_SCHEMA])
SET_KEY = [c for c in SET_SCHEMA.names if c != "value"]
FID_KIND = dict(kind="set", lower_is_better=FID.lower_is_better)  # FID's entry beside the per-image metrics' kinds


class EvalError(Exception):
    """The evaluation cannot run or finish: missing inputs, unmatched files, a mismatched rerun."""


class BenchmarkConfig(BaseModel):
    """One benchmark: `hq` (synthetic) or `lq` (real-world)."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    hq: str | None = Field(None, description="synthetic: folder of HQ images, degraded here into the LQ inputs")
    lq: str | None = Field(None, description="real-world: folder of LQ images (no-reference metrics only)")
    degradation: str = Field(
        "realesrgan", description="synthetic: pipelines.degradations config, a bundled name or a YAML path"
    )
    seed: int = Field(0, description="synthetic: image `name` is degraded with the seed [seed, hash(name)]")
    crop: int | None = Field(None, ge=8, description="synthetic: centre-crop each HQ image to at most this side")
    fid_reference: str | None = Field(
        None, description="folder of reference images (e.g. FFHQ for face sets): FID of each column against it"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="RestoreOptions fields for this benchmark")

    @model_validator(mode="after")
    def _one_source(self) -> BenchmarkConfig:
        if (self.hq is None) == (self.lq is None):
            raise ValueError(f"benchmark {self.name}: give either hq (synthetic) or lq (real-world), not both")
        return self

    @property
    def synthetic(self) -> bool:
        return self.hq is not None


class SettingConfig(BaseModel):
    """A named set of RestoreOptions overrides: one column per model."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    options: dict[str, Any] = Field(default_factory=dict)


class EvalMetricsConfig(MetricsConfig):
    """The job's metrics: MetricsConfig's per-image metrics, and "fid", a set metric: one value per
    column of each benchmark that names a `fid_reference`, from config.weights["fid"]."""

    @classmethod
    def known_names(cls) -> tuple[str, ...]:
        return (*METRIC_NAMES, FID.name)

    def per_image(self) -> MetricsConfig:
        """The per-image part, which the metric actors compute."""
        return MetricsConfig(**self.model_dump() | dict(names=[n for n in self.names if n != FID.name]))


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, max_length=8, description=registry.URI_FORMS)
    benchmarks: list[BenchmarkConfig] = Field(min_length=1, max_length=16, description="the benchmarks (JSON)")
    settings: list[SettingConfig] = Field(
        default_factory=lambda: [SettingConfig(name="default")],
        min_length=1,
        max_length=16,
        description="named RestoreOptions overrides, each a column per model (JSON)",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="RestoreOptions fields of every setting")
    compare: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="NAME=FOLDER (or BENCHMARK:NAME=FOLDER): another method's outputs, matched by file name",
    )
    metrics: EvalMetricsConfig = Field(
        default_factory=EvalMetricsConfig,
        description="per-image metrics (diffbir.metrics), and fid for the benchmarks with a fid_reference (JSON)",
    )
    output: str = Field("runs/eval", description="output folder (results, images, tables; a rerun resumes)")
    experiment: str = Field("diffbir-eval", description="MLflow experiment of the run")
    tracking_dir: str = Field(registry.DEFAULT_DIR, description="local MLflow store (MLFLOW_TRACKING_URI wins)")
    cache_dir: str | None = Field(None, description=f"downloaded versions (default ${registry.CACHE_ENV} or ~/.cache)")
    dtype: Dtype = Field("fp32", description="inference precision")
    batch_size: int = Field(4, ge=1, le=64, description="images per actor call")
    concurrency: int = Field(1, ge=1, le=64, description="restoration actors, each holding one model copy")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs per restoration actor (torch threads, rounded up)")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per restoration actor (0: CPU)")
    metric_actors: int = Field(1, ge=1, le=16, description="metric actors, each holding every metric network once")
    metric_cpus: float = Field(0.5, gt=0, description="CPUs per metric actor")
    metric_gpus: float = Field(0.0, ge=0, description="GPUs per metric actor (0: CPU)")
    max_images: int = Field(1000, ge=1, le=100_000, description="images per benchmark (the first in path order)")
    max_pixels: int = Field(4096 * 4096, ge=1, description="refuse inputs and working canvases of more pixels")
    grid_images: int = Field(4, ge=0, le=16, description="rows of each benchmark's sample grid (0: no grid)")
    overwrite: bool = Field(False, description="discard the output folder's earlier results first")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        for what, names in (("benchmark", [b.name for b in self.benchmarks]), ("setting", self.settings_names)):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        for b in self.benchmarks:
            for s in self.settings:
                try:
                    self.restore_options(b, s)
                except ValidationError as e:
                    raise ValueError(f"benchmark {b.name}, setting {s.name}: bad RestoreOptions: {e}") from e
        self.compare_entries()
        fid_benches = [b.name for b in self.benchmarks if b.fid_reference is not None]
        if FID.name in self.metrics.names and not fid_benches:
            raise ValueError(
                "metric fid is a set metric, measured against a benchmark's fid_reference folder: "
                "no benchmark names one"
            )
        if fid_benches and FID.name not in self.metrics.names:
            raise ValueError(f"benchmarks {fid_benches} name a fid_reference: add fid to metrics.names")
        return self

    @property
    def settings_names(self) -> list[str]:
        return [s.name for s in self.settings]

    def restore_options(self, bench: BenchmarkConfig, setting: SettingConfig) -> RestoreOptions:
        return RestoreOptions(**{**self.options, **bench.options, **setting.options})

    def compare_entries(self) -> list[tuple[str | None, str, str]]:
        """(benchmark or None for all, name, folder) of each --compare."""
        entries = []
        for text in self.compare:
            m = re.fullmatch(r"(?:(?P<bench>[^:=]+):)?(?P<name>[^:=]+)=(?P<folder>.+)", text)
            if m is None or not re.fullmatch(NAME_PATTERN, m["name"]):
                raise ValueError(f"--compare {text!r}: expected NAME=FOLDER or BENCHMARK:NAME=FOLDER ({NAME_PATTERN})")
            if m["bench"] is not None and m["bench"] not in [b.name for b in self.benchmarks]:
                raise ValueError(f"--compare {text!r}: no benchmark named {m['bench']}")
            entries.append((m["bench"], m["name"], m["folder"]))
        return entries


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ImageFile:
    name: str  # path in the benchmark folder (posix)
    stem: str  # the name without its suffix: output files and compared methods' files
    path: Path


@dataclass
class Bench:
    cfg: BenchmarkConfig
    images: list[ImageFile]
    out: Path  # the evaluation's output folder
    compare: dict[str, dict[str, Path]] = field(default_factory=dict)  # method -> image name -> file

    @property
    def name(self) -> str:
        return self.cfg.name

    def lq(self, img: ImageFile) -> Path:
        return self.out / "inputs" / self.name / "lq" / f"{img.stem}.png" if self.cfg.synthetic else img.path

    def hq(self, img: ImageFile) -> Path | None:
        return self.out / "inputs" / self.name / "hq" / f"{img.stem}.png" if self.cfg.synthetic else None

    def restored(self, model: str, setting: str, img: ImageFile) -> Path:
        return self.out / "images" / self.name / model / setting / f"{img.stem}.png"

    def stage1(self, model: str, setting: str, img: ImageFile) -> Path:
        return self.out / "images" / self.name / model / setting / f"{img.stem}.stage1.png"

    def pred(self, model: str, setting: str, img: ImageFile) -> Path:
        """The image a column scores: a compared method's file, or the restored image."""
        return self.compare[model][img.name] if setting == COMPARE_SETTING else self.restored(model, setting, img)

    def columns(self, models: list[Model], settings: list[str]) -> list[tuple[str, str]]:
        """(model, setting) of each column of the benchmark's table: every model under every
        setting, then each compared method."""
        return [(m.label, s) for m in models for s in settings] + [(name, COMPARE_SETTING) for name in self.compare]

    @property
    def image_set(self) -> str:
        """What a set metric of this benchmark measured: a digest of its image names."""
        return hashlib.sha256("\n".join(img.name for img in self.images).encode()).hexdigest()[:16]


def list_images(folder: str, max_images: int, what: str) -> list[ImageFile]:
    """The first `max_images` images under `folder` (recursively), in path order."""
    root = Path(folder)
    if not root.is_dir():
        raise EvalError(f"{what}: {folder} is not a folder")
    paths = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES),
        key=lambda p: p.relative_to(root).as_posix(),
    )[:max_images]
    if not paths:
        raise EvalError(f"{what}: {folder} holds no images ({' '.join(READABLE_SUFFIXES)})")
    images = [
        ImageFile(p.relative_to(root).as_posix(), p.relative_to(root).with_suffix("").as_posix(), p) for p in paths
    ]
    stems: dict[str, str] = {}
    for img in images:
        if (other := stems.setdefault(img.stem, img.name)) != img.name:
            raise EvalError(f"{what}: {other} and {img.name} differ only in suffix; their outputs would collide")
    return images


def image_size(path: Path, max_pixels: int) -> tuple[int, int]:
    """(height, width) as decode_image will see it (EXIF orientation applied), from the header;
    refuses images over `max_pixels`."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn
                w, h = h, w
    except OSError as e:
        raise EvalError(f"{path}: not a readable image ({e})") from e
    if w * h > max_pixels:
        raise EvalError(f"{path}: {w}x{h} = {w * h:,} pixels exceeds max_pixels {max_pixels:,} (crop, or raise it)")
    return h, w


def degradation_seed(name: str, seed: int) -> list[int]:
    """The seed a synthetic benchmark degrades image `name` with: a function of both only."""
    return [seed, name_seed(name, 0)]


def prepare_image(
    data: bytes, name: str, degradation: DegradationConfig, seed: list[int], crop: int | None
) -> tuple[bytes, bytes]:
    """A synthetic benchmark's (LQ PNG, HQ PNG) of one HQ file: 8-bit, its centre at most `crop`
    on a side, then degraded."""
    hq = decode_image(data, name, dtype=np.uint8)[0]
    if crop is not None:
        h, w = min(crop, hq.shape[0]), min(crop, hq.shape[1])
        y, x = (hq.shape[0] - h) // 2, (hq.shape[1] - w) // 2
        hq = hq[y : y + h, x : x + w]
    lq, _ = degrade(hq, np.random.default_rng(seed), degradation)
    return encode_image(lq / 255.0), encode_image(hq / 255.0)


def _degradation(bench: BenchmarkConfig) -> DegradationConfig:
    try:
        cfg = load_degradation(bench.degradation)
    except (OSError, ValidationError) as e:
        raise EvalError(f"benchmark {bench.name}: degradation {bench.degradation!r}: {e}") from e
    # a sharpened ground truth is a training target (usm_sharpen); a benchmark degrades its HQ as it is
    return cfg.model_copy(update={"usm_sharpen": False}) if isinstance(cfg, RealESRGANConfig) else cfg


def prepare_inputs(benches: list[Bench]) -> int:
    """Make the missing LQ/HQ inputs of the synthetic benchmarks; returns how many. In driver
    threads (OpenCV and numpy release the GIL): cheap beside restoration, and no Ray worker has
    to import the model stack for it."""
    todo = [(b, img) for b in benches if b.cfg.synthetic for img in b.images if not b.lq(img).is_file()]
    degradations = {b.name: _degradation(b.cfg) for b, _ in todo}
    fs = fsspec.filesystem("file")

    def make(job: tuple[Bench, ImageFile]) -> None:
        b, img = job
        seed = degradation_seed(img.name, b.cfg.seed)
        lq, hq = prepare_image(img.path.read_bytes(), img.name, degradations[b.name], seed, b.cfg.crop)
        for path, data in ((b.hq(img), hq), (b.lq(img), lq)):  # the LQ last: it marks the pair done
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(fs, str(path)) as f:
                f.write(data)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(tqdm(pool.map(make, todo), total=len(todo), unit="img", desc="prepare inputs", disable=not todo))
    return len(todo)


# ---------------------------------------------------------------------------------------------
# Actors


class EvalRestorer:
    """Ray actor: one RestorationPipeline; items -> restored (and stage-1) PNG bytes."""

    def __init__(self, model_uri: str, tracking_uri: str, cache_dir: str | None, device: str, dtype: str, threads: int):
        if model_uri.startswith("models:/"):
            mlflow.set_tracking_uri(tracking_uri)  # this worker may have started before the driver set it
        if device == "cpu":
            torch.set_num_threads(threads)
        self.pipe = RestorationPipeline.from_pretrained(str(registry.resolve(model_uri, cache_dir)), device, dtype)

    def restore(self, items: list[dict]) -> tuple[list[dict], float]:
        """Per item: restored PNG (or the error), stage-1 PNG when asked; and the seconds spent."""
        start = time.perf_counter()
        images = [decode_image(it["lq"], it["name"])[0] for it in items]
        options = [RestoreOptions.model_validate_json(it["options"]) for it in items]
        results = [dict(restored=None, stage1=None, error=None) for _ in items]
        todo = [i for i, it in enumerate(items) if it["restore"]]
        outputs = self.pipe.restore_grouped([images[i] for i in todo], [options[i] for i in todo])
        for i, out in zip(todo, outputs):
            if isinstance(out, Exception):
                results[i]["error"] = f"{type(out).__name__}: {out}"
            else:
                results[i]["restored"] = encode_image(out)
        for i, it in enumerate(items):
            if it["stage1"]:
                results[i]["stage1"] = encode_image(self.pipe.stage1_image(images[i], options[i]))
        return results, time.perf_counter() - start


class MetricActor:
    """Ray actor holding every metric once: (pred PNG, target PNG or None, metric names) -> rows."""

    def __init__(self, metrics: dict, device: str, threads: int):
        if device == "cpu":
            torch.set_num_threads(threads)
        self.config, self.device, self.metrics = MetricsConfig(**metrics), device, {}

    def load(self) -> dict[str, dict]:
        """Build the metrics; a method, not __init__, so an error (a missing weights file) reaches
        the driver as its own exception rather than as a dead actor."""
        self.metrics = {name: build_metric(name, self.config, self.device) for name in self.config.names}
        return {n: dict(kind=m.kind, lower_is_better=m.lower_is_better) for n, m in self.metrics.items()}

    def score(self, items: list[dict]) -> tuple[list[dict], dict[str, float]]:
        """Rows of PART_SCHEMA, and the seconds each metric took. Images of one size and metric
        list are scored as one batch."""
        decoded = []
        for it in items:
            pred = _tensor(decode_image(it["pred"], it["image"])[0])
            target = None if it["target"] is None else _tensor(decode_image(it["target"], it["image"])[0])
            decoded.append((pred, target))
        groups: dict[tuple, list[int]] = {}
        for i, (it, (pred, _)) in enumerate(zip(items, decoded)):
            groups.setdefault((tuple(pred.shape), tuple(it["metrics"])), []).append(i)
        rows, seconds = [], dict.fromkeys(self.metrics, 0.0)
        for (_, names), members in groups.items():
            pred = torch.cat([decoded[i][0] for i in members]).to(self.device)
            for name in names:
                metric = self.metrics[name]
                target = torch.cat([decoded[i][1] for i in members]).to(self.device) if metric.kind == "fr" else None
                start = time.perf_counter()
                values = metric(pred, target).tolist()
                seconds[name] += time.perf_counter() - start
                rows += [{k: items[i][k] for k in KEY} | dict(metric=name, value=v) for i, v in zip(members, values)]
        return rows, seconds


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]


# ---------------------------------------------------------------------------------------------
# Results as they arrive


class ScoreStore:
    """A folder of scored rows of `schema`, one parquet file per batch, written atomically; a row
    is identified by every column but its value. <out>/parts: per-image rows (PART_SCHEMA);
    <out>/set_parts: set metrics (SET_SCHEMA)."""

    def __init__(self, root: Path, schema: pa.Schema):
        self.root, self.schema = root, schema
        self.fs = fsspec.filesystem("file")

    def save(self, rows: list[dict]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.fs, str(self.root / f"{uuid.uuid4().hex}.parquet")) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), f)

    def load(self) -> pd.DataFrame:
        files = sorted(self.root.glob("*.parquet")) if self.root.is_dir() else []
        tables = [pq.read_table(p) for p in files]
        df = pa.concat_tables(tables).to_pandas() if tables else self.schema.empty_table().to_pandas()
        return df.drop_duplicates([c for c in self.schema.names if c != "value"], keep="last")


def record_meanings(out: Path, fingerprint: dict[str, dict]) -> None:
    """Record what the names of this run mean in <out>/run.json; refuse a name that meant
    something else before (its results would be mixed with the new ones)."""
    path = out / "run.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    changed = [
        f"{section}: {key}"
        for section, entries in fingerprint.items()
        for key, value in entries.items()
        if earlier.get(section, {}).get(key, value) != value
    ]
    if changed:
        raise EvalError(
            f"{out} holds results made with another meaning of {', '.join(changed[:5])}; "
            "rename it, use another output, or rerun with --overwrite to start afresh"
        )
    merged = {s: earlier.get(s, {}) | entries for s, entries in fingerprint.items()}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(fsspec.filesystem("file"), str(path)) as f:
        f.write(json.dumps(merged, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass
class Model:
    uri: str  # pinned: models:/<name>/<version> or a directory
    label: str
    name: str | None = None  # registered model name and version, for the tags
    version: str | None = None


@dataclass
class Item:
    """One (benchmark, model, setting, image): what to restore and which metrics are missing."""

    bench: Bench
    model: str
    setting: str
    image: ImageFile
    metrics: list[str]
    pred: Path  # the restored image, or the compared method's file
    options: RestoreOptions | None = None  # None: a compared method (nothing to restore)
    restore: bool = False
    stage1: bool = False

    def key(self) -> dict:
        return dict(benchmark=self.bench.name, model=self.model, setting=self.setting, image=self.image.name)


def resolve_models(cfg: EvalConfig) -> list[Model]:
    models = []
    for uri in cfg.models:
        info = registry.version_info(uri)
        registry.resolve(info["uri"], cfg.cache_dir)  # fail here, not in every actor; warms this node's cache
        if info["version"] is None:
            label = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(info["uri"]).resolve().name)
            models.append(Model(str(Path(info["uri"]).resolve()), label))
        else:
            label = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{info['name']}-v{info['version']}")
            models.append(Model(info["uri"], label, info["name"], info["version"]))
    labels = [m.label for m in models] + [name for _, name, _ in cfg.compare_entries()]
    if len(set(labels)) != len(labels):
        raise EvalError(f"model and compared method labels must be unique, got {labels}")
    return models


def load_benchmarks(cfg: EvalConfig, out: Path) -> list[Bench]:
    benches = []
    for b in cfg.benchmarks:
        images = list_images(b.hq or b.lq, cfg.max_images, f"benchmark {b.name}")
        for img in images:
            image_size(img.path, cfg.max_pixels)
        if b.synthetic:
            _degradation(b)  # a clear error before any work
        if b.fid_reference is not None:
            reference = list_images(b.fid_reference, 2, f"benchmark {b.name}, fid_reference")
            if min(len(images), len(reference)) < 2:
                raise EvalError(
                    f"benchmark {b.name}: FID needs two images or more, in the benchmark and its fid_reference"
                )
        benches.append(Bench(b, images, out))
    for bench_name, name, folder in cfg.compare_entries():
        for bench in benches:
            if bench_name in (None, bench.name):
                bench.compare[name] = match_compare(bench, name, folder)
    return benches


def match_compare(bench: Bench, name: str, folder: str) -> dict[str, Path]:
    """Image name -> the compared method's file of the same path without suffix."""
    root = Path(folder)
    if not root.is_dir():
        raise EvalError(f"--compare {name}: {folder} is not a folder")
    by_stem: dict[str, list[Path]] = {}
    for p in root.rglob("*"):
        if p.is_file() and p.suffix.lower() in READABLE_SUFFIXES:
            by_stem.setdefault(p.relative_to(root).with_suffix("").as_posix(), []).append(p)
    missing = [img.name for img in bench.images if img.stem not in by_stem]
    if missing:
        raise EvalError(
            f"--compare {name}: {len(missing)} of the {len(bench.images)} images of benchmark {bench.name} "
            f"have no file in {folder} (matched by path without suffix; first: {missing[0]})"
        )
    if ambiguous := [img.stem for img in bench.images if len(by_stem[img.stem]) > 1]:
        raise EvalError(f"--compare {name}: several files in {folder} match {ambiguous[0]}: {by_stem[ambiguous[0]]}")
    return {img.name: by_stem[img.stem][0] for img in bench.images}


def check_sizes(cfg: EvalConfig, benches: list[Bench]) -> None:
    """Every canvas within max_pixels; on a synthetic benchmark every restored and compared image
    at the HQ size (full-reference metrics compare pixel by pixel)."""
    for bench in benches:
        for img in bench.images:
            h, w = image_size(bench.lq(img), cfg.max_pixels)
            hq = image_size(bench.hq(img), cfg.max_pixels) if bench.cfg.synthetic else None
            for s in cfg.settings:
                opts = cfg.restore_options(bench.cfg, s)
                ch, cw = canvas_size(h, w, opts)
                if ch * cw > cfg.max_pixels:
                    raise EvalError(
                        f"benchmark {bench.name}, setting {s.name}: {img.name} works on a {cw}x{ch} canvas, "
                        f"over max_pixels {cfg.max_pixels:,}"
                    )
                size = plan_sizes(h, w, opts.scale, opts.min_side)[0]
                if hq is not None and size != hq:
                    raise EvalError(
                        f"benchmark {bench.name}, setting {s.name}: {img.name} restores to {size[1]}x{size[0]} but its "
                        f"HQ image is {hq[1]}x{hq[0]}; set `upscale` so the output matches the HQ size"
                    )
            for name, files in bench.compare.items():
                size = image_size(files[img.name], cfg.max_pixels)
                if hq is not None and size != hq:
                    raise EvalError(
                        f"--compare {name}: {files[img.name]} is {size[1]}x{size[0]} but the HQ image of "
                        f"{img.name} is {hq[1]}x{hq[0]}"
                    )


def plan(
    cfg: EvalConfig, benches: list[Bench], models: list[Model], kinds: dict[str, dict], done: set[tuple]
) -> list[Item]:
    """What this run has to do: every (benchmark, model, setting, image) with a metric missing,
    an image to restore or a grid's stage-1 image to make."""
    items = []
    for bench in benches:
        metrics = bench_metrics(bench, kinds)
        grid = {img.name for img in bench.images[: cfg.grid_images]}
        for mi, model in enumerate(models):
            for si, s in enumerate(cfg.settings):
                opts = cfg.restore_options(bench.cfg, s)
                for img in bench.images:
                    missing = [m for m in metrics if (bench.name, model.label, s.name, img.name, m) not in done]
                    pred = bench.restored(model.label, s.name, img)
                    stage1 = img.name in grid and mi == si == 0 and not bench.stage1(model.label, s.name, img).is_file()
                    item = Item(bench, model.label, s.name, img, missing, pred, opts, not pred.is_file(), stage1)
                    if missing or item.restore or item.stage1:
                        items.append(item)
        for name, files in bench.compare.items():
            for img in bench.images:
                missing = [m for m in metrics if (bench.name, name, COMPARE_SETTING, img.name, m) not in done]
                if missing:
                    items.append(Item(bench, name, COMPARE_SETTING, img, missing, files[img.name]))
    return items


def bench_metrics(bench: Bench, kinds: dict[str, dict]) -> list[str]:
    """The configured metrics that apply: all on a synthetic benchmark, no-reference ones on a real-world one."""
    return [m for m, k in kinds.items() if bench.cfg.synthetic or k["kind"] == "nr"]


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Progress:
    restored: int = 0
    scored_rows: int = 0
    fids: int = 0
    restore_s: float = 0.0
    metric_s: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def execute(
    cfg: EvalConfig, items: list[Item], models: list[Model], metric_actors: list, parts: ScoreStore
) -> Progress:
    """Restore (model by model, each in its own actor pool) and score `items`, storing results as they arrive."""
    progress, fs = Progress(), fsspec.filesystem("file")
    score_queue = deque(it for it in items if it.metrics and not (it.restore or it.stage1))  # nothing to restore
    gpu = cfg.gpus_per_actor > 0
    actor_cls = ray.remote(EvalRestorer).options(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor)
    bars = (
        tqdm(total=sum(it.restore for it in items), unit="img", desc="restore"),
        tqdm(total=sum(bool(it.metrics) for it in items), unit="img", desc="score"),
    )
    try:
        for model in models:
            work = [
                it for it in items if it.model == model.label and it.options is not None and (it.restore or it.stage1)
            ]
            batches = deque(_batches(work, cfg.batch_size))
            actors = [
                actor_cls.remote(
                    model.uri,
                    mlflow.get_tracking_uri(),
                    cfg.cache_dir or os.environ.get(registry.CACHE_ENV),  # the driver's: workers may predate it
                    "cuda" if gpu else "cpu",
                    cfg.dtype,
                    math.ceil(cfg.cpus_per_actor),
                )
                for _ in range(min(cfg.concurrency, len(batches)))
            ]
            try:
                _pump(cfg, batches, actors, score_queue, metric_actors, parts, progress, bars, fs)
            finally:
                for actor in actors:
                    ray.kill(actor)
        _pump(cfg, deque(), [], score_queue, metric_actors, parts, progress, bars, fs)
    finally:
        for bar in bars:
            bar.close()
    return progress


def _batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    """Runs of at most `size` items of one benchmark and setting (one option set per call)."""
    groups: dict[tuple, list[Item]] = {}
    for it in items:
        groups.setdefault((it.bench.name, it.setting), []).append(it)
    for group in groups.values():
        for lo in range(0, len(group), size):
            yield group[lo : lo + size]


def _pump(cfg, batches, actors, score_queue, metric_actors, parts, progress, bars, fs) -> None:
    """Keep every actor busy until the batches and the score queue are done."""
    load = dict.fromkeys([*actors, *metric_actors], 0)
    pending: dict = {}  # ObjectRef -> (actor, "restore" | "score", items)
    # work goes only to actors that have started: on a busy cluster some may wait for resources
    starting = {actor.__ray_ready__.remote(): actor for actor in actors}
    started = []
    while batches or score_queue or pending:
        for actor in started:
            while batches and load[actor] < SLOTS:
                batch = batches.popleft()
                payload = [
                    dict(
                        name=it.image.name,
                        lq=it.bench.lq(it.image).read_bytes(),
                        options=it.options.model_copy(
                            update={"seed": name_seed(it.image.name, it.options.seed)}
                        ).model_dump_json(),
                        restore=it.restore,
                        stage1=it.stage1,
                    )
                    for it in batch
                ]
                pending[actor.restore.remote(payload)] = (actor, "restore", batch)
                load[actor] += 1
        restoring = bool(batches) or any(kind == "restore" for _, kind, _ in pending.values())
        for metric_actor in metric_actors:  # full batches while restorations go on; then whatever is left
            while score_queue and load[metric_actor] < SLOTS and (len(score_queue) >= cfg.batch_size or not restoring):
                batch = [score_queue.popleft() for _ in range(min(cfg.batch_size, len(score_queue)))]
                pending[metric_actor.score.remote([_score_payload(it) for it in batch])] = (
                    metric_actor,
                    "score",
                    batch,
                )
                load[metric_actor] += 1
        if not pending and not (batches and starting):
            continue
        (ref,), _ = ray.wait([*pending, *starting] if batches else list(pending), num_returns=1)
        if ref in starting:
            ray.get(ref)  # raises when the actor failed to start (e.g. the model did not load)
            started.append(starting.pop(ref))
            continue
        actor, kind, batch = pending.pop(ref)
        load[actor] -= 1
        if kind == "restore":
            results, seconds = ray.get(ref)
            progress.restore_s += seconds
            for it, result in zip(batch, results):
                for path, data in (
                    (it.bench.stage1(it.model, it.setting, it.image), result["stage1"]),
                    (it.pred, result["restored"]),
                ):
                    if data is not None:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_write(fs, str(path)) as f:
                            f.write(data)
                if result["error"] is not None:
                    progress.failures.append(
                        f"{it.bench.name}/{it.model}/{it.setting}/{it.image.name}: {result['error']}"
                    )
                elif it.metrics:
                    score_queue.append(it)
                progress.restored += int(it.restore and result["error"] is None)
                bars[0].update(it.restore)
        else:
            rows, seconds = ray.get(ref)
            parts.save(rows)
            progress.scored_rows += len(rows)
            for name, s in seconds.items():
                progress.metric_s[name] = progress.metric_s.get(name, 0.0) + s
            bars[1].update(len(batch))


def _score_payload(it: Item) -> dict:
    hq = it.bench.hq(it.image)
    return it.key() | dict(pred=it.pred.read_bytes(), target=hq.read_bytes() if hq else None, metrics=it.metrics)


def check_resources(cfg: EvalConfig) -> None:
    """A local Ray cannot grow: refuse actors it could never start, which would wait forever.
    (A cluster at RAY_ADDRESS may autoscale to fit them.)"""
    if os.environ.get("RAY_ADDRESS"):
        return
    total = ray.cluster_resources()
    for kind, restoring, scoring in (
        ("CPU", cfg.cpus_per_actor, cfg.metric_cpus * cfg.metric_actors),
        ("GPU", cfg.gpus_per_actor, cfg.metric_gpus * cfg.metric_actors),
    ):
        if restoring + scoring > total.get(kind, 0):
            raise EvalError(
                f"the local Ray has {total.get(kind, 0):g} {kind}s: a restoration actor ({restoring:g}) and the metric "
                f"actors ({scoring:g}) never fit; lower the {kind.lower()}s per actor or join a cluster (RAY_ADDRESS)"
            )


def start_metric_actors(cfg: EvalConfig) -> tuple[list, list]:
    """The metric actors, and the refs of their loading (each metric's kind and direction)."""
    cls = ray.remote(MetricActor).options(num_cpus=cfg.metric_cpus, num_gpus=cfg.metric_gpus)
    device = "cuda" if cfg.metric_gpus > 0 else "cpu"
    metric_actors = [
        cls.remote(cfg.metrics.per_image().model_dump(), device, math.ceil(cfg.metric_cpus))
        for _ in range(cfg.metric_actors)
    ]
    return metric_actors, [s.load.remote() for s in metric_actors]


# ---------------------------------------------------------------------------------------------
# Set metrics: FID, in the driver (see the module docstring)


def fid_columns(cfg: EvalConfig, benches: list[Bench], models: list[Model]) -> list[tuple[Bench, str, str]]:
    """(benchmark, model, setting) of each column with an FID: every column of a benchmark with a fid_reference."""
    return [
        (b, m, s) for b in benches if b.cfg.fid_reference is not None for m, s in b.columns(models, cfg.settings_names)
    ]


def score_fid(todo: list[tuple[Bench, str, str]], fid: FID, store: ScoreStore, progress: Progress) -> None:
    """The FID of each column of `todo` (its images against the benchmark's fid_reference), stored
    as it is computed."""
    for bench, model, setting in tqdm(todo, unit="set", desc="fid", disable=not todo):
        start = time.perf_counter()
        value = fid([bench.pred(model, setting, img) for img in bench.images], bench.cfg.fid_reference)
        progress.metric_s[FID.name] = progress.metric_s.get(FID.name, 0.0) + time.perf_counter() - start
        key = dict(benchmark=bench.name, model=model, setting=setting, image_set=bench.image_set, metric=FID.name)
        store.save([key | dict(value=value)])
        progress.fids += 1


def fid_summary(store: ScoreStore, cfg: EvalConfig, benches: list[Bench], models: list[Model]) -> pd.DataFrame:
    """The FID rows of this configuration as summarize() lays rows out: the value as the mean, no
    std (one value per set), n the benchmark's images."""
    stored = {tuple(key): value for *key, value in store.load()[SET_KEY + ["value"]].itertuples(index=False)}
    rows = []
    for bench, model, setting in fid_columns(cfg, benches, models):
        if (key := (bench.name, model, setting, bench.image_set, FID.name)) not in stored:
            raise EvalError(f"the FID of {bench.name}/{model}/{setting} is missing; rerun to resume")
        rows.append((bench.name, model, setting, FID.name, stored[key], math.nan, len(bench.images)))
    return pd.DataFrame(rows, columns=["benchmark", "model", "setting", "metric", "mean", "std", "n"])


# ---------------------------------------------------------------------------------------------
# Reports


def results(parts: ScoreStore, cfg: EvalConfig, benches: list[Bench], models: list[Model], kinds: dict) -> pd.DataFrame:
    """This configuration's rows from the parts, in config order; an error when any is missing."""
    wanted = []
    for bench in benches:
        columns = bench.columns(models, cfg.settings_names)
        for metric in bench_metrics(bench, kinds):
            wanted += [(bench.name, m, s, img.name, metric) for m, s in columns for img in bench.images]
    order = pd.DataFrame(wanted, columns=KEY + ["metric"])
    df = order.merge(parts.load(), on=KEY + ["metric"], how="left", indicator=True)
    if (missing := df[df["_merge"] == "left_only"]).shape[0]:
        first = missing.iloc[0]
        raise EvalError(
            f"{len(missing)} results are missing (first: {'/'.join(first[KEY + ['metric']])}); rerun to resume"
        )
    return df.drop(columns="_merge").reset_index(drop=True)


def summarize(per_image: pd.DataFrame) -> pd.DataFrame:
    """Mean, population std and count per (benchmark, model, setting, metric), in per_image's order."""
    grouped = per_image.groupby(["benchmark", "model", "setting", "metric"], sort=False)["value"]
    # numpy's mean: a NaN score makes a NaN mean (pandas would skip it and hide a broken model)
    return grouped.agg(mean=lambda v: float(np.mean(v)), std=lambda v: float(np.std(v)), n="size").reset_index()


def column_label(model: str, setting: str) -> str:
    return model if setting == COMPARE_SETTING else f"{model} ({setting})"


def _fmt(value: float, metric: str) -> str:
    """As papers print them: dB and large scores with 2 decimals, scores in [0, 1] with 4."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if metric == "psnr" or abs(value) >= 10 else f"{value:.4f}"


def markdown_tables(summary: pd.DataFrame, benches: list[Bench], kinds: dict[str, dict]) -> str:
    """One table per benchmark: a row per metric, a column per model/setting and compared method,
    the best value of each row in bold (ties all bold; NaN never best)."""
    out = ["# Evaluation", ""]
    for bench in benches:
        rows = summary[summary["benchmark"] == bench.name]
        columns = list(dict.fromkeys(zip(rows["model"], rows["setting"])))
        n = len(bench.images)
        if bench.cfg.synthetic:
            b = bench.cfg
            how = f"synthetic: {n} HQ images of {b.hq}, degradation {b.degradation}, seed {b.seed}"
            how += f", centre crop {b.crop}" if b.crop else ""
        else:
            how = f"real-world: {n} LQ images of {bench.cfg.lq}"
        how += f"; FID against the images of {bench.cfg.fid_reference}" if bench.cfg.fid_reference else ""
        out += [f"## {bench.name}", "", how, ""]
        out.append("| metric | " + " | ".join(column_label(*c) for c in columns) + " |")
        out.append("|---|" + "---|" * len(columns))
        for metric in dict.fromkeys(rows["metric"]):
            means = {
                (m, s): v
                for m, s, v in rows[rows["metric"] == metric][["model", "setting", "mean"]].itertuples(index=False)
            }
            lower = kinds[metric]["lower_is_better"]
            finite = [v for v in means.values() if not math.isnan(v)]
            best = (min if lower else max)(finite) if finite else None
            cells = [f"**{_fmt(means[c], metric)}**" if means[c] == best else _fmt(means[c], metric) for c in columns]
            out.append(f"| {metric.upper()} {'↓' if lower else '↑'} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def grid_columns(cfg: EvalConfig, bench: Bench, models: list[Model]) -> list[tuple[str, list[Path | None]]]:
    """(title, a file per grid row or None) of each column of a benchmark's sample grid."""
    rows = bench.images[: cfg.grid_images]
    first, setting = models[0].label, cfg.settings[0].name
    columns = [("LQ", [bench.lq(img) for img in rows])]
    columns.append((f"stage 1 ({first})", [bench.stage1(first, setting, img) for img in rows]))
    columns += [
        (column_label(m, s), [bench.pred(m, s, img) for img in rows])
        for m, s in bench.columns(models, cfg.settings_names)
    ]
    if bench.cfg.synthetic:
        columns.append(("HQ", [bench.hq(img) for img in rows]))
    return [(title, [p if p is not None and p.is_file() else None for p in paths]) for title, paths in columns]


def write_grid(path: Path, columns: list[tuple[str, list[Path | None]]]) -> None:
    """A PNG of the columns side by side, each cell GRID_THUMB high (a blank where a file is missing)."""
    cells = [[None if p is None else _thumb(p) for p in paths] for _, paths in columns]
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    widths = [
        max([c.shape[1] for c in col if c is not None] + [cv2.getTextSize(title, font, scale, 1)[0][0]])
        for (title, _), col in zip(columns, cells)
    ]
    n = max(len(paths) for _, paths in columns)
    canvas = np.full(
        (GRID_HEADER + n * (GRID_THUMB + GRID_PAD), sum(widths) + GRID_PAD * (len(widths) + 1), 3), 255, np.uint8
    )
    x = GRID_PAD
    for (title, _), col, width in zip(columns, cells, widths):
        cv2.putText(canvas, title, (x, GRID_HEADER - 8), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
        for row, cell in enumerate(col):
            if cell is not None:
                y = GRID_HEADER + row * (GRID_THUMB + GRID_PAD)
                canvas[y : y + GRID_THUMB, x : x + cell.shape[1]] = cell
        x += width + GRID_PAD
    with atomic_write(fsspec.filesystem("file"), str(path)) as f:
        f.write(encode_image(canvas / 255.0))


def _thumb(path: Path) -> np.ndarray:
    rgb = decode_image(path.read_bytes(), str(path), dtype=np.uint8)[0]
    width = max(1, round(rgb.shape[1] * GRID_THUMB / rgb.shape[0]))
    interpolation = cv2.INTER_AREA if rgb.shape[0] > GRID_THUMB else cv2.INTER_CUBIC
    return cv2.resize(rgb, (width, GRID_THUMB), interpolation=interpolation)


def write_reports(
    cfg: EvalConfig, out: Path, per_image: pd.DataFrame, summary: pd.DataFrame, benches, models, kinds
) -> list[Path]:
    fs, parquet = fsspec.filesystem("file"), io.BytesIO()
    pq.write_table(pa.Table.from_pandas(per_image, schema=PART_SCHEMA, preserve_index=False), parquet)
    files = {
        out / "per_image.parquet": parquet.getvalue(),
        out / "metrics.csv": summary.to_csv(index=False).encode(),
        out / "table.md": markdown_tables(summary, benches, kinds).encode(),
    }
    for path, data in files.items():
        with atomic_write(fs, str(path)) as f:
            f.write(data)
    written = list(files)
    if cfg.grid_images:
        for bench in benches:
            write_grid(out / f"grid_{bench.name}.png", grid_columns(cfg, bench, models))
            written.append(out / f"grid_{bench.name}.png")
    return written


def log_to_mlflow(cfg: EvalConfig, files: list[Path], summary: pd.DataFrame, models: list[Model]) -> str:
    """An MLflow run with the reports as artifacts and every mean as a metric; registry versions
    tagged with their means. Returns the run id."""
    client = MlflowClient()
    tags = {f"model.{m.label}": m.uri for m in models}
    run = client.create_run(
        registry.experiment_id(cfg.experiment), run_name=f"eval {' '.join(b.name for b in cfg.benchmarks)}", tags=tags
    )
    run_id, now = run.info.run_id, int(time.time() * 1000)
    # MLflow stores no inf or NaN faithfully: those means stay in metrics.csv and table.md
    metrics = [
        MlflowMetric(f"{r.benchmark}.{r.model}.{r.setting}.{r.metric}", float(r.mean), now, 0)
        for r in summary.itertuples()
        if math.isfinite(r.mean)
    ]
    params = dict(
        models=" ".join(m.uri for m in models),
        benchmarks=" ".join(b.name for b in cfg.benchmarks),
        settings=" ".join(cfg.settings_names),
        metrics=" ".join(cfg.metrics.names),
        compare=" ".join(cfg.compare),
        output=str(Path(cfg.output).resolve()),
    )
    client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    for lo in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[lo : lo + 1000])
    for path in files:
        client.log_artifact(run_id, str(path))
    client.log_text(run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
    client.set_terminated(run_id)
    for m in models:
        if m.version is None:
            continue
        mine = summary[summary["model"] == m.label]
        version_tags = {f"eval.{r.benchmark}.{r.setting}.{r.metric}": repr(float(r.mean)) for r in mine.itertuples()}
        registry.set_tags(m.name, m.version, version_tags | {"eval.run_id": run_id})
    return run_id


# ---------------------------------------------------------------------------------------------
# The job


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation `cfg` describes (see the module docstring); returns a summary."""
    start = time.perf_counter()
    out = Path(cfg.output)
    if cfg.overwrite:
        for name in ("parts", "set_parts", "images", "inputs"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "run.json").unlink(missing_ok=True)
    benches = load_benchmarks(cfg, out)
    registry.configure(cfg.tracking_dir)
    models = resolve_models(cfg)
    record_meanings(out, fingerprint(cfg, benches, models))
    parts, sets = ScoreStore(out / "parts", PART_SCHEMA), ScoreStore(out / "set_parts", SET_SCHEMA)
    stored_sets = set(sets.load()[SET_KEY].itertuples(index=False, name=None))
    fid_todo = [
        (b, m, s)
        for b, m, s in fid_columns(cfg, benches, models)
        if (b.name, m, s, b.image_set, FID.name) not in stored_sets
    ]
    # one FID network for the run, in the driver, built before any work (a bad weights file fails first)
    fid = FID(cfg.metrics, "cuda" if torch.cuda.is_available() else "cpu") if fid_todo else None
    ensure_ray()
    check_resources(cfg)
    metric_actors, loading = start_metric_actors(cfg)  # they load while the inputs are made
    try:
        prepared = prepare_inputs(benches)
        kinds = ray.get(loading)[0]
        if empty := [b.name for b in benches if not bench_metrics(b, kinds) and b.cfg.fid_reference is None]:
            raise EvalError(
                f"real-world benchmarks {empty} have no HQ images: add a no-reference metric to metrics.names "
                "(or fid, with a fid_reference)"
            )
        check_sizes(cfg, benches)
        done = set(parts.load()[KEY + ["metric"]].itertuples(index=False, name=None))
        items = plan(cfg, benches, models, kinds, done)
        progress = execute(cfg, items, models, metric_actors, parts)
    finally:
        for s in metric_actors:
            ray.kill(s)
    if progress.failures:
        raise EvalError(
            f"{len(progress.failures)} restorations failed (first: {progress.failures[0]}); rerun to retry them"
        )
    if fid is not None:
        score_fid(fid_todo, fid, sets, progress)
    per_image = results(parts, cfg, benches, models, kinds)
    order = {b.name: i for i, b in enumerate(benches)}
    summary = (
        pd.concat([summarize(per_image), fid_summary(sets, cfg, benches, models)], ignore_index=True)
        .sort_values("benchmark", key=lambda names: names.map(order), kind="stable")
        .reset_index(drop=True)
    )
    files = write_reports(cfg, out, per_image, summary, benches, models, kinds | {FID.name: FID_KIND})
    run_id = log_to_mlflow(cfg, files, summary, models)
    return dict(
        output=str(out),
        run_id=run_id,
        models=[m.uri for m in models],
        images={b.name: len(b.images) for b in benches},
        prepared_this_run=prepared,
        restored_this_run=progress.restored,
        scored_rows_this_run=progress.scored_rows,
        fid_this_run=progress.fids,
        rows=len(per_image),
        restore_s=round(progress.restore_s, 3),
        metric_s={k: round(v, 3) for k, v in progress.metric_s.items()},
        seconds=round(time.perf_counter() - start, 2),
        files=[str(f) for f in files],
    )


def fingerprint(cfg: EvalConfig, benches: list[Bench], models: list[Model]) -> dict[str, dict]:
    """What each name of this run means (record_meanings() keeps reruns consistent), as JSON values."""
    sections: dict[str, dict] = dict(benchmarks={}, models={m.label: m.uri for m in models}, settings={}, compare={})
    # its own section: adding FID to a benchmark adds work, and only another folder changes a meaning
    sections["fid_reference"] = {
        b.name: str(Path(b.fid_reference).resolve()) for b in cfg.benchmarks if b.fid_reference is not None
    }
    sections["metrics"] = {
        name: dict(convention=cfg.metrics.convention.model_dump(), weights=cfg.metrics.weights.get(name))
        for name in cfg.metrics.names
    }
    for bench in benches:
        b = bench.cfg
        source = dict(hq=str(Path(b.hq).resolve())) if b.synthetic else dict(lq=str(Path(b.lq).resolve()))
        if b.synthetic:
            source |= dict(degradation=_degradation(b).model_dump(mode="json"), seed=b.seed, crop=b.crop)
        sections["benchmarks"][b.name] = source
        for m in models:
            for s in cfg.settings:
                sections["settings"][f"{b.name}/{m.label}/{s.name}"] = cfg.restore_options(b, s).model_dump(mode="json")
        for only, name, folder in cfg.compare_entries():
            if only in (None, b.name):
                sections["compare"][f"{b.name}/{name}"] = str(Path(folder).resolve())
    return sections


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(EvalConfig, argv, __doc__.split("\n\n")[0], prog="python -m training.evaluate")
        summary = evaluate(cfg)
    # ValueError also covers bad configs (pydantic), unknown metrics and unreadable images
    except (EvalError, registry.RegistryError, MlflowException, ImageError, OSError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
