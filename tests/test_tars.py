"""The one shard-reading helper: samples with member offsets, ranged reads, appends whose offsets
point at the data, and truncated tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipelines.tars import Member, TarAppender, iter_samples, read_members, split_name

SAMPLES = [
    ("000000", {"jpg": b"\xff\xd8 an image", "txt": b"a caption", "json": b"{}"}),
    ("000001", {"hq.png": b"x" * 1000, "lq.png": b"y" * 10, "txt": b""}),
    ("dir/000002", {"webp": b"z" * 513}),
]


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "00000.tar"
    with open(path, "wb") as f, TarAppender(f) as tar:
        written = [tar.add(key, members) for key, members in SAMPLES]
    return path, written


def test_append_then_read_back_by_offset(shard):
    path, written = shard
    for (_, members), where in zip(SAMPLES, written):
        for ext, data in members.items():
            m = where[ext]
            assert read_members([str(path)], [m.offset], [m.size]) == [data]
    with tarfile.open(path) as t:  # a plain tar, fixed headers
        assert {m.name for m in t} >= {"000000.jpg", "000001.hq.png", "dir/000002.webp"}
        assert {(m.mtime, m.mode) for m in t} == {(0, 0o444)}


def test_iter_samples_groups_members_and_reads_only_what_is_asked(shard):
    path, written = shard
    got = list(iter_samples(str(path), read=lambda ext: ext == "txt"))
    assert [key for key, _ in got] == ["000000", "000001", "dir/000002"]
    for (_, members), (_, want), where in zip(got, SAMPLES, written):
        assert set(members) == set(want)
        for ext, m in members.items():
            assert (m.offset, m.size) == (where[ext].offset, len(want[ext]))
            assert m.data == (want[ext] if ext == "txt" else None)
    everything = dict(iter_samples(f"file://{path}"))
    assert everything["000001"]["lq.png"] == Member(written[1]["lq.png"].offset, 10, b"y" * 10)


def test_split_name_follows_webdataset():
    assert split_name("a/b/000.hq.PNG") == ("a/b/000", "hq.png")
    assert split_name("000") == ("000", "")


def test_a_truncated_tar_yields_the_samples_before_the_damage_then_raises(shard, tmp_path):
    path, written = shard
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[: written[1]["hq.png"].offset + 100])
    samples = iter_samples(str(cut))
    assert next(samples)[0] == "000000"
    with pytest.raises((tarfile.TarError, OSError, EOFError)):
        next(samples)


def test_read_members_of_nothing():
    assert read_members([], [], []) == []


def test_appender_writes_to_any_binary_file():
    buf = io.BytesIO()
    tar = TarAppender(buf)
    (where,) = [tar.add("k", {"txt": b"hello"})]
    tar.close()
    assert buf.getvalue()[where["txt"].offset :][:5] == b"hello"
