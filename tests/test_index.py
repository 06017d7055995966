"""The persistent index: built once, then mapped; never served when it is corrupt,
truncated, stale, foreign or not private; rebuilt instead."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from puzzlefs import build
from puzzlefs.errors import DigestMismatch
from puzzlefs.oci import ImageLayout
from puzzlefs.reader._open import OpenedImage
from puzzlefs.reader.index import _evict, load_tables, source_key


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"one")
    build(src, tmp_path / "oci", "one")
    (src / "d" / "g").write_bytes(b"two")
    build(src, tmp_path / "oci", "two")
    return tmp_path / "oci"


def opened(oci: Path, tag: str) -> OpenedImage:
    return OpenedImage(ImageLayout(oci), tag)


def index_file(where: Path, image: OpenedImage) -> Path:
    (found,) = [
        p
        for p in where.iterdir()
        if p.name.startswith(source_key(image).hex()) and not p.name.endswith(".seen")
    ]
    return found


def test_built_once_then_mapped(images: Path, tmp_path: Path) -> None:
    where = tmp_path / "idx"
    image = opened(images, "one")
    first = load_tables(image, directory=where)
    path = index_file(where, image)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(where.stat().st_mode & 0o777) == "0o700"
    inode = path.stat().st_ino
    second = load_tables(opened(images, "one"), directory=where)
    assert path.stat().st_ino == inode  # not rebuilt
    assert first.count == second.count and first.source == second.source
    load_tables(opened(images, "two"), directory=where)
    assert len([p for p in where.iterdir() if p.suffix == ".v2"]) == 2  # one per source


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_a_damaged_index_is_rebuilt(images: Path, tmp_path: Path, damage: str) -> None:
    where = tmp_path / "idx"
    image = opened(images, "one")
    good = load_tables(image, directory=where)
    path = index_file(where, image)
    original = path.read_bytes()
    data = bytearray(original)
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncate":
        del data[len(data) // 3 :]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(os.urandom(len(data)))
    path.write_bytes(bytes(data))
    again = load_tables(opened(images, "one"), directory=where)
    assert path.read_bytes() == original  # rebuilt, byte for byte
    assert again.count == good.count


def test_a_stale_index_is_never_served(images: Path, tmp_path: Path) -> None:
    """The index of another image renamed into this one's place."""
    where = tmp_path / "idx"
    one, two = opened(images, "one"), opened(images, "two")
    load_tables(one, directory=where)
    load_tables(two, directory=where)
    p1, p2 = index_file(where, one), index_file(where, two)
    shutil.copyfile(p2, p1)
    tables = load_tables(opened(images, "one"), directory=where)
    assert tables.source == source_key(one)
    assert p1.read_bytes() != p2.read_bytes()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_an_index_not_ours_or_not_private_is_rebuilt(images: Path, tmp_path: Path) -> None:
    where = tmp_path / "idx"
    image = opened(images, "one")
    load_tables(image, directory=where)
    path = index_file(where, image)
    for change in (lambda: os.chown(path, 1234, 1234), lambda: os.chmod(path, 0o666)):
        change()
        load_tables(opened(images, "one"), directory=where)
        st = path.stat()
        assert st.st_uid == os.geteuid() and st.st_mode & 0o077 == 0


def test_an_unwritable_cache_still_mounts(images: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    tables = load_tables(opened(images, "one"), directory=blocker / "idx")
    assert tables.count > 0


def test_a_corrupt_rootfs_is_refused_even_with_an_index(images: Path, tmp_path: Path) -> None:
    """The index is never trusted over the rootfs: the rootfs must be intact too."""
    where = tmp_path / "idx"
    image = opened(images, "one")
    load_tables(image, directory=where)
    blob = images / "blobs" / "sha256" / image.rootfs_descriptor.digest.hex
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        load_tables(opened(images, "one"), directory=where)


def test_the_cache_keeps_the_most_recent_within_its_bound(tmp_path: Path) -> None:
    where = tmp_path / "idx"
    where.mkdir()
    for i in range(5):
        p = where / f"{i:064x}.v2"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1000 + i, 1000 + i))
    keep = where / f"{0:064x}.v2"
    _evict(where, keep=keep, limit=2500)
    left = sorted(p.name for p in where.iterdir())
    assert left == [f"{0:064x}.v2", f"{4:064x}.v2"]  # the one in use, and the newest


def test_an_unchanged_rootfs_is_not_read_again(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked in full once; then trusted while the very file stays as it was (the
    same inode, size, mtime and ctime); checked again once it changed in any way."""
    where = tmp_path / "idx"
    checks: list[str] = []
    real = OpenedImage.check_rootfs

    def counting(self: OpenedImage) -> None:
        checks.append(self.tag)
        real(self)

    monkeypatch.setattr(OpenedImage, "check_rootfs", counting)
    load_tables(opened(images, "one"), directory=where)  # builds: reads the rootfs whole
    load_tables(opened(images, "one"), directory=where)
    load_tables(opened(images, "one"), directory=where)
    assert checks == []
    blob = images / "blobs" / "sha256" / opened(images, "one").rootfs_descriptor.digest.hex
    os.utime(blob, ns=(0, 0))  # same bytes, another mtime (and ctime)
    load_tables(opened(images, "one"), directory=where)
    assert checks == ["one"]
    load_tables(opened(images, "one"), directory=where)
    assert checks == ["one"]
    copy = tmp_path / "copy"
    shutil.copytree(images, copy)  # another file with the same rootfs: checked once
    load_tables(opened(copy, "one"), directory=where)
    load_tables(opened(copy, "one"), directory=where)
    assert checks == ["one", "one"]


def test_an_unchanged_index_is_not_read_whole_again(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once checked with its blobs, a later open maps the index without reading it
    (no O(inodes) work before a mount is live); any change to it is checked again."""
    from puzzlefs.reader import _tables

    where = tmp_path / "idx"
    sums: list[int] = []
    real = _tables._checksum

    def counting(buf: object) -> bytes:
        sums.append(1)
        return real(buf)

    monkeypatch.setattr(_tables, "_checksum", counting)
    load_tables(opened(images, "one"), directory=where)
    built = len(sums)
    load_tables(opened(images, "one"), directory=where)
    load_tables(opened(images, "one"), directory=where)
    assert len(sums) == built
    path = index_file(where, opened(images, "one"))
    os.utime(path, ns=(0, 0))
    load_tables(opened(images, "one"), directory=where)
    assert len(sums) == built + 1


def test_a_build_leaves_its_memory_in_a_child(images: Path, tmp_path: Path) -> None:
    """The build runs in a child process: the caller's memory does not grow by it."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_tables(opened(images, "two"), directory=tmp_path / "idx")
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss > 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
