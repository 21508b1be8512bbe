"""serving.archive: archives of real photos restored on a real local Ray by the tiny reference
model, hostile archives built with tarfile/zipfile, and a run interrupted part-way then resumed.
Listing, screening and reading alone (no Ray): tests/test_archive_members.py."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from skimage import data

from diffbir.image_io import decode_image, encode_image
from diffbir.pipeline import RestorationPipeline, name_seed
from serving.archive import ArchiveConfig, ArchiveError, Parts, restore_archive
from serving.archive.job import ARCHIVE_MEMBER_SCHEMA, ArchiveRestorer, main
from serving.archive.members import UNREADABLE, archive_kind, list_members, read_members, safe_path
from serving.archive.outputs import THUMB_HEIGHT, thumbnail, write_output
from training import registry

from conftest import new_run, save_tiny

ARCHIVE_YAML = Path(__file__).resolve().parents[1] / "serving" / "configs" / "archive.yaml"
FAST = dict(task="denoise", min_side=64, steps=2, batch_size=4, contact_sheet=2)
# real photos at sizes the tiny model restores in a fraction of a second; each a different size
PHOTOS = {
    "album/astronaut.png": (data.astronaut, 96, 64),
    "coffee.jpg": (data.coffee, 80, 64),
    "album/sub/chelsea.png": (data.chelsea, 64, 72),
}
BESIDE = (".manifest.parquet", ".manifest.csv", ".contact.png", ".contact.html")  # written beside the output


def photo_bytes(name: str) -> bytes:
    make, w, h = PHOTOS[name]
    rgb = cv2.resize(make(), (w, h), interpolation=cv2.INTER_AREA)
    _, buf = cv2.imencode(Path(name).suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return buf.tobytes()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost nothing: a decompression bomb's header."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def add_tar(tar: tarfile.TarFile, name: str, payload: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload) if info.isreg() else None)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def decoded(payload: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)


def manifest(stem: Path) -> dict[str, dict]:
    """Rows by path (the first of duplicate names), after checking the CSV says what the parquet says."""
    rows = pq.read_table(f"{stem}.manifest.parquet").to_pylist()
    csv_rows = pcsv.read_csv(f"{stem}.manifest.csv").to_pylist()
    assert [(r["path"], r["status"], r["seed"]) for r in csv_rows] == [
        (r["path"], r["status"], r["seed"]) for r in rows
    ]
    by_path: dict[str, dict] = {}
    for row in rows:
        by_path.setdefault(row["path"], row)
    return by_path


def assert_restored(row: dict, name: str, payload: bytes, model_uri: str, base_seed: int = 231) -> None:
    """A restored member: its row and its output bytes, a valid image of the input's size."""
    _, w, h = PHOTOS[name]
    assert (row["status"], row["output"], row["reason"], row["error"]) == ("restored", name, None, None)
    assert row["model_uri"] == model_uri and json.loads(row["options"])["steps"] == 2
    assert row["seed"] == name_seed(name, base_seed) and (row["width"], row["height"]) == (w, h)
    assert row["restore_s"] > 0 and row["run_id"]
    image = decoded(payload)
    assert image.shape == (h, w, 3) and image.dtype == np.uint8
    assert payload.startswith(b"\x89PNG" if name.endswith(".png") else b"\xff\xd8")  # the input's format


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_bundle) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", tiny_bundle)


# ---------------------------------------------------------------------------------------------
# Names, listings and reads (no Ray)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a/b.png", ("a/b.png", None)),
        ("./a//b.png", ("a/b.png", None)),
        ("../x.png", (None, "path traversal ('..')")),
        ("a/../../x.png", (None, "path traversal ('..')")),
        ("/etc/x.png", (None, "absolute path")),
        ("C:\\Windows\\x.png", (None, "absolute path")),
        ("..\\x.png", (None, "path traversal ('..')")),
        ("a\nb.png", (None, "control characters in the name")),
        ("./", (None, "empty name")),
    ],
)
def test_safe_path(name, expected):
    assert safe_path(name) == expected


def test_seeds_depend_on_the_path_only():
    assert name_seed("a/b.png", 1) == name_seed("a/b.png", 1) != name_seed("a/c.png", 1)
    assert name_seed("a/b.png", 2) == (name_seed("a/b.png", 1) + 1) % 2**32


def test_zip_bombs_are_refused_from_declared_sizes(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", b"\0" * 1000)
        zf.writestr("bomb.png", b"\0" * (8 << 20))  # 8 MiB that deflates to a few KiB
        zf.writestr("fill1.png", b"\0" * 600_000)
        zf.writestr("fill2.png", b"\0" * 600_000)
    assert path.stat().st_size < 100_000
    cfg = ArchiveConfig(input=str(path), output="o.zip", max_member_bytes=1 << 20, max_total_bytes=(8 << 20) + 700_000)
    reasons = {m.name: m.reason for m in list_members(str(path), "zip", cfg.screening()).members}
    assert reasons["ok.png"] is None and reasons["fill1.png"] is None
    assert reasons["bomb.png"] == f"declares {8 << 20:,} bytes, over max_member_bytes = {1 << 20:,}"
    assert reasons["fill2.png"].startswith("the archive declares more than max_total_bytes")
    with pytest.raises(ArchiveError, match="more than max_members = 3 entries"):
        list_members(str(path), "zip", cfg.model_copy(update=dict(max_members=3)).screening())


@pytest.mark.parametrize("suffix, kind", [(".tar.gz", "tar.gz"), (".tbz2", "tar.bz2"), (".tar.xz", "tar.xz")])
def test_a_compressed_tar_is_not_read_past_the_total_limit_and_written_back(tmp_path, suffix, kind):
    path = tmp_path / f"big{suffix}"
    with tarfile.open(path, f"w:{kind.split('.')[1]}") as tar:
        for i in range(3):
            add_tar(tar, f"{i}.png", b"\0" * 600_000)
    url = path.as_uri()  # inputs are fsspec URLs
    assert archive_kind(url, is_dir=False) == kind
    screening = ArchiveConfig(input=url, output=f"o{suffix}", max_total_bytes=1_000_000).screening()
    members = list_members(url, kind, screening).members
    assert [(m.name, m.reason is None) for m in members] == [("0.png", True), ("1.png", False)]  # 2.png never read
    assert members[1].reason.startswith("the archive declares more than max_total_bytes")
    ((member, payload, reason, error, _),) = read_members(url, kind, members[:1], screening)
    assert (member.name, payload, reason, error) == ("0.png", b"\0" * 600_000, None, None)

    parts = Parts(str(tmp_path / "o.parts"))
    parts.fs.makedirs(parts.root)
    parts.fs.pipe_file(f"{parts.root}/restored-0", b"restored bytes")
    out = tmp_path / f"o{suffix}"
    write_output(parts.fs, str(out), kind, [(member, f"{parts.root}/restored-0")], parts)
    with tarfile.open(out, f"r:{kind.split('.')[1]}") as tar:  # really compressed the same way
        assert [(m.name, tar.extractfile(m).read()) for m in tar] == [("0.png", b"restored bytes")]


def test_an_uncompressed_tar_is_read_from_any_member(tmp_path):
    """Read tasks of a plain tar seek to their first member, long (pax) names included."""
    path = tmp_path / "a.tar"
    names = ["a.png", "deep/" + "n" * 150 + ".png", "c.png"]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, name in enumerate(names):
            add_tar(tar, name, bytes([i]) * (700 + i))
    screening = ArchiveConfig(input=str(path), output="o.tar").screening()
    members = list_members(str(path), "tar", screening).members
    for start in range(3):
        got = [(r.member.name, r.data, r.reason) for r in read_members(str(path), "tar", members[start:], screening)]
        assert got == [(name, bytes([i]) * (700 + i), None) for i, name in enumerate(names)][start:]


def test_reads_never_take_more_than_declared(tmp_path):
    # a folder file that grows after it was listed
    (tmp_path / "in").mkdir()
    grows = tmp_path / "in" / "grows.png"
    grows.write_bytes(b"x" * 100)
    screening = ArchiveConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")).screening()
    members = list_members(str(tmp_path / "in"), "folder", screening).members
    grows.write_bytes(b"x" * 10_000_000)
    ((_, payload, reason, error, _),) = read_members(str(tmp_path / "in"), "folder", members, screening)
    assert (payload, reason, error) == (None, "unreadable: holds more than its declared 100 bytes", None)  # skipped

    # a zip entry whose headers declare 10 bytes for 1000: zipfile stops at 10, the CRC fails
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(lying, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", os.urandom(1000))
    raw = bytearray(lying.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, 10)  # uncompressed size in the local header
    struct.pack_into("<I", raw, central + 24, 10)  # and in the central directory
    lying.write_bytes(bytes(raw))
    members = list_members(str(lying), "zip", screening).members
    assert [(m.name, m.size, m.reason) for m in members] == [("a.png", 10, None)]
    ((_, payload, reason, error, _),) = read_members(str(lying), "zip", members, screening)
    assert payload is None and reason.startswith("unreadable") and error.startswith("BadZipFile: Bad CRC-32")


def test_encrypted_zip_entries_are_refused(tmp_path):
    path = tmp_path / "secret.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("secret.png", b"not really encrypted")
    raw = bytearray(path.read_bytes())
    for offset in (raw.find(b"PK\x03\x04") + 6, raw.find(b"PK\x01\x02") + 8):  # the flag bits
        raw[offset] |= 0x1
    path.write_bytes(bytes(raw))
    (member,) = list_members(str(path), "zip", ArchiveConfig(input=str(path), output="o.zip").screening()).members
    assert member.reason == "encrypted"


def test_refusals_before_any_work(tmp_path, model_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in.tar").write_bytes(b"")
    with pytest.raises(ArchiveError, match="must be a tar like the input"):
        restore_archive(
            ArchiveConfig(input=str(tmp_path / "in.tar"), output=str(tmp_path / "o.zip"), model=str(model_dir))
        )
    with pytest.raises(ArchiveError, match="lies inside the input"):
        restore_archive(
            ArchiveConfig(input=str(tmp_path / "in"), output=str(tmp_path / "in" / "out"), model=str(model_dir))
        )
    with pytest.raises(ArchiveError, match="not a folder nor a"):
        restore_archive(
            ArchiveConfig(input=str(model_dir / "model.json"), output=str(tmp_path / "o"), model=str(model_dir))
        )
    with pytest.raises(ArchiveError, match="cannot read it as a tar"):
        (tmp_path / "junk.tar").write_bytes(os.urandom(3000))
        restore_archive(
            ArchiveConfig(input=str(tmp_path / "junk.tar"), output=str(tmp_path / "o.tar"), model=str(model_dir))
        )
    assert files_under(tmp_path) == {"in.tar", "junk.tar"}


# ---------------------------------------------------------------------------------------------
# Whole runs on Ray


@pytest.fixture(scope="module")
def photos_tar_gz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "photos.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add_tar(tar, "album", type=tarfile.DIRTYPE)  # directories give no row
        for name in PHOTOS:
            add_tar(tar, name, photo_bytes(name), mtime=1_600_000_000)
    return path


@pytest.fixture(scope="module")
def fresh_tar_gz(tmp_path_factory, photos_tar_gz, model_dir) -> tuple[Path, dict]:
    """One uninterrupted run over photos.tar.gz: (output, summary)."""
    out = tmp_path_factory.mktemp("fresh") / "restored.tar.gz"
    summary = restore_archive(ArchiveConfig(input=str(photos_tar_gz), output=str(out), model=str(model_dir), **FAST))
    return out, summary


def test_tar_gz_to_tar_gz(fresh_tar_gz, model_dir):
    out, summary = fresh_tar_gz
    stem = out.parent / "restored"
    members = tar_members(out)
    assert list(members) == list(PHOTOS)  # archive order, relative paths kept
    rows = manifest(stem)
    assert list(rows) == list(PHOTOS)
    for name, payload in members.items():
        assert_restored(rows[name], name, payload, str(model_dir))
    assert {
        k: summary[k] for k in ("members", "restored", "skipped", "failed", "resumed", "restored_this_run")
    } == dict(members=3, restored=3, skipped=0, failed=0, resumed=0, restored_this_run=3)
    assert summary["images_per_s"] > 0
    # beside the output: manifest and contact sheet of the first 2 members; the parts are gone
    assert files_under(out.parent) == {f"restored{s}" for s in (".tar.gz", *BESIDE)}
    sheet = decoded((out.parent / "restored.contact.png").read_bytes())
    assert sheet.shape[0] == 40 + 2 * (THUMB_HEIGHT + 30)
    page = (out.parent / "restored.contact.html").read_text()
    assert "album/astronaut.png" in page and "coffee.jpg" in page and "chelsea" not in page
    uris = re.findall(r"<img src='data:image/png;base64,([^']+)'>", page)
    assert len(uris) == 6  # input | stage 1 | final per member
    # the stage-1 column is what the pipeline's stage 1 made of the input, with the member's seed and options
    pipe = RestorationPipeline.from_pretrained(str(model_dir), "cpu", "fp32")
    for row, name in enumerate(("album/astronaut.png", "coffee.jpg")):
        image, _ = decode_image(photo_bytes(name))
        opts = (
            ArchiveConfig(input="x", output="y", model="m", **FAST)
            .options()
            .model_copy(update={"seed": name_seed(name, 231)})
        )
        expected = thumbnail(encode_image(pipe.stage1_image(image, opts)))
        shown = decoded(base64.b64decode(uris[3 * row + 1]))[..., ::-1]  # BGR -> RGB
        assert np.abs(shown.astype(int) - expected).max() <= 1, name
        final = decoded(base64.b64decode(uris[3 * row + 2]))[..., ::-1]
        assert np.abs(final.astype(int) - expected).mean() > 2  # a column of its own, not the final image


def test_hostile_tar(tmp_path, model_dir):
    good = photo_bytes("coffee.jpg")
    path = tmp_path / "in" / "hostile.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        add_tar(tar, "album/astronaut.png", photo_bytes("album/astronaut.png"))
        add_tar(tar, "coffee.jpg", good)
        add_tar(tar, "../evil.png", good)
        add_tar(tar, str(tmp_path / "absolute.png"), good)
        add_tar(tar, "link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add_tar(tar, "hard.png", type=tarfile.LNKTYPE, linkname="coffee.jpg")
        add_tar(tar, "dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add_tar(tar, "coffee.jpg", photo_bytes("album/astronaut.png"))  # a second member of the same name
        add_tar(tar, "notes.txt", b"hello")
        add_tar(tar, "huge.png", b"\0" * 300_000)
        add_tar(tar, "bomb.png", png_header(2000, 2000))
        add_tar(tar, "broken.png", b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    out = tmp_path / "out" / "restored.tar"
    cfg = ArchiveConfig(
        input=str(path), output=str(out), model=str(model_dir), max_member_bytes=200_000, max_pixels=1_000_000, **FAST
    )
    summary = restore_archive(cfg)

    members = tar_members(out)
    assert list(members) == ["album/astronaut.png", "coffee.jpg"]
    rows = manifest(tmp_path / "out" / "restored")
    for name, payload in members.items():
        assert_restored(rows[name], name, payload, str(model_dir))
    assert decoded(members["coffee.jpg"]).shape == (64, 80, 3)  # the first coffee.jpg, not the duplicate
    skipped = {path: row["reason"] for path, row in rows.items() if row["status"] == "skipped"}
    assert skipped == {
        "../evil.png": "path traversal ('..')",
        str(tmp_path / "absolute.png"): "absolute path",
        "link.png": "symbolic link",
        "hard.png": "hard link",
        "dev.png": "special file (device or FIFO)",
        "notes.txt": "not a restorable image type (suffix not one of .png .jpg .jpeg .webp .tif .tiff)",
        "huge.png": "declares 300,000 bytes, over max_member_bytes = 200,000",
        "bomb.png": "bomb.png: 2000x2000 = 4,000,000 pixels exceeds the limit of 1,000,000",
        "broken.png": skipped["broken.png"],
    }
    assert skipped["broken.png"].startswith("broken.png: not a readable image")
    # the duplicate has the first one's path: the manifest holds both rows
    table = pq.read_table(tmp_path / "out" / "restored.manifest.parquet").to_pylist()
    assert [r["status"] for r in table if r["path"] == "coffee.jpg"] == ["restored", "skipped"]
    assert [r["reason"] for r in table if r["path"] == "coffee.jpg"][1] == "duplicate name (member 1 has it)"
    assert (summary["members"], summary["restored"], summary["skipped"], summary["failed"]) == (12, 2, 10, 0)
    assert files_under(tmp_path) == {"in/hostile.tar"} | {f"out/restored{s}" for s in (".tar", *BESIDE)}


def test_zip_from_the_registry_through_the_cli(tmp_path, mlflow_store, model_dir, capsys):
    """A zip with hostile members, the model named by a registry alias, run as the CLI runs."""
    version = registry.register_model(new_run(), model_dir, "diffbir-archive")
    registry.set_alias("diffbir-archive", "champion", version)
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("album/astronaut.png", photo_bytes("album/astronaut.png"))
        zf.writestr("album/sub/chelsea.png", photo_bytes("album/sub/chelsea.png"))
        zf.writestr("../../evil.png", photo_bytes("coffee.jpg"))
        zf.writestr("/etc/evil.png", photo_bytes("coffee.jpg"))
        zf.writestr("C:\\Windows\\evil.png", photo_bytes("coffee.jpg"))
        zf.writestr("bomb.png", b"\0" * (4 << 20))
        link = zipfile.ZipInfo("link.png")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("album/astronaut.png", b"second")
    out = tmp_path / "restored.zip"
    argv = [
        "--config",
        str(ARCHIVE_YAML),
        "--input",
        str(path),
        "--output",
        str(out),
        "--model",
        "models:/diffbir-archive@champion",
        "--tracking-dir",
        str(mlflow_store / "store"),
        "--max-member-bytes",
        str(1 << 20),
    ]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    pinned = f"models:/diffbir-archive/{version}"
    assert (summary["model_uri"], summary["model_version"], summary["restored"], summary["skipped"]) == (
        pinned,
        version,
        2,
        6,
    )

    with zipfile.ZipFile(out) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    assert list(members) == ["album/astronaut.png", "album/sub/chelsea.png"]
    rows = manifest(tmp_path / "restored")
    for name, payload in members.items():
        assert_restored(rows[name], name, payload, pinned)
        assert rows[name]["model_version"] == version
    reasons = {p: r["reason"] for p, r in rows.items() if r["status"] == "skipped"}
    assert reasons["../../evil.png"] == "path traversal ('..')"
    assert reasons["/etc/evil.png"] == reasons["C:\\Windows\\evil.png"] == "absolute path"
    assert reasons["bomb.png"] == f"declares {4 << 20:,} bytes, over max_member_bytes = {1 << 20:,}"
    assert reasons["link.png"] == "symbolic link"
    assert files_under(tmp_path) == {"photos.zip"} | {f"restored{s}" for s in (".zip", *BESIDE)}


def test_folder_to_folder(tmp_path, model_dir):
    src = tmp_path / "in"
    (src / "album" / "sub").mkdir(parents=True)
    (src / "album" / "astronaut.png").write_bytes(photo_bytes("album/astronaut.png"))
    gray16 = cv2.resize(data.camera(), (72, 64)).astype(np.uint16) * 257
    (src / "album" / "sub" / "camera16.png").write_bytes(cv2.imencode(".png", gray16)[1].tobytes())
    (src / "evil.png").symlink_to("/etc/passwd")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(photo_bytes("coffee.jpg"))
    (src / "linked").symlink_to(outside, target_is_directory=True)
    out = tmp_path / "restored"
    summary = restore_archive(ArchiveConfig(input=str(src), output=str(out), model=str(model_dir), **FAST))

    assert files_under(out) == {"album/astronaut.png", "album/sub/camera16.png"}
    rows = manifest(tmp_path / "restored")
    assert_restored(
        rows["album/astronaut.png"], "album/astronaut.png", (out / "album/astronaut.png").read_bytes(), str(model_dir)
    )
    camera = decoded((out / "album/sub/camera16.png").read_bytes())
    assert camera.shape == (64, 72) and camera.dtype == np.uint16  # gray 16-bit stays gray 16-bit
    skipped = {p: r["reason"] for p, r in rows.items() if r["status"] == "skipped"}
    assert skipped == {"evil.png": "symbolic link", "linked": "symbolic link"}
    assert summary["restored"] == 2
    inputs = {"in/album/astronaut.png", "in/album/sub/camera16.png", "in/evil.png", "in/linked", "outside/x.png"}
    assert files_under(tmp_path) == inputs | {f"restored{s}" for s in BESIDE} | {
        f"restored/{p}" for p in files_under(out)
    }


def test_an_interrupted_run_resumes_without_recomputing(tmp_path, photos_tar_gz, fresh_tar_gz, model_dir, monkeypatch):
    out = tmp_path / "restored.tar.gz"
    cfg = ArchiveConfig(input=str(photos_tar_gz), output=str(out), model=str(model_dir), **FAST | dict(batch_size=1))
    save = Parts.save
    saved = []

    def crash_after_first_block(self, rows, stamp):
        if saved:
            raise KeyboardInterrupt("simulated crash")
        saved.append([row["ordinal"] for row in rows])
        save(self, rows, stamp)

    monkeypatch.setattr(Parts, "save", crash_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        restore_archive(cfg)
    monkeypatch.setattr(Parts, "save", save)
    parts = tmp_path / "restored.parts"
    assert not out.exists() and len(saved) == 1
    done = {p.name: p.stat().st_mtime_ns for p in (parts / "files").iterdir()}
    assert len(done) == 1

    # a rerun with other options would mix results: refused
    with pytest.raises(ArchiveError, match="another options"):
        restore_archive(cfg.model_copy(update=dict(steps=3)))

    summary = restore_archive(cfg.model_copy(update=dict(keep_parts=True)))
    assert (summary["resumed"], summary["restored_this_run"], summary["restored"]) == (1, 2, 3)
    assert {p.name: p.stat().st_mtime_ns for p in (parts / "files").iterdir() if p.name in done} == done  # not redone
    rows = manifest(tmp_path / "restored")
    first_run = {r["run_id"] for r in rows.values()} - {summary["run_id"]}
    assert len(first_run) == 1 and sum(r["run_id"] in first_run for r in rows.values()) == 1

    # every member exactly once, and the same images a fresh run made (the same seeds)
    resumed, fresh = tar_members(out), tar_members(fresh_tar_gz[0])
    assert list(resumed) == list(fresh) == list(PHOTOS)
    for name in PHOTOS:
        assert rows[name]["seed"] == name_seed(name, 231)
        diff = np.abs(decoded(resumed[name]).astype(int) - decoded(fresh[name]).astype(int))
        # batch size 1 vs 4: float rounding at most, which JPEG's requantisation turns into a few levels
        assert diff.max() <= (1 if name.endswith(".png") else 8) and diff.mean() < 0.5, (name, diff.max(), diff.mean())


# ---------------------------------------------------------------------------------------------
# Failures and limits that must not stop a run


def test_a_corrupt_member_fails_alone_and_the_rerun_goes_through(tmp_path, model_dir):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("broken.png", data.astronaut().tobytes()[:400_000])
        zf.writestr("album/astronaut.png", photo_bytes("album/astronaut.png"))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 4 : len(raw) // 4 + 64] = bytes(range(64))  # inside broken.png's deflated data
    path.write_bytes(bytes(raw))
    cfg = ArchiveConfig(
        input=str(path), output=str(tmp_path / "out.zip"), model=str(model_dir), keep_parts=True, **FAST
    )
    first = restore_archive(cfg)
    assert (first["restored"], first["failed"]) == (1, 1)
    rerun = restore_archive(cfg)  # retries the failed member, which fails alone again
    assert (rerun["restored"], rerun["failed"], rerun["resumed"], rerun["restored_this_run"]) == (1, 1, 1, 0)
    rows = manifest(tmp_path / "out")
    assert (rows["broken.png"]["status"], rows["broken.png"]["reason"]) == ("failed", UNREADABLE)
    assert rows["broken.png"]["error"].startswith(("BadZipFile", "error")) and rows["broken.png"]["output"] is None
    with zipfile.ZipFile(tmp_path / "out.zip") as zf:
        assert zf.namelist() == ["album/astronaut.png"]


def test_the_working_canvas_is_limited_after_upscale(model_dir):
    small, big = (encode_image(np.full((h, w, 3), 0.5, np.float32)) for h, w in ((48, 64), (150, 200)))
    limits = dict(max_pixels=50_000, max_working_pixels=50_000, jpeg_quality=95, dtype="fp32")
    restorer = ArchiveRestorer(
        model_uri=str(model_dir),
        tracking_uri="",
        cache_dir=None,
        options=dict(task="denoise", upscale=2, min_side=64, steps=2),
        cfg=ArchiveConfig(input="in.tar", output="out.tar", **limits).model_dump(),
        contact=[],
    )
    batch = [(0, "small.png", small), (1, "big.png", big)]  # 30,000 input pixels: under max_pixels
    rows = [dict(ordinal=o, path=p, data=d, reason=None, error=None, read_s=0.0) for o, p, d in batch]
    results = restorer(pa.Table.from_pylist(rows, schema=ARCHIVE_MEMBER_SCHEMA)).to_pylist()
    small_row, big_row = sorted(results, key=lambda row: row["ordinal"])
    assert (small_row["status"], small_row["width"], small_row["height"]) == ("restored", 128, 96)
    assert (big_row["status"], big_row["data"]) == ("skipped", None)
    assert big_row["reason"] == (
        "big.png: restores on a 448x320 = 143,360 pixel canvas (upscale 2, min_side 64), "
        "over max_working_pixels = 50,000"
    )


def test_output_budget_and_fingerprint_on_resume(tmp_path, photos_tar_gz, fresh_tar_gz, model_dir):
    sizes = {name: len(payload) for name, payload in tar_members(fresh_tar_gz[0]).items()}
    first = "album/astronaut.png"
    budget = sizes[first] + min(sizes["coffee.jpg"], sizes["album/sub/chelsea.png"]) // 2
    out = tmp_path / "restored.tar.gz"
    cfg = ArchiveConfig(input=str(photos_tar_gz), output=str(out), model=str(model_dir), keep_parts=True, **FAST)
    summary = restore_archive(cfg.model_copy(update=dict(max_output_bytes=budget)))
    assert (summary["restored"], summary["skipped"]) == (1, 2)
    assert list(tar_members(out)) == [first]
    skipped = {p: r["reason"] for p, r in manifest(tmp_path / "restored").items() if r["status"] == "skipped"}
    assert skipped == dict.fromkeys(
        ["coffee.jpg", "album/sub/chelsea.png"], f"the run's restored output would pass max_output_bytes = {budget:,}"
    )

    # the parts belong to this content and these output options
    with pytest.raises(ArchiveError, match="another jpeg_quality"):
        restore_archive(cfg.model_copy(update=dict(jpeg_quality=80)))
    other = tmp_path / "same-names.tar.gz"
    with tarfile.open(photos_tar_gz) as src, tarfile.open(other, "w:gz") as dst:
        for info in src:  # the same names and sizes, other bytes (mtimes)
            info.mtime += 1
            dst.addfile(info, src.extractfile(info) if info.isreg() else None)
    with pytest.raises(ArchiveError, match="another content"):
        restore_archive(cfg.model_copy(update=dict(input=str(other))))

    # under another limit, what was skipped for it is retried; what was restored is kept
    kept = (tmp_path / "restored.parts" / "files" / "1").stat().st_mtime_ns
    summary = restore_archive(cfg)
    assert (summary["restored"], summary["resumed"], summary["restored_this_run"]) == (3, 1, 2)
    assert list(tar_members(out)) == list(PHOTOS)
    assert (tmp_path / "restored.parts" / "files" / "1").stat().st_mtime_ns == kept
