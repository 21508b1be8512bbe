"""Listing, screening and reading an archive's members: the standard library and fsspec only, so
it is testable (and usable) without Ray or torch.

Listing is one pass over the archive's metadata. Names and declared sizes decide what is refused,
output paths are checked for collisions, and a digest of the content the run depends on is taken
(for resuming). Reading never takes more bytes than a member declared; a member whose bytes cannot
be read (corrupt compressed data, a short read) fails alone.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import posixpath
import re
import tarfile
import time
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from typing import BinaryIO, NamedTuple

import fsspec

ARCHIVE_SUFFIXES = {  # longest first
    ".tar.gz": "tar.gz",
    ".tgz": "tar.gz",
    ".tar.bz2": "tar.bz2",
    ".tbz2": "tar.bz2",
    ".tar.xz": "tar.xz",
    ".txz": "tar.xz",
    ".tar": "tar",
    ".zip": "zip",
}
TAR_COMPRESSION = {"tar": "", "tar.gz": "gz", "tar.bz2": "bz2", "tar.xz": "xz"}  # tarfile's stream modes r|… and w|…
# the image suffixes written back (diffbir.image_io.WRITABLE_SUFFIXES, which imports cv2)
RESTORABLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
# what reading a member's bytes raises when they are corrupt or cut short: that member fails, the run goes on
READ_ERRORS = (
    OSError,  # bz2's "Invalid data stream", I/O errors of remote files
    EOFError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
    tarfile.TarError,
    zipfile.BadZipFile,
    NotImplementedError,  # an unsupported zip compression method
)
DECOMPRESSORS = {
    "tar.gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    "tar.bz2": bz2.BZ2File,
    "tar.xz": lzma.LZMAFile,
}
# tar entries whose data tarfile reads whole into memory as the next member's metadata
EXTENSION_HEADER_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
UNREADABLE = "unreadable: its data is corrupt or cut short (a rerun retries it)"
DIGEST_CHUNK = 1 << 20


class ArchiveError(Exception):
    """The run cannot go on: an unreadable or oversized archive, a mismatched rerun, unsafe paths."""


class MemberRefusedError(Exception):
    """One member cannot be used; the message is the manifest's reason."""


class TruncatedMemberError(EOFError):
    """A member gave fewer bytes than it declared: a short read, which a rerun may not repeat."""


@dataclass(frozen=True)
class Screening:
    """The limits and rules a listing applies (ArchiveConfig.screening() fills them)."""

    max_member_bytes: int
    max_total_bytes: int
    max_members: int
    max_tar_header_bytes: int
    max_zip_directory_bytes: int
    case_insensitive_names: bool


@dataclass(frozen=True)
class Member:
    ordinal: int  # position among the archive's entries: how readers find it again
    name: str  # as stored
    size: int  # declared
    mtime: float = 0.0
    header_offset: int = 0  # tar: where its headers start (uncompressed tars are read from there)
    path: str | None = None  # the sanitised relative path, None when refused for its name
    reason: str | None = None  # why it is not restored; None: to restore
    error: str | None = None  # with a reason: its bytes could not be read (failed, not skipped)


@dataclass(frozen=True)
class Listing:
    members: list[Member]
    digest: str  # sha256 of the content the run depends on: the archive's bytes, a folder's members


class MemberRead(NamedTuple):
    member: Member
    data: bytes | None
    reason: str | None  # refused (skipped) or, with `error`, unreadable (failed)
    error: str | None
    seconds: float


# ---------------------------------------------------------------------------------------------
# Kinds, names and paths


def archive_kind(path: str, is_dir: bool) -> str:
    if is_dir:
        return "folder"
    kind = next((k for suffix, k in ARCHIVE_SUFFIXES.items() if path.lower().endswith(suffix)), None)
    if kind is None:
        raise ArchiveError(f"{path}: not a folder nor a {', '.join(ARCHIVE_SUFFIXES)} file")
    return kind


def output_stem(output: str, kind: str) -> str:
    """The output without its archive suffix: the work directory, manifest and contact sheet
    are named after it."""
    output = output.rstrip("/")
    if kind == "folder":
        return output
    suffix = next(s for s in ARCHIVE_SUFFIXES if output.lower().endswith(s))
    return output[: -len(suffix)]


def safe_path(name: str) -> tuple[str | None, str | None]:
    """(relative output path, None) for a member name, or (None, why it may be written nowhere)."""
    if any(ord(c) < 32 for c in name):
        return None, "control characters in the name"
    unix = name.replace("\\", "/")  # zip files made on Windows
    if unix.startswith("/") or re.match(r"[A-Za-z]:", unix):
        return None, "absolute path"
    parts = [p for p in unix.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "path traversal ('..')"
    return ("/".join(parts), None) if parts else (None, "empty name")


def check_paths(input_url: str, output_url: str) -> str:
    """The input's kind, once the output is known to be the same kind, and neither the output nor
    its work folder to contain the input or lie inside it (a replaced output must not take the
    input with it)."""
    in_fs, in_path = fsspec.core.url_to_fs(input_url)
    if not in_fs.exists(in_path):
        raise FileNotFoundError(f"{input_url}: no such file or folder")
    kind = archive_kind(in_path, in_fs.isdir(in_path))
    out_fs, out_path = fsspec.core.url_to_fs(output_url)
    out_kind = archive_kind(out_path, False) if out_path.lower().endswith(tuple(ARCHIVE_SUFFIXES)) else "folder"
    if out_kind != kind:
        raise ArchiveError(f"the output must be a {kind} like the input, not a {out_kind}: {output_url}")
    if _same_store(in_fs, out_fs):
        source = _real(in_fs, in_path)
        _, parts_path = fsspec.core.url_to_fs(output_stem(output_url, kind) + ".parts")
        for what, path in (("output", out_path), ("work folder", parts_path)):
            written = _real(out_fs, path)
            if _within(source, written):
                raise ArchiveError(f"the {what} {written} contains the input {source}; choose another output")
            if _within(written, source):
                raise ArchiveError(f"the {what} {written} lies inside the input {source}; choose another output")
    return kind


def _same_store(a: fsspec.AbstractFileSystem, b: fsspec.AbstractFileSystem) -> bool:
    return {a.protocol} == {b.protocol} if isinstance(a.protocol, str) else set(a.protocol) == set(b.protocol)


def _real(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The path with local symbolic links and '..' resolved (another name for the same folder must
    not slip past the containment check)."""
    path = path.rstrip("/")
    return os.path.realpath(path) if "file" in fs.protocol or "local" in fs.protocol else path


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


# ---------------------------------------------------------------------------------------------
# Listing


def list_members(url: str, kind: str, screening: Screening) -> Listing:
    """Every entry but directories, in archive order, each screened against the limits, with the
    digest of the content."""
    fs, root = fsspec.core.url_to_fs(url)
    listers = {"folder": _list_folder, "zip": _list_zip} | dict.fromkeys(TAR_COMPRESSION, _list_tar)
    hasher = hashlib.sha256()
    try:
        members = _screen(listers[kind](fs, root, kind, screening, hasher), screening)
        if kind == "folder":
            _digest_folder(fs, root, members, hasher)
        elif kind == "zip":
            with fs.open(root, "rb") as f:
                _digest_stream(f, hasher)
    except READ_ERRORS as e:
        raise ArchiveError(f"{url}: cannot read it as a {kind} ({type(e).__name__}: {e})") from e
    return Listing(members, hasher.hexdigest())


def _list_folder(fs, root: str, kind: str, screening: Screening, hasher) -> list[Member]:
    found = {}
    for _, _, files in fs.walk(root, detail=True):  # symlinked folders are not entered
        found |= {info["name"]: info for info in files.values()}
        _check_count(len(found), screening)  # before a huge folder is held in memory
    members = []
    for ordinal, (full, info) in enumerate(sorted(found.items())):
        reason = "symbolic link" if info.get("islink") else None if info["type"] == "file" else "not a regular file"
        name = posixpath.relpath(full, root)
        members.append(Member(ordinal, name, int(info.get("size") or 0), float(info.get("mtime") or 0), reason=reason))
    return members


def _digest_folder(fs, root: str, members: list[Member], hasher) -> None:
    """A folder has no bytes of its own: the digest covers the name, size and bytes of each member
    to restore."""
    for m in members:
        if m.reason is None:
            hasher.update(f"{m.name}\0{m.size}\0".encode())
            try:
                with fs.open(posixpath.join(root, m.name), "rb") as f:
                    _digest_stream(f, hasher)
            except READ_ERRORS as e:  # the member fails alone when it is read; the folder is still listed
                hasher.update(f"unreadable: {type(e).__name__}".encode())


def _digest_stream(f: BinaryIO, hasher) -> None:
    while chunk := f.read(DIGEST_CHUNK):
        hasher.update(chunk)


def _list_zip(fs, root: str, kind: str, screening: Screening, hasher) -> list[Member]:
    with fs.open(root, "rb") as f:
        _check_zip_directory(f, screening)
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    _check_count(len(infos), screening)  # the end record may understate it
    members = []
    for ordinal, info in enumerate(infos):
        if info.is_dir():
            continue
        mode = info.external_attr >> 16
        reason = "symbolic link" if mode & 0o170000 == 0o120000 else "encrypted" if info.flag_bits & 0x1 else None
        members.append(Member(ordinal, info.filename, info.file_size, _zip_mtime(info), reason=reason))
    return members


def _check_zip_directory(f: BinaryIO, screening: Screening) -> None:
    """Refuse a zip from its end record, before ZipFile reads the whole central directory into
    memory and makes an object per entry."""
    end = zipfile._EndRecData(f)  # the parser ZipFile itself uses (zip64 included)
    if end is None:
        raise zipfile.BadZipFile("no end of central directory record")
    _check_count(end[zipfile._ECD_ENTRIES_TOTAL], screening)
    if end[zipfile._ECD_SIZE] > screening.max_zip_directory_bytes:
        raise ArchiveError(
            f"the zip's central directory holds {end[zipfile._ECD_SIZE]:,} bytes, "
            f"over max_zip_directory_bytes = {screening.max_zip_directory_bytes:,}"
        )
    f.seek(0)


def _zip_mtime(info: zipfile.ZipInfo) -> float:
    try:
        return datetime(*info.date_time).timestamp()
    except ValueError:  # a nonsense date (month 0...) is no reason to refuse the image
        return 0.0


def _list_tar(fs, root: str, kind: str, screening: Screening, hasher) -> list[Member]:
    """A tar is read through once (as a stream: it may be compressed), hashed on the way. Corrupt
    data past the first entry fails the member it was found in (or, for a checksum checked at
    the end of the stream, the last one read), and the listing ends there."""
    members: list[Member] = []
    declared = 0
    with fs.open(root, "rb") as raw, _open_tar(_HashingReader(raw, hasher), kind, screening) as (tar, stream):
        entries = enumerate(_tar_entries(tar))
        try:
            for ordinal, info in entries:
                _check_count(ordinal + 1, screening)
                if info.isdir():
                    continue
                reason = _tar_reason(info)
                members.append(Member(ordinal, info.name, info.size, info.mtime, info.offset, reason=reason))
                declared += info.size
                if declared > screening.max_total_bytes:
                    return members  # reading on would decompress past the limit; _screen refuses this one for it
            while stream.read(DIGEST_CHUNK):  # to the end of the compressed stream, where its checksum is
                pass
        except READ_ERRORS as e:
            if not members:
                raise
            error = f"{type(e).__name__}: {e} (corrupt data at or after this member; the archive is not read past it)"
            members[-1] = replace(members[-1], reason=UNREADABLE, error=error)
    return members


def _tar_reason(info: tarfile.TarInfo) -> str | None:
    if info.isreg():
        return None
    if info.issym():
        return "symbolic link"
    return "hard link" if info.islnk() else "special file (device or FIFO)"


class _HashingReader:
    """A file object that feeds what is read through it to a hash (a tar's listing pass reads the
    whole archive anyway: its digest costs no extra read)."""

    def __init__(self, f: BinaryIO, hasher):
        self.f, self.hasher = f, hasher

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.hasher.update(data)
        return data


class _ScreenedTarInfo(tarfile.TarInfo):
    """tarfile reads a GNU long name or a pax header whole into memory before it looks at it: its
    size is checked first (a subclass per archive sets the limit). The extension headers of one
    member add up, so a chain of them is refused too."""

    max_header_bytes = 0

    def _proc_member(self, tar: tarfile.TarFile):
        if self.type not in EXTENSION_HEADER_TYPES:
            tar.extension_header_bytes = 0
            return super()._proc_member(tar)
        used = getattr(tar, "extension_header_bytes", 0) + self.size
        if used > self.max_header_bytes:
            raise ArchiveError(
                f"a tar extension header (long name or pax) of {used:,} bytes at offset {self.offset:,}, "
                f"over max_tar_header_bytes = {self.max_header_bytes:,}"
            )
        tar.extension_header_bytes = used
        return super()._proc_member(tar)


@contextlib.contextmanager
def _open_tar(f: BinaryIO, kind: str, screening: Screening) -> Iterator[tuple[tarfile.TarFile, BinaryIO]]:
    """(`f` as a tar read in one pass with screened extension headers, the uncompressed stream).
    The standard library's file classes decompress: unlike tarfile's own stream they check the
    compressed stream's checksums, so corrupt data that still inflates is caught at its end."""
    decompressed = DECOMPRESSORS[kind](f) if kind in DECOMPRESSORS else contextlib.nullcontext(f)
    info_class = type("ScreenedTarInfo", (_ScreenedTarInfo,), {"max_header_bytes": screening.max_tar_header_bytes})
    with decompressed as stream, tarfile.open(fileobj=stream, mode="r|", tarinfo=info_class) as tar:
        yield tar, stream


def _tar_entries(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The entries of a tar opened in stream mode, each forgotten once read (tarfile keeps every
    header it has read: a big archive would fill memory)."""
    while (info := tar.next()) is not None:
        tar.members.clear()
        yield info


def _check_count(entries: int, screening: Screening) -> None:
    if entries > screening.max_members:
        raise ArchiveError(f"the archive has more than max_members = {screening.max_members:,} entries")


# ---------------------------------------------------------------------------------------------
# Screening: what each member may not be, and where it may not be written


def _screen(members: list[Member], screening: Screening) -> list[Member]:
    """Members with their output path and, when refused, the reason. Declared sizes add up over
    every member, refused ones too (a tar must be read through them). Only members to restore
    claim an output path; a later one whose path collides with a claimed one is refused."""
    claims = _PathClaims(screening.case_insensitive_names)
    total, screened = 0, []
    for m in members:
        path, reason = safe_path(m.name)
        total += m.size
        reason = reason or m.reason
        if path is not None and not reason:
            if not path.lower().endswith(RESTORABLE_SUFFIXES):  # each member is written back in its own format
                reason = f"not a restorable image type (suffix not one of {' '.join(RESTORABLE_SUFFIXES)})"
            elif m.size > screening.max_member_bytes:
                reason = f"declares {m.size:,} bytes, over max_member_bytes = {screening.max_member_bytes:,}"
            elif total > screening.max_total_bytes:
                reason = (
                    f"the archive declares more than max_total_bytes = {screening.max_total_bytes:,} bytes up to here"
                )
            else:
                reason = claims.claim(path, m.ordinal)
        screened.append(replace(m, path=path, reason=reason))
    return screened


class _PathClaims:
    """Output paths taken so far. Two members collide when they would write the same file (the
    same name after normalisation: '.' and '//' dropped, Unicode NFC, case folded for a
    case-insensitive target) or when one's file would be the other's folder (a.png, a.png/b.png)."""

    def __init__(self, case_insensitive: bool):
        self.case_insensitive = case_insensitive
        self.files: dict[str, tuple[int, str]] = {}  # key -> (ordinal, path)
        self.folders: dict[str, tuple[int, str]] = {}  # key of a folder -> the first member under it

    def key(self, path: str) -> str:
        path = unicodedata.normalize("NFC", path)
        return path.casefold() if self.case_insensitive else path

    def claim(self, path: str, ordinal: int) -> str | None:
        """None when `path` is now this member's, else why not."""
        key = self.key(path)
        parents = [key.rsplit("/", n)[0] for n in range(1, key.count("/") + 1)]
        if key in self.files:
            other, other_path = self.files[key]
            if other_path == path:
                return f"duplicate name (member {other} has it)"
            return f"same output path as member {other} ({other_path}) once normalised"
        if key in self.folders:
            other, other_path = self.folders[key]
            return f"output path is the folder of member {other} ({other_path})"
        for parent in parents:
            if parent in self.files:
                other, other_path = self.files[parent]
                return f"output path lies under member {other}'s file ({other_path})"
        self.files[key] = (ordinal, path)
        for parent in parents:
            self.folders.setdefault(parent, (ordinal, path))
        return None


# ---------------------------------------------------------------------------------------------
# Reading members


def read_members(url: str, kind: str, members: list[Member], screening: Screening) -> Iterator[MemberRead]:
    """Each member's bytes (or why there are none), in archive order; `members` must be in archive
    order. Never reads more than a member declared; a member that cannot be read fails alone."""
    if not members:
        return
    fs, root = fsspec.core.url_to_fs(url)
    if kind == "folder":
        for m in members:
            yield _timed_read(m, lambda m=m: fs.open(posixpath.join(root, m.name), "rb"))
        return
    with fs.open(root, "rb") as f:
        if kind == "zip":
            with zipfile.ZipFile(f) as zf:  # the listing checked its central directory
                infos = zf.infolist()
                for m in members:
                    yield _timed_read(m, lambda m=m: zf.open(infos[m.ordinal]))
            return
        if kind == "tar":  # seekable: start at this chunk's first member
            f.seek(members[0].header_offset)
        yield from _read_tar(f, kind, members, members[0].ordinal if kind == "tar" else 0, screening)


def _read_tar(f: BinaryIO, kind: str, members: list[Member], ordinal: int, screening: Screening):
    """Stream a tar from the current position, where entry `ordinal` starts. Once its stream is
    corrupt, the members left fail with the error."""
    wanted = {m.ordinal: m for m in members}
    try:
        with _open_tar(f, kind, screening) as (tar, _):
            for i, info in enumerate(_tar_entries(tar)):
                m = wanted.pop(ordinal + i, None)
                if m is not None:
                    yield _timed_read(m, lambda info=info: tar.extractfile(info))
                if not wanted:
                    return
        error = "the archive ended before this member"
    except READ_ERRORS as e:
        error = f"{type(e).__name__}: {e} (the archive could not be read up to this member)"
    for m in wanted.values():
        yield MemberRead(m, None, UNREADABLE, error, 0.0)


def _timed_read(m: Member, open_member: Callable[[], BinaryIO]) -> MemberRead:
    start = time.perf_counter()
    try:
        with open_member() as f:
            data = read_declared(f, m.size)
        return MemberRead(m, data, None, None, time.perf_counter() - start)
    except MemberRefusedError as e:
        return MemberRead(m, None, f"unreadable: {e}", None, time.perf_counter() - start)
    except READ_ERRORS as e:
        return MemberRead(m, None, UNREADABLE, f"{type(e).__name__}: {e}", time.perf_counter() - start)


def read_declared(f: BinaryIO, size: int) -> bytes:
    """A member's bytes, trusting no header: more than declared (a lying zip entry, a file that
    grew since it was listed) is refused after size + 1 bytes; less fails as a short read."""
    data = f.read(size + 1)
    if len(data) > size:
        raise MemberRefusedError(f"holds more than its declared {size:,} bytes")
    if len(data) < size:
        raise TruncatedMemberError(f"short read: {len(data):,} of {size:,} bytes")
    return data
