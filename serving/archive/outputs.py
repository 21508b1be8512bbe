"""What a run writes: the output archive or folder, the manifest and the contact sheet. Each is
written beside its final name and then moved into place, so a reader never sees half of one."""

from __future__ import annotations

import base64
import html
import io
import posixpath
import tarfile
import time
import uuid
import zipfile

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from diffbir.image_io import decode_image, encode_image
from pipelines.shards import atomic_write
from serving.archive.members import TAR_COMPRESSION, Member
from serving.archive.parts import Parts

THUMB_HEIGHT = 160
ZIP_EPOCH = 315532800  # 1980-01-01: zip dates start there
WRITING, REPLACED = "writing", "replaced"  # the temporary folders beside a folder output


def over_output_budget(limit: int) -> str:
    """The reason of a member skipped because the run's output reached max_output_bytes."""
    return f"the run's restored output would pass max_output_bytes = {limit:,}"


def write_output(fs, path: str, kind: str, restored: list[tuple[Member, str]], parts: Parts) -> None:
    """The output archive (or folder) of the restored members, in archive order, from their
    parts: written beside `path`, then moved into place."""
    if kind == "folder":
        _write_folder(fs, path, restored)
        return
    with atomic_write(fs, path) as f:
        if kind == "zip":
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:  # images are compressed already
                for m, part in restored:
                    mtime = max(m.mtime, ZIP_EPOCH)
                    info = zipfile.ZipInfo(m.path, time.localtime(mtime)[:6])
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, parts.fs.cat_file(part))
        else:
            with tarfile.open(fileobj=f, mode=f"w|{TAR_COMPRESSION[kind]}") as tar:
                for m, part in restored:
                    info = tarfile.TarInfo(m.path)
                    info.size, info.mtime, info.mode = parts.fs.size(part), m.mtime, 0o644
                    with parts.fs.open(part, "rb") as src:
                        tar.addfile(info, src)


def _write_folder(fs, path: str, restored: list[tuple[Member, str]]) -> None:
    """Write the folder beside `path`, then swap it in: the old output is renamed aside, the new one
    renamed into place, the old one removed. A failure leaves the old output as it was; temporary
    folders of this run are removed, and those of a killed earlier run on the next run."""
    parent, name = posixpath.split(path.rstrip("/"))
    for leftover in fs.glob(f"{parent}/.{name}.{WRITING}-*") + fs.glob(f"{parent}/.{name}.{REPLACED}-*"):
        fs.rm(leftover, recursive=True)
    token = uuid.uuid4().hex[:12]
    tmp, old = f"{parent}/.{name}.{WRITING}-{token}", f"{parent}/.{name}.{REPLACED}-{token}"
    try:
        fs.makedirs(tmp)  # an archive with nothing restored still gives a folder
        for m, part in restored:
            target = f"{tmp}/{m.path}"
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.cp_file(part, target)  # the parts lie beside the output: the same filesystem
        if fs.exists(path):
            fs.mv(path, old, recursive=True)
        try:
            fs.mv(tmp, path, recursive=True)
        except BaseException:
            if fs.exists(old):
                fs.mv(old, path, recursive=True)
            raise
        if fs.exists(old):
            fs.rm(old, recursive=True)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)


MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("output", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("error", pa.string()),
        ("model_uri", pa.string()),
        ("model_version", pa.string()),
        ("options", pa.string()),
        ("seed", pa.int64()),
        ("caption", pa.string()),
        ("caption_error", pa.string()),
        ("size", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("read_s", pa.float64()),
        ("restore_s", pa.float64()),
        ("run_id", pa.string()),
        ("finished_at", pa.string()),
    ]
)
RECORD_FIELDS = (
    "status",
    "reason",
    "error",
    "seed",
    "caption",
    "caption_error",
    "width",
    "height",
    "read_s",
    "restore_s",
    "run_id",
    "finished_at",
)


def manifest_rows(
    members: list[Member], records: dict[int, dict], model: dict, options: str, max_output_bytes: int
) -> list[dict]:
    """One row per member. Restored members count against max_output_bytes in archive order (parts
    kept from a run with a larger limit may hold more): those past it are skipped."""
    rows, output_bytes = [], 0
    for m in members:
        record = records.get(m.ordinal, {}) if m.reason is None else {}
        row = dict(path=m.name, size=m.size, model_uri=model["uri"], model_version=model["version"], options=options)
        row |= {k: record.get(k) for k in RECORD_FIELDS}
        if m.reason is not None:
            row |= dict(status="failed" if m.error else "skipped", reason=m.reason, error=m.error)
        elif row["status"] == "restored":
            output_bytes += record["bytes"]
            if output_bytes > max_output_bytes:
                row |= dict(status="skipped", reason=over_output_budget(max_output_bytes))
        row["output"] = m.path if row["status"] == "restored" else None
        rows.append(row)
    return rows


def write_manifest(stem: str, rows: list[dict]) -> list[str]:
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    fs, base = fsspec.core.url_to_fs(stem)
    written = []
    for suffix, write in ((".manifest.parquet", pq.write_table), (".manifest.csv", pcsv.write_csv)):
        buf = io.BytesIO()
        write(table, buf)
        with atomic_write(fs, base + suffix) as f:
            f.write(buf.getvalue())
        written.append(stem + suffix)
    return written


CONTACT_COLUMNS = ("input", "stage 1", "final")


def write_contact_sheet(stem: str, rows: list[tuple[str, bytes, bytes | None, bytes]]) -> list[str]:
    """<stem>.contact.png (rows of input | stage 1 | final, with the member's path; a gap where the
    stage-1 image is missing) and .html (a table of the same thumbnails, embedded, so the page
    stands alone). Stage 1 shows what the restoration module did before the diffusion stage."""
    thumbs = [(path, [None if image is None else thumbnail(image) for image in images]) for path, *images in rows]
    widths = [max((t[c].shape[1] for _, t in thumbs if t[c] is not None), default=0) for c in range(3)]
    canvas = np.full((len(thumbs) * (THUMB_HEIGHT + 30) + 40, sum(widths) + 40, 3), 255, np.uint8)
    xs = [10 + sum(widths[:c]) + 10 * c for c in range(3)]
    for x, title in zip(xs, CONTACT_COLUMNS):
        cv2.putText(canvas, title, (x, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cells = []
    for i, (path, images) in enumerate(thumbs):
        y = 40 + i * (THUMB_HEIGHT + 30)
        for x, thumb in zip(xs, images):
            if thumb is not None:
                canvas[y : y + THUMB_HEIGHT, x : x + thumb.shape[1]] = thumb
        cv2.putText(
            canvas, path[-60:], (10, y + THUMB_HEIGHT + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA
        )
        tds = "".join("<td>–</td>" if t is None else f"<td><img src='{_data_uri(t)}'></td>" for t in images)
        cells.append(f"<tr><td>{html.escape(path)}</td>{tds}</tr>")
    heads = "".join(f"<th>{title}</th>" for title in CONTACT_COLUMNS)
    page = (
        "<!doctype html><meta charset='utf-8'><title>input / stage 1 / final</title>"
        "<style>body{font-family:sans-serif}td{padding:4px;vertical-align:top}</style>"
        f"<table><tr><th>member</th>{heads}</tr>{''.join(cells)}</table>"
    )
    fs, base = fsspec.core.url_to_fs(stem)
    for suffix, data in ((".contact.png", encode_image(canvas / 255.0)), (".contact.html", page.encode())):
        with atomic_write(fs, base + suffix) as f:
            f.write(data)
    return [stem + ".contact.png", stem + ".contact.html"]


def thumbnail(data: bytes) -> np.ndarray:
    """Encoded image -> uint8 RGB at THUMB_HEIGHT."""
    rgb, _ = decode_image(data)
    width = max(1, round(rgb.shape[1] * THUMB_HEIGHT / rgb.shape[0]))
    return (cv2.resize(rgb, (width, THUMB_HEIGHT), interpolation=cv2.INTER_AREA) * 255 + 0.5).astype(np.uint8)


def _data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_image(rgb / 255.0)).decode()
