"""Restore every image of an archive into an archive of the same kind, with Ray Data.

    python -m serving.archive --input photos.tar.gz --output restored.tar.gz [--config FILE] [--steps 20 ...]
    make restore-archive IN=photos.zip OUT=restored.zip ARGS='--batch-size 8 --concurrency 4 --gpus-per-actor 1'

Input: a tar, tar.gz (.tgz), tar.bz2 (.tbz2), tar.xz (.txz), zip or folder, local or an fsspec
URL. Output: the same kind (tar -> tar, tar.gz -> tar.gz, zip -> zip, folder -> folder, ...)
holding the restored images under their member paths, in their own format (PNG stays PNG, JPEG
stays JPEG...; 16-bit, gray and alpha kept).
Only .png .jpg .jpeg .webp .tif .tiff members are restored: the formats that can be written back.
Beside the output, named after its stem (the output without its archive suffix):

    <stem>.manifest.parquet, <stem>.manifest.csv   one row per input member (directories excepted):
        path, output, status (restored / skipped / failed), reason, error, model uri + version,
        options (JSON), seed, caption (--captioner: what led the prompt) or caption_error (why
        there is none: the default prompt was used), size, timings, run id. skipped: refused, or
        not a usable image (a rerun skips it again unless the limits changed); failed: its bytes
        could not be read or restoration raised (a rerun retries it)
    <stem>.contact.png, <stem>.contact.html        input | stage 1 | final of the first restored images
    <stem>.parts/                                  the work directory; removed when the run ends

How: the driver lists the members (serving.archive.members: one pass over the archive; names,
declared sizes and output-path collisions decide what is refused), Ray Data reads the accepted ones
lazily in read tasks (a compressed tar in one streaming task, the rest in parallel) and restores
them in an actor pool of RestorationPipelines (restore_grouped: images batched by working canvas,
so batch mates change nothing); the driver stores each result in <stem>.parts/ as it arrives
(serving.archive.parts) and, once all are there, writes the output, the manifest and the contact
sheet (serving.archive.outputs).

Resuming: a rerun restores only what <stem>.parts/ lacks, what failed, and what was skipped under
other limits. The parts belong to one input content (its digest), listing, model version and set of
output options (restoration options, jpeg quality): a rerun that differs in any of them is refused,
and so is replacing a finished output (--overwrite starts afresh).

Seeds: member `path` uses seed + (a stable hash of path), so fresh and resumed runs agree.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import posixpath
import sys
import time
import uuid
from collections.abc import Iterator

import fsspec
import mlflow
import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from pydantic import Field, ValidationError, model_validator
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata
from tqdm import tqdm

from diffbir.captioning import CaptionerSettings
from diffbir.config import MATMUL_PRECISION_HELP, Dtype, MatmulPrecision, parse_config
from diffbir.faces import FaceConfig
from diffbir.image_io import ImageError, ImageInfo, decode_image, encode_image
from diffbir.pipeline import RestorationPipeline, RestoreOptions, canvas_size, name_seed
from pipelines.arrow import batched_tables
from pipelines.ray_env import ensure_ray
from serving.archive.members import (
    TAR_COMPRESSION,
    ArchiveError,
    Member,
    Screening,
    check_paths,
    list_members,
    output_stem,
    read_members,
)
from serving.archive.outputs import (
    manifest_rows,
    over_output_budget,
    write_contact_sheet,
    write_manifest,
    write_output,
)
from serving.archive.parts import Parts
from training import registry

READ_CPUS = 0.25  # fractional: read tasks must not wait behind whole-CPU actors on small machines
# limits whose change makes a rerun retry the members skipped under the old ones
LIMIT_FIELDS = (
    "max_member_bytes",
    "max_total_bytes",
    "max_members",
    "max_tar_header_bytes",
    "max_zip_directory_bytes",
    "max_pixels",
    "max_working_pixels",
    "max_output_bytes",
)


class ArchiveConfig(CaptionerSettings, RestoreOptions):
    """Restoration options (RestoreOptions; `seed` is the base of the per-file seeds), the captioner,
    plus what to read, what to write, how to run and what to refuse."""

    input: str = Field(description="tar, tar.gz, tar.bz2, tar.xz, zip or folder: a local path or an fsspec URL")
    output: str = Field(description="the same kind as the input (a folder for a folder)")
    model: str = Field("models:/diffbir@champion", description=f"{registry.URI_FORMS}")
    tracking_dir: str = Field(registry.DEFAULT_DIR, description="local MLflow store (MLFLOW_TRACKING_URI wins)")
    cache_dir: str | None = Field(None, description=f"downloaded versions (default ${registry.CACHE_ENV} or ~/.cache)")
    dtype: Dtype = Field("fp32", description="inference precision")
    matmul_precision: MatmulPrecision = Field("highest", description=MATMUL_PRECISION_HELP)
    batch_size: int = Field(4, ge=1, le=256, description="images per actor call")
    concurrency: int = Field(1, ge=1, le=1024, description="actors in the pool, each holding one model copy")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per actor (0: run on CPU)")
    cpus_per_actor: float = Field(
        1.0, gt=0, description="CPUs per actor; on CPU torch uses this many threads, rounded up"
    )
    jpeg_quality: int = Field(95, ge=1, le=100, description="quality of JPEG and WebP outputs")
    max_member_bytes: int = Field(512 << 20, ge=1, description="skip members declaring more bytes than this")
    max_total_bytes: int = Field(256 << 30, ge=1, description="skip everything once the declared sizes add up to more")
    max_members: int = Field(1_000_000, ge=1, description="refuse archives with more entries")
    max_tar_header_bytes: int = Field(
        64 << 10, ge=512, description="refuse tars whose extension headers (long names, pax) for one member are larger"
    )
    max_zip_directory_bytes: int = Field(
        256 << 20, ge=22, description="refuse zips whose central directory (read into memory) is larger"
    )
    max_pixels: int = Field(100_000_000, ge=1, description="skip images with more pixels (read from the header)")
    max_working_pixels: int = Field(
        8192 * 8192, ge=1, description="skip images whose working canvas (after upscale and min_side) has more pixels"
    )
    max_output_bytes: int = Field(
        1 << 40, ge=1, description="stop restoring once the restored images would pass this many bytes; skip the rest"
    )
    case_insensitive_names: bool = Field(
        True, description="names differing only in case collide (the output may be unpacked on macOS or Windows)"
    )
    contact_sheet: int = Field(
        8, ge=0, le=64, description="images in the contact sheet, as input | stage 1 | final (0: none)"
    )
    keep_parts: bool = Field(False, description="keep <stem>.parts/ after a finished run")
    faces: FaceConfig = Field(default_factory=FaceConfig, description="unaligned_face: detector, parser, face model")
    overwrite: bool = Field(False, description="replace an existing output and discard earlier parts")

    @model_validator(mode="after")
    def _faces(self) -> ArchiveConfig:
        if self.landmarks is not None:
            raise ValueError("landmarks: an archive's images have their own faces; leave them to the detector")
        self.faces = self.faces.absolute()  # for the actors, wherever they start
        return self

    def options(self) -> RestoreOptions:
        """The options given (a preset, the model's version's by default, fills the others)."""
        return RestoreOptions(**self.model_dump(include=set(RestoreOptions.model_fields), exclude_unset=True))

    def screening(self) -> Screening:
        return Screening(**self.model_dump(include={f.name for f in Screening.__dataclass_fields__.values()}))

    def limits(self) -> dict:
        return self.model_dump(include=set(LIMIT_FIELDS))


# ---------------------------------------------------------------------------------------------
# Reading members lazily

# a member as a read task hands it to the restorers: its bytes, or why there are none
ARCHIVE_MEMBER_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int64()),
        ("path", pa.string()),
        ("data", pa.large_binary()),
        ("reason", pa.string()),
        ("error", pa.string()),
        ("read_s", pa.float64()),
    ]
)


class MemberSource(Datasource):
    """Ray Data source of the members to restore: a compressed tar in one streaming read task
    (it can only be read from the start), other kinds in up to `parallelism` tasks. Every task
    yields blocks of `rows_per_block` members as it reads them."""

    def __init__(self, url: str, kind: str, members: list[Member], screening: Screening, rows_per_block: int):
        super().__init__()
        self.url, self.kind, self.members, self.screening = url, kind, members, screening
        self.rows_per_block = rows_per_block

    def estimate_inmemory_data_size(self) -> int:
        return sum(m.size for m in self.members)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        n = 1 if TAR_COMPRESSION.get(self.kind) else max(1, min(parallelism, len(self.members)))
        step = -(-len(self.members) // n)
        tasks = []
        for lo in range(0, len(self.members), step):
            chunk = self.members[lo : lo + step]
            meta = BlockMetadata(
                num_rows=len(chunk), size_bytes=sum(m.size for m in chunk), input_files=None, exec_stats=None
            )
            # a function of its own chunk only: a task must not carry every member of the archive
            read = functools.partial(_read_blocks, self.url, self.kind, chunk, self.screening, self.rows_per_block)
            tasks.append(ReadTask(read, meta))
        return tasks


def _read_blocks(url: str, kind: str, chunk: list[Member], screening: Screening, rows: int) -> Iterator[pa.Table]:
    reads = (
        dict(
            ordinal=r.member.ordinal,
            path=r.member.path,
            read_s=r.seconds,
            data=r.data,
            reason=r.reason,
            error=r.error,
        )
        for r in read_members(url, kind, chunk, screening)
    )
    yield from batched_tables(reads, ARCHIVE_MEMBER_SCHEMA, rows)


# ---------------------------------------------------------------------------------------------
# Restoring: an actor pool of pipelines

RESULT_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("error", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("read_s", pa.float64()),
        ("restore_s", pa.float64()),
        ("caption", pa.string()),
        ("caption_error", pa.string()),
        ("data", pa.large_binary()),
        ("stage1", pa.large_binary()),  # PNG of the stage-1 image, for the contact sheet's members only
    ]
)


class ArchiveRestorer:
    """map_batches actor: ARCHIVE_MEMBER_SCHEMA blocks -> RESULT_SCHEMA rows. Per-image problems
    become rows (skipped: the input is unusable or over a limit; failed: it could not be read, or
    restoration raised), never a failed job."""

    def __init__(
        self, model_uri: str, tracking_uri: str, cache_dir: str | None, options: dict, cfg: dict, contact: list[int]
    ):
        if model_uri.startswith("models:/"):
            mlflow.set_tracking_uri(tracking_uri)  # this worker may have started before the driver set it
        self.max_pixels, self.max_working_pixels = cfg["max_pixels"], cfg["max_working_pixels"]
        self.quality = cfg["jpeg_quality"]
        self.contact = set(contact)  # ordinals whose stage-1 image the contact sheet shows
        device = "cuda" if cfg["gpus_per_actor"] > 0 else "cpu"
        if device == "cpu":
            torch.set_num_threads(math.ceil(cfg["cpus_per_actor"]))
        model_dir = registry.resolve(model_uri, cache_dir)  # a pinned version: every actor loads the same
        self.pipe = RestorationPipeline.from_pretrained(str(model_dir), device, cfg["dtype"], cfg["matmul_precision"])
        self.opts = self.pipe.options(RestoreOptions(**options))  # as the pipeline will run them (preset applied)
        captioner = CaptionerSettings(**{name: cfg[name] for name in CaptionerSettings.model_fields})
        self.pipe.captioner = captioner.load_captioner(self.pipe.device, self.pipe.dtype)
        self.pipe.configure_faces(FaceConfig(**cfg["faces"]))

    def __call__(self, batch: pa.Table) -> pa.Table:
        results, decoded = [], []
        for row in batch.to_pylist():
            seed = name_seed(row["path"], self.opts.seed)
            result = dict(ordinal=row["ordinal"], seed=seed, read_s=row["read_s"], status="skipped")
            result |= dict(reason=row["reason"], error=row["error"])
            if row["error"] is not None:
                result["status"] = "failed"
            elif row["data"] is not None:
                try:
                    image, info = decode_image(row["data"], row["path"], self.max_pixels)
                    result["reason"] = self._over_working_pixels(image, row["path"])
                    if result["reason"] is None:
                        decoded.append((result, image, info, row["path"]))
                        continue
                except ImageError as e:
                    result["reason"] = str(e)
            results.append(result)
        start = time.perf_counter()  # restore_s: the time restoring the block, per image
        options = [self.opts.model_copy(update={"seed": r["seed"]}) for r, *_ in decoded]
        images = [image for _, image, _, _ in decoded]
        captions = self.pipe.caption(images, options)  # the block's images in one captioner call
        outputs = self.pipe.restore_grouped(images, options, captions=captions)
        seconds = (time.perf_counter() - start) / max(len(decoded), 1)
        for (result, image, info, path), out, opts, caption in zip(decoded, outputs, options, captions):
            result |= dict(caption=caption.text or None, caption_error=caption.error)
            result = self._finish(result, out, info, path, seconds)
            if result["status"] == "restored" and result["ordinal"] in self.contact:
                result["stage1"] = encode_image(self.pipe.stage1_image(image, opts))
            results.append(result)
        return pa.Table.from_pylist(results, schema=RESULT_SCHEMA)

    def _over_working_pixels(self, image: np.ndarray, path: str) -> str | None:
        """Why `image` is not restored when its working canvas (the output side, after upscale and
        min_side, in whole tiles) passes max_working_pixels; the input's header passed max_pixels."""
        h, w = canvas_size(image.shape[0], image.shape[1], self.opts)
        if h * w <= self.max_working_pixels:
            return None
        return (
            f"{path}: restores on a {w}x{h} = {w * h:,} pixel canvas (upscale {self.opts.scale:g}, "
            f"min_side {self.opts.min_side}), over max_working_pixels = {self.max_working_pixels:,}"
        )

    def _finish(self, result: dict, out: np.ndarray | Exception, info: ImageInfo, path: str, seconds: float) -> dict:
        """`result` completed: restored, or failed when restoring or encoding raised."""
        if not isinstance(out, Exception):
            try:
                data = encode_image(out, info, posixpath.splitext(path)[1], self.quality)
                return result | dict(
                    status="restored",
                    reason=None,
                    data=data,
                    height=out.shape[0],
                    width=out.shape[1],
                    restore_s=seconds,
                )
            except Exception as e:  # noqa: BLE001 -- recorded per image; the others go on
                out = e
        return result | dict(
            status="failed", reason="restoration raised an error", error=f"{type(out).__name__}: {out}"
        )


# ---------------------------------------------------------------------------------------------
# The job


def restore_archive(cfg: ArchiveConfig) -> dict:
    """Restore `cfg.input` into `cfg.output`; returns a summary (counts, paths, images/s)."""
    start = time.perf_counter()
    kind = check_paths(cfg.input, cfg.output)
    out_fs, out_path = fsspec.core.url_to_fs(cfg.output)
    stem = output_stem(cfg.output, kind)
    parts = Parts(stem + ".parts")
    if out_fs.exists(out_path) and not parts.fs.exists(parts.root) and not cfg.overwrite:
        raise FileExistsError(f"{cfg.output} exists (--overwrite replaces it)")
    if cfg.overwrite:
        parts.remove()

    if cfg.model.startswith("models:/"):
        registry.configure(cfg.tracking_dir)
    model = registry.version_info(cfg.model)
    registry.resolve(model["uri"], cfg.cache_dir)  # fail here, not in every actor; warms this node's cache
    screening = cfg.screening()
    listing = list_members(cfg.input, kind, screening)
    members = listing.members
    options = cfg.options().model_dump_json()
    names = hashlib.sha256(json.dumps([(m.name, m.size) for m in members]).encode()).hexdigest()
    fingerprint = dict(
        content=listing.digest, listing=names, model=model["uri"], options=options, jpeg_quality=cfg.jpeg_quality
    )
    if cfg.captioner:  # captions change the restorations; runs without one keep their earlier fingerprint
        cfg = cfg.model_copy(update={"captioner": os.path.abspath(cfg.captioner)})  # as the actors will see it
        fingerprint["captioner"] = cfg.captioner
    parts.claim(fingerprint)

    limits = cfg.limits()
    done = {o for o, r in parts.records().items() if _still_valid(r, limits)}
    todo = [m for m in members if m.reason is None and m.ordinal not in done]
    run_id = uuid.uuid4().hex[:12]
    if todo:
        contact = [m.ordinal for m in members if m.reason is None][: cfg.contact_sheet]
        _run(cfg, kind, model, todo, parts, dict(run_id=run_id, limits=limits), contact)
    records = parts.records()
    if missing := [m.name for m in members if m.reason is None and m.ordinal not in records]:
        raise ArchiveError(f"{len(missing)} members got no result (first: {missing[0]}); rerun to resume")

    rows = manifest_rows(members, records, model, options, cfg.max_output_bytes)
    restored = [(m, parts.file(m.ordinal)) for m, row in zip(members, rows) if row["status"] == "restored"]
    write_output(out_fs, out_path, kind, restored, parts)
    manifest = write_manifest(stem, rows)
    sheet = list(_contact_rows(cfg.input, kind, screening, restored[: cfg.contact_sheet], parts))
    contact = write_contact_sheet(stem, sheet) if sheet else []
    if not cfg.keep_parts:
        parts.remove()
    seconds = time.perf_counter() - start
    counts = {s: sum(r["status"] == s for r in rows) for s in ("restored", "skipped", "failed")}
    restored_now = sum(1 for r in rows if r["run_id"] == run_id and r["status"] == "restored")
    return dict(
        input=cfg.input,
        output=cfg.output,
        kind=kind,
        model_uri=model["uri"],
        model_version=model["version"],
        members=len(rows),
        **counts,
        restored_this_run=restored_now,
        resumed=len(done),
        seconds=round(seconds, 2),
        images_per_s=round(restored_now / seconds, 4),
        manifest=manifest,
        contact_sheet=contact,
        run_id=run_id,
    )


def _still_valid(record: dict, limits: dict) -> bool:
    """A stored result a rerun keeps: a restored image, or a skip decided under the same limits
    (a failure is retried)."""
    return record["status"] == "restored" or (record["status"] == "skipped" and record["limits"] == limits)


def _run(
    cfg: ArchiveConfig, kind: str, model: dict, todo: list[Member], parts: Parts, stamp: dict, contact: list[int]
) -> None:
    """Restore `todo` on Ray, storing each block of results as it arrives. Once the restored
    output would pass max_output_bytes the run stops; what is left is skipped for it."""
    ensure_ray()
    source = MemberSource(cfg.input, kind, todo, cfg.screening(), cfg.batch_size)
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS)
    ds = ds.map_batches(
        ArchiveRestorer,
        fn_constructor_kwargs=dict(
            # the driver's store and cache: the actors' environment was fixed when Ray started
            model_uri=model["uri"],
            tracking_uri=mlflow.get_tracking_uri(),
            cache_dir=cfg.cache_dir or os.environ.get(registry.CACHE_ENV),
            options=cfg.options().model_dump(exclude_unset=True),
            cfg=cfg.model_dump(),
            contact=contact,
        ),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
    kept = parts.records()
    output_bytes = sum(r["bytes"] for r in kept.values() if r["status"] == "restored")
    saved, over_budget = set(), False
    # closing the iterator stops the execution (its actors too) when this loop ends early
    batches = contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
    with batches as blocks, tqdm(total=len(todo), unit="img", desc="restore archive") as bar:
        for block in blocks:
            rows = block.to_pylist()
            for row in rows:
                if row["status"] != "restored":
                    continue
                if over_budget or output_bytes + len(row["data"]) > cfg.max_output_bytes:
                    row.update(status="skipped", reason=over_output_budget(cfg.max_output_bytes), data=None)
                    row["stage1"], over_budget = None, True
                else:
                    output_bytes += len(row["data"])
            parts.save(rows, stamp)
            saved |= {row["ordinal"] for row in rows}
            bar.update(len(rows))
            if over_budget:
                break
    if over_budget:
        reason = over_output_budget(cfg.max_output_bytes)
        left = [m for m in todo if m.ordinal not in saved]
        parts.save([dict(ordinal=m.ordinal, status="skipped", reason=reason) for m in left], stamp)


def _contact_rows(
    url: str, kind: str, screening: Screening, restored: list[tuple[Member, str]], parts: Parts
) -> Iterator[tuple[str, bytes, bytes | None, bytes]]:
    """(path, input bytes, stage-1 PNG or None, output bytes) of `restored`, the input read again
    from the archive."""
    part_of = dict(restored)
    for read in read_members(url, kind, list(part_of), screening):
        if read.data is not None:
            stage1 = parts.stage1_file(read.member.ordinal)
            stage1 = parts.fs.cat_file(stage1) if parts.fs.exists(stage1) else None
            yield read.member.path, read.data, stage1, parts.fs.cat_file(part_of[read.member])


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(ArchiveConfig, argv, __doc__.split("\n\n")[0], prog="python -m serving.archive")
        summary = restore_archive(cfg)
    except (ArchiveError, FileExistsError, FileNotFoundError, ValidationError, registry.RegistryError, ValueError) as e:
        print(f"restore-archive: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
