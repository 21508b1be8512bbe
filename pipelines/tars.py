"""WebDataset tars, read and appended to: the one helper every stage that opens a shard uses (the
quality filter, the candidate writer of the streaming pass, the training feed, promotion's
held-out set). Paths are local or fsspec URLs.

A sample is the run of consecutive members that share a key, the member name up to the first
dot of its basename (with its directory), as WebDataset groups them; its members are keyed by
the rest of the name, lower-cased ("jpg", "txt", "json", "lq.png").
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import fsspec


@dataclass(frozen=True)
class Member:
    offset: int  # of the member's data in the tar: `read_members` reads it back from there
    size: int
    data: bytes | None  # None where the caller did not ask for the bytes


def split_name(name: str) -> tuple[str, str]:
    """A member name → (sample key, extension), WebDataset's convention."""
    base = posixpath.basename(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(posixpath.dirname(name), stem), ext.lower()


def _read_all(ext: str) -> bool:
    return True


def iter_samples(
    url: str, read: Callable[[str], bool] = _read_all, fs: fsspec.AbstractFileSystem | None = None
) -> Iterator[tuple[str, dict[str, Member]]]:
    """(key, {ext: Member}) of each sample of the tar at `url` (a path of `fs` when given), in
    tar order. Only members whose extension `read` accepts carry their bytes; the others are
    skipped by seeking, so an index of a shard reads its headers, not its images. A malformed
    or truncated tar raises (tarfile.TarError, OSError, EOFError) after the samples before the
    damage; the sample being read there is dropped."""
    fs, path = (fs, url) if fs is not None else fsspec.core.url_to_fs(url)
    key, members = None, {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            stem, ext = split_name(info.name)
            if stem != key and members:
                yield key, members
                members = {}
            key = stem
            data = tar.extractfile(info).read() if read(ext) else None  # raises where truncated
            members[ext] = Member(info.offset_data, info.size, data)
    if members:
        yield key, members


def read_members(urls: Sequence[str], offsets: Sequence[int], sizes: Sequence[int]) -> list[bytes]:
    """The bytes of members given by (tar URL, data offset, size), one ranged read each
    (concurrent on object stores). Every URL must be on the first one's filesystem."""
    if not urls:
        return []
    fs, _ = fsspec.core.url_to_fs(urls[0])
    paths = [fsspec.core.url_to_fs(u)[1] for u in urls]
    return fs.cat_ranges(paths, list(offsets), [o + s for o, s in zip(offsets, sizes)])


class TarAppender:
    """Appends samples to a tar written to `f`, with fixed headers (mtime 0, mode 0444) so the
    same samples always give the same bytes; `add` returns where each member's data lies."""

    def __init__(self, f: BinaryIO):
        self._tar = tarfile.open(fileobj=f, mode="w")

    def add(self, key: str, members: Mapping[str, bytes]) -> dict[str, Member]:
        out = {}
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), 0o444
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            out[ext] = Member(self._tar.offset - padded, len(data), None)
        return out

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
