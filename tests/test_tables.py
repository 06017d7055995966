"""The bulk rootfs decoder and the index tables: the same tree as the pycapnp reader
gives, for every image shape; bad fields hidden (and counted), never fatal; broken
structure refused with a clean error."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from puzzlefs import build, open_image
from puzzlefs.errors import MetadataError, PuzzleFSError
from puzzlefs.format import (
    MANIFEST_VERSION,
    BlobRef,
    DirEntry,
    FileChunk,
    Ino,
    Inode,
    Kind,
    Rootfs,
    RootfsReader,
    encode_rootfs,
)
from puzzlefs.format._bulk import decode_rootfs
from puzzlefs.reader import Image
from puzzlefs.reader._tables import Attr, Tables, build_tables


def tables_of(data: bytes, times: bytes | None = None) -> tuple[Tables, list[str]]:
    built = build_tables(
        decode_rootfs(data, expected_version=MANIFEST_VERSION), hashlib.sha256(data).digest(), times
    )
    return Tables(built.data), built.problems


def tables_of_image(image: Image) -> Tables:
    return tables_of(image.opened.rootfs_bytes(), image.opened.times_bytes())[0]


def walk(t: Tables) -> dict[bytes, Attr]:
    out: dict[bytes, Attr] = {}
    stack = [(b"", t.root_row)]
    while stack:
        path, row = stack.pop()
        a = t.attr(row)
        out[path] = a
        if a.kind == stat.S_IFDIR:
            for _, child, name in t.entries(a):
                stack.append((path + b"/" + name if path else name, child))
    return out


def assert_tables_match(image: Image, t: Tables) -> None:
    """Every path the pycapnp reader walks, with the same attributes and contents."""
    seen = walk(t)
    for path, inode in image.walk():
        a = seen.pop(path)
        ia = image.attr(inode)
        assert (a.ino, a.mode, a.nlink, a.uid, a.gid, a.size) == (
            ia.ino,
            ia.mode,
            ia.nlink,
            ia.uid,
            ia.gid,
            ia.size,
        ), path
        assert a.mtime * 1_000_000_000 + a.mtime_nsec == ia.mtime_ns, path
        assert t.xattrs(a) == inode.xattrs
        if inode.kind is Kind.LNK:
            assert t.symlink_target(a) == inode.symlink_target
        elif inode.kind is Kind.FILE:
            pieces = t.chunks(a)
            assert [(t.blob(b)[0], bo, comp) for _, bo, b, comp in pieces] == [
                (c.blob.digest, c.blob.offset, c.blob.compressed) for c in inode.chunks
            ]
        elif inode.kind is Kind.DIR:
            names = [name for name, _ in image.listdir(inode)]
            assert [name for _, _, name in t.entries(a)] == sorted(names)
            for name in names:
                assert t.lookup(a, name) is not None
            assert t.lookup(a, b"no such name") is None
        elif inode.kind in (Kind.CHR, Kind.BLK):
            assert a.rdev == os.makedev(inode.major, inode.minor)
    assert not seen, sorted(seen)[:5]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_all_types_tree(all_types_tree: Path, tmp_path: Path, compress: bool) -> None:
    build(all_types_tree, tmp_path / "oci", "t", compress=compress)
    image = open_image(tmp_path / "oci", "t")
    assert_tables_match(image, tables_of_image(image))


def test_reference_image(vectors: Path) -> None:
    """The reference's own rootfs (its writer's segment layout)."""
    image = open_image(vectors / "reference-image", "puzzlefs_example")
    t = tables_of_image(image)
    assert_tables_match(image, t)


def test_delta_chain(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "keep").mkdir(parents=True)
    for i in range(40):
        (src / "keep" / f"f{i}").write_bytes(os.urandom(1000 + i))
    (src / "gone").write_bytes(b"gone")
    (src / "dir").mkdir()
    (src / "dir" / "inner").write_bytes(b"inner")
    oci = tmp_path / "oci"
    build(src, oci, "v1")
    (src / "gone").unlink()
    (src / "keep" / "f3").write_bytes(b"changed")
    (src / "added").write_bytes(b"added")
    build(src, oci, "v2", base_tag="v1")
    (src / "dir" / "inner").unlink()
    (src / "dir" / "new").write_bytes(b"new")
    build(src, oci, "v3", base_tag="v2")
    for tag in ("v1", "v2", "v3"):
        image = open_image(oci, tag)
        assert_tables_match(image, tables_of_image(image))
    assert open_image(oci, "v3").rootfs.layer_count == 3


def test_a_big_tree_in_several_segments(tmp_path: Path) -> None:
    """Far pointers between segments: pycapnp spreads a large message over many."""
    src = tmp_path / "src"
    for d in range(40):
        (src / f"dir{d:02d}").mkdir(parents=True)
        for f in range(60):
            p = src / f"dir{d:02d}" / f"file-with-a-longer-name-{f:03d}"
            p.write_bytes(b"x" * (f % 7))
            if f % 10 == 0:
                os.setxattr(p, "user.k", b"v" * f)
    build(src, tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    data = image.opened.rootfs_bytes()
    assert int.from_bytes(data[:4], "little") + 1 > 2  # several segments
    assert_tables_match(image, tables_of_image(image))


names = st.binary(min_size=1, max_size=12).filter(
    lambda b: b not in (b".", b"..") and b"/" not in b and b"\0" not in b
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    files=st.dictionaries(names, st.binary(max_size=3000), max_size=12),
    dirs=st.dictionaries(
        names, st.dictionaries(names, st.binary(max_size=200), max_size=5), max_size=4
    ),
)
def test_decoded_trees_match(
    tmp_path_factory: pytest.TempPathFactory,
    files: dict[bytes, bytes],
    dirs: dict[bytes, dict[bytes, bytes]],
) -> None:
    root = tmp_path_factory.mktemp("hyp")
    src = root / "src"
    src.mkdir()
    for name, data in files.items():
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(data)
    for dname, entries in dirs.items():
        dpath = os.path.join(os.fsencode(src), dname)
        if os.path.lexists(dpath):
            continue
        os.mkdir(dpath)
        for name, data in entries.items():
            with open(os.path.join(dpath, name), "wb") as f:
                f.write(data)
    build(src, root / "oci", "t")
    image = open_image(root / "oci", "t")
    assert_tables_match(image, tables_of_image(image))


# -- bad fields: hidden, counted -------------------------------------------------------


def _ino(n: int) -> Ino:
    return Ino(n)


def _dir(ino: int, entries: list[tuple[bytes, int]], perm: int = 0o755) -> Inode:
    i = Inode(_ino(ino), Kind.DIR, permissions=perm)
    i.entries = [DirEntry(_ino(e), name) for name, e in entries]
    return i


def _file(ino: int, size: int = 0) -> Inode:
    i = Inode(_ino(ino), Kind.FILE, permissions=0o644)
    i.chunks = [FileChunk(BlobRef(bytes(32), 0, False), size)] if size else []
    return i


def test_bad_entries_are_hidden_and_counted() -> None:
    lnk_nul = Inode(_ino(6), Kind.LNK, permissions=0o777)
    lnk_nul.symlink_target = b"a\0b"
    lnk_ok = Inode(_ino(7), Kind.LNK, permissions=0o777)
    lnk_ok.symlink_target = b"target"
    dev_big = Inode(_ino(8), Kind.CHR, permissions=0o600)
    dev_big.major, dev_big.minor = 1 << 32, 1
    dev_ok = Inode(_ino(9), Kind.BLK, permissions=0o600)
    dev_ok.major, dev_ok.minor = 7, 3
    xattrs = _file(10)
    xattrs.xattrs = [(b"user.good", b"1"), (b"bad\0key", b"2"), (b"", b"3")]
    root = _dir(
        1,
        [
            (b"ok", 2),
            (b"a/b", 3),  # a slash in a name
            (b"..", 3),
            (b"", 3),
            (b"huge", 4),  # size above 2**63 - 1
            (b"dangling", 99),  # stored in no layer
            (b"lnk-nul", 6),
            (b"lnk", 7),
            (b"dev-big", 8),
            (b"dev", 9),
            (b"x", 10),
            (b"ok", 3),  # a name twice
            (b"loop", 1),  # the root again
            (b"sub", 5),
        ],
    )
    sub = _dir(5, [(b"again", 5), (b"up", 1), (b"file", 3)])  # loops
    huge = Inode(_ino(4), Kind.FILE, permissions=0o644)
    huge.chunks = [
        FileChunk(BlobRef(bytes(32), 0, False), (1 << 63) - 1),
        FileChunk(BlobRef(bytes(32), 0, False), 10),
    ]
    layer = [root, _file(2), _file(3), huge, sub, lnk_nul, lnk_ok, dev_big, dev_ok, xattrs]
    data = encode_rootfs(Rootfs([layer], {}))
    t, problems = tables_of(data)
    tree = walk(t)
    assert sorted(tree) == [b"", b"dev", b"lnk", b"ok", b"sub", b"sub/file", b"x"]
    assert t.xattrs(tree[b"x"]) == [(b"user.good", b"1")]
    assert tree[b"dev"].rdev == os.makedev(7, 3)
    assert tree[b""].nlink == 3  # ".", its own "..", and sub's ".."
    assert tree[b"sub"].nlink == 2
    text = "\n".join(problems)
    for what in (
        "invalid names",
        "no layer",
        "NUL",
        "12:20",
        "2**63",
        "xattrs",
        "repeating",
        "second path",
    ):
        assert what in text, (what, text)
    assert t.problems == problems


def test_whiteouts_delete_and_deleted_entries_vanish() -> None:
    base = [_dir(1, [(b"a", 2), (b"b", 3)]), _file(2), _file(3)]
    top = [_dir(1, [(b"a", 2), (b"b", 3)]), Inode(_ino(2), Kind.WHT)]
    t, problems = tables_of(encode_rootfs(Rootfs([top, base], {})))
    assert sorted(walk(t)) == [b"", b"b"]
    assert problems == []
    assert t.row_of(2) is None


@pytest.mark.parametrize(
    "layer",
    [
        [_file(1)],  # the root is not a directory
        [_dir(2, [])],  # no inode 1
    ],
    ids=["root-is-a-file", "no-root"],
)
def test_no_root_is_refused(layer: list[Inode]) -> None:
    with pytest.raises(MetadataError, match="root"):
        tables_of(encode_rootfs(Rootfs([layer], {})))


def test_unknown_version_and_garbage_are_refused() -> None:
    data = encode_rootfs(Rootfs([[_dir(1, [])]], {}, manifest_version=2))
    with pytest.raises(PuzzleFSError, match="version"):
        tables_of(data)
    for junk in (b"", b"\x00" * 7, os.urandom(64), b"\xff\xff\xff\xff" + bytes(60)):
        with pytest.raises(MetadataError):
            tables_of(junk)


def test_structure_errors_are_metadata_errors_for_any_corruption() -> None:
    """Every flipped byte of a real rootfs decodes, hides what it must, or fails with
    MetadataError / UnsupportedVersion: never another exception."""
    layer = [_dir(1, [(b"f", 2), (b"d", 3)]), _file(2, 5), _dir(3, [(b"x", 4)]), _file(4, 2)]
    good = encode_rootfs(Rootfs([layer], {bytes(32): bytes(range(32))}))
    for pos in range(len(good)):
        for bit in (0x01, 0x80):
            data = bytearray(good)
            data[pos] ^= bit
            with contextlib.suppress(PuzzleFSError):
                tables_of(bytes(data))


def test_index_file_checksum_catches_any_flip() -> None:
    layer = [_dir(1, [(b"f", 2)]), _file(2, 5)]
    data = encode_rootfs(Rootfs([layer], {}))
    built = build_tables(decode_rootfs(data, expected_version=3), bytes(32), None).data
    for pos in range(0, len(built), 7):
        flipped = bytearray(built)
        flipped[pos] ^= 0x10
        with pytest.raises(MetadataError):
            Tables(bytes(flipped))


def test_rootfs_reader_agrees_on_the_bad_layers() -> None:
    """What both readers refuse outright: a message that is not Cap'n Proto."""
    with pytest.raises(MetadataError):
        RootfsReader(b"not capnp at all")
    with pytest.raises(MetadataError):
        tables_of(b"not capnp at all")
