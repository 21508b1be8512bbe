"""serving.archive without Ray: listing, screening, reading and writing real tar, zip and folder
archives built here, hostile ones included."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from skimage import data

from serving.archive import ArchiveConfig, ArchiveError, Parts, restore_archive
from serving.archive.members import UNREADABLE, check_paths, list_members, read_members
from serving.archive.outputs import write_output

ROOT = Path(__file__).resolve().parents[1]
SCREENING = ArchiveConfig(input="in", output="out").screening()
PIXELS = data.astronaut().tobytes()[:400_000]  # compressible, but not trivially: corruption shows


def add_tar(tar: tarfile.TarFile, name: str, payload: bytes, **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload))


def corrupt_middle(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(range(64))
    path.write_bytes(bytes(raw))


def test_members_imports_neither_ray_nor_torch():
    code = "import sys, serving.archive.members; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "'fsspec'" in loaded
    for heavy in ("ray", "torch", "numpy", "pydantic", "pyarrow", "cv2"):
        assert f"'{heavy}'" not in loaded, heavy


# ---------------------------------------------------------------------------------------------
# Corrupt members fail alone


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_a_corrupt_zip_member_fails_alone(tmp_path, method):
    path = tmp_path / "in.zip"
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr("corrupt.png", PIXELS)
        zf.writestr("fine.png", b"fine" * 100)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 4 : len(raw) // 4 + 64] = bytes(range(64))  # inside corrupt.png's compressed data
    path.write_bytes(bytes(raw))
    members = list_members(str(path), "zip", SCREENING).members
    assert [(m.name, m.reason) for m in members] == [("corrupt.png", None), ("fine.png", None)]
    corrupt, fine = read_members(str(path), "zip", members, SCREENING)
    assert (corrupt.data, corrupt.reason) == (None, UNREADABLE)
    # the codec's own error: zlib's (or the CRC that catches what inflates), bz2's, lzma's
    assert corrupt.error.split(":")[0] in {"BadZipFile", "error", "OSError", "LZMAError"}, corrupt.error
    assert (fine.data, fine.reason, fine.error) == (b"fine" * 100, None, None)


@pytest.mark.parametrize("kind", ["tar.gz", "tar.bz2", "tar.xz"])
def test_a_corrupt_compressed_tar_fails_the_member_it_is_found_in(tmp_path, kind):
    path = tmp_path / f"in.{kind}"
    options = {} if kind == "tar.xz" else dict(compresslevel=1)  # several bz2 blocks
    with tarfile.open(path, f"w:{kind.split('.')[1]}", **options) as tar:
        add_tar(tar, "first.png", b"first" * 100)
        add_tar(tar, "pixels.png", PIXELS)
        add_tar(tar, "last.png", b"last" * 100)
    corrupt_middle(path)
    members = list_members(str(path), kind, SCREENING).members
    first, pixels = members  # the stream is not read past the corruption
    assert (first.name, first.reason, first.error) == ("first.png", None, None)
    assert (pixels.name, pixels.reason) == ("pixels.png", UNREADABLE)
    assert "the archive is not read past it" in pixels.error
    (read,) = read_members(str(path), kind, [first], SCREENING)
    assert read.data == b"first" * 100


def test_a_short_read_fails_the_member(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x" * 1000)
    members = list_members(str(tmp_path / "in"), "folder", SCREENING).members
    (tmp_path / "in" / "a.png").write_bytes(b"x" * 10)  # shrank (or a remote read was cut short)
    (read,) = read_members(str(tmp_path / "in"), "folder", members, SCREENING)
    assert (read.data, read.reason, read.error) == (
        None,
        UNREADABLE,
        "TruncatedMemberError: short read: 10 of 1,000 bytes",
    )


# ---------------------------------------------------------------------------------------------
# Output path collisions


def test_output_path_collisions_are_refused_per_member(tmp_path):
    path = tmp_path / "in.tar"
    with tarfile.open(path, "w") as tar:
        for name in (
            "a.png",
            "a.png/b.png",  # its folder would be a.png, a file
            "dir/x.png",
            "dir.png/../dir",  # refused for its name, claims nothing
            "Dir/X.PNG",  # a.png's case twin on a case-insensitive target
            "./dir//x.png",  # dir/x.png once normalised
            "n\u0303.png",  # ñ decomposed (NFD, as macOS writes it)
            "\u00f1.png",  # ñ composed (NFC)
            "deep/c.png",
            "deep",  # a file where deep/c.png needs a folder: not an image, claims nothing
            "deep.jpg/c.png",
            "deep.jpg",
        ):
            add_tar(tar, name, b"x")
    reasons = {m.ordinal: m.reason for m in list_members(str(path), "tar", SCREENING).members}
    assert reasons == {
        0: None,
        1: "output path lies under member 0's file (a.png)",
        2: None,
        3: "path traversal ('..')",
        4: "same output path as member 2 (dir/x.png) once normalised",
        5: "duplicate name (member 2 has it)",
        6: None,
        7: "same output path as member 6 (n\u0303.png) once normalised",
        8: None,
        9: reasons[9],
        10: None,
        11: "output path is the folder of member 10 (deep.jpg/c.png)",
    }
    assert reasons[9].startswith("not a restorable image type")
    case_sensitive = ArchiveConfig(input="in", output="out", case_insensitive_names=False).screening()
    assert list_members(str(path), "tar", case_sensitive).members[4].reason is None


# ---------------------------------------------------------------------------------------------
# Metadata is checked before it is read into memory


@pytest.mark.parametrize("form", ["pax", "gnu"])
def test_a_tar_extension_header_over_the_limit_refuses_the_archive_before_it_is_read(tmp_path, form):
    path = tmp_path / "in.tar.gz"
    big = 8 << 20  # compresses to a few KiB
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT if form == "pax" else tarfile.GNU_FORMAT) as tar:
        add_tar(tar, "fine.png", b"x")
        if form == "pax":
            add_tar(tar, "b.png", b"x", pax_headers={"comment": "x" * big})
        else:
            add_tar(tar, "n" * big + ".png", b"x")  # a GNU long name
    assert path.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError, match="over max_tar_header_bytes = 65,536"):
            list_members(str(path), "tar.gz", SCREENING)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < big // 4  # the header was never read whole
    roomy = ArchiveConfig(input="in", output="out", max_tar_header_bytes=2 * big).screening()
    assert len(list_members(str(path), "tar.gz", roomy).members) == 2


def test_a_zip_is_refused_from_its_end_record_before_its_directory_is_read(tmp_path, monkeypatch):
    path = tmp_path / "in.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(200):
            zf.writestr(f"{i:03}-{'n' * 100}.png", b"x")

    def directory_read(self):
        raise AssertionError("the central directory was read")

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", directory_read)
    few = ArchiveConfig(input="in", output="out", max_members=100).screening()
    with pytest.raises(ArchiveError, match="more than max_members = 100 entries"):
        list_members(str(path), "zip", few)
    small = ArchiveConfig(input="in", output="out", max_zip_directory_bytes=10_000).screening()
    with pytest.raises(ArchiveError, match=r"central directory holds [\d,]+ bytes, over max_zip_directory_bytes"):
        list_members(str(path), "zip", small)


# ---------------------------------------------------------------------------------------------
# Outputs: folders swapped in whole, never over their input


def test_a_folder_output_is_swapped_in_whole(tmp_path, monkeypatch):
    parts = Parts(str(tmp_path / "out.parts"))
    parts.fs.makedirs(f"{parts.root}/files")
    for ordinal in range(2):
        parts.fs.pipe_file(parts.file(ordinal), f"new {ordinal}".encode())
    members = list_members(str(_folder(tmp_path / "in", ["a.png", "sub/b.png"])), "folder", SCREENING).members
    restored = [(m, parts.file(m.ordinal)) for m in members]
    out = _folder(tmp_path / "out", ["old.png"])
    (tmp_path / ".out.writing-0123").mkdir()  # left by a killed run

    copy = parts.fs.cp_file
    monkeypatch.setattr(parts.fs, "cp_file", lambda src, dst: copy(src, dst) if "a.png" in dst else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_output(parts.fs, str(out), "folder", restored, parts)
    assert _files(out) == {"old.png": b"old"}  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "out.parts"]  # no temporary folder left

    monkeypatch.setattr(parts.fs, "cp_file", copy)
    write_output(parts.fs, str(out), "folder", restored, parts)
    assert _files(out) == {"a.png": b"new 0", "sub/b.png": b"new 1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out", "out.parts"]


def test_an_output_containing_its_input_is_refused_before_anything_is_deleted(tmp_path):
    out = _folder(tmp_path / "out", ["old.png"])
    src = _folder(out / "photos", ["a.png"])
    with pytest.raises(ArchiveError, match="contains the input"):
        restore_archive(ArchiveConfig(input=str(src), output=str(out), model=str(tmp_path), overwrite=True))
    assert _files(out) == {"old.png": b"old", "photos/a.png": b"old"}
    (tmp_path / "photos.tar").write_bytes(b"")
    with pytest.raises(ArchiveError, match="contains the input"):
        check_paths(str(tmp_path / "photos.tar"), str(tmp_path / "sub" / ".." / "photos.tar"))  # the same file
    work = _folder(tmp_path / "x.parts", ["a.png"])  # the work folder of output x, removed by --overwrite
    with pytest.raises(ArchiveError, match="the work folder .* contains the input"):
        check_paths(str(work), str(tmp_path / "x"))
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(ArchiveError, match="lies inside the input"):
        check_paths(str(tmp_path / "link"), str(out / "restored"))


def _folder(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"old")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
