"""The FUSE session against a stand-in kernel (a SOCK_SEQPACKET socket keeps message
boundaries as /dev/fuse does): INIT negotiation, replies and errors for every opcode
class, the handlers of the puzzlefs filesystem for kernels that still send OPEN."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from puzzlefs import build
from puzzlefs.errors import ImageError
from puzzlefs.fuse import _abi
from puzzlefs.fuse.filesystem import ImageFS
from puzzlefs.fuse.session import Connection, FuseError, Request, Session
from puzzlefs.oci import ImageLayout
from puzzlefs.reader._data import ChunkReader
from puzzlefs.reader._open import OpenedImage
from puzzlefs.reader.index import load_tables


class Kernel:
    """Sends requests, reads replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unique = 0

    def send(self, opcode: int, nodeid: int = 1, body: bytes = b"") -> int:
        self.unique += 1
        head = _abi.IN_HEADER.pack(
            _abi.IN_HEADER.size + len(body), opcode, self.unique, nodeid, 0, 0, os.getpid(), 0, 0
        )
        self.sock.send(head + body)
        return self.unique

    def reply(self) -> tuple[int, int, bytes]:
        data = self.sock.recv(1 << 21)
        length, error, unique = _abi.OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, -error, data[_abi.OUT_HEADER.size :]

    def call(self, opcode: int, nodeid: int = 1, body: bytes = b"") -> tuple[int, bytes]:
        unique = self.send(opcode, nodeid, body)
        got, err, payload = self.reply()
        assert got == unique
        return err, payload

    def init(self, minor: int = 38, flags: int = 0xFFFFFFFF) -> tuple[int, ...]:
        err, payload = self.call(
            _abi.INIT, 0, _abi.INIT_IN.pack(7, minor, 131072, flags) + bytes(48)
        )
        assert err == 0
        return _abi.INIT_OUT.unpack(payload)


class Echo:
    """A filesystem of test handlers."""

    def __init__(self) -> None:
        self.conn: Connection | None = None

    def handlers(self) -> dict[int, object]:
        def fails(req: Request) -> bytes:
            raise ImageError("broken image")

        def crashes(req: Request) -> bytes:
            raise RuntimeError("a bug")

        def chosen(req: Request) -> bytes:
            raise FuseError(errno.EPERM)

        return {
            _abi.GETATTR: lambda req: b"attr of %d" % req.nodeid,
            _abi.READLINK: fails,
            _abi.READ: fails,
            _abi.STATFS: crashes,
            _abi.ACCESS: chosen,
            _abi.FORGET: lambda req: None,
        }

    def negotiated(self, conn: Connection) -> None:
        self.conn = conn

    def connected(self, conn: Connection) -> None:
        assert self.conn is conn


@pytest.fixture()
def kernel() -> Iterator[tuple[Kernel, Echo, Session]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fs = Echo()
    session = Session(os.dup(ours.fileno()), fs, threads=2)  # type: ignore[arg-type]
    ours.close()
    session.start()
    try:
        yield Kernel(theirs), fs, session
    finally:
        session.stop()
        theirs.close()  # the session's reads end
        assert session.join(timeout=10)


def test_init_takes_what_both_sides_support(kernel: tuple[Kernel, Echo, Session]) -> None:
    k, fs, _ = kernel
    major, minor, readahead, flags, *_ = k.init(minor=38, flags=_abi.NO_OPEN_SUPPORT | 1 << 31)
    assert (major, minor, readahead) == (7, 38, 131072)
    assert flags == _abi.NO_OPEN_SUPPORT  # nothing we did not ask for, nothing not offered
    assert fs.conn is not None and fs.conn.no_open and not fs.conn.no_opendir


def test_an_older_kernel_gets_its_own_minor(kernel: tuple[Kernel, Echo, Session]) -> None:
    k, fs, _ = kernel
    _, minor, *_ = k.init(minor=31)
    assert minor == 31 and fs.conn is not None and fs.conn.minor == 31


def test_replies_and_errors(kernel: tuple[Kernel, Echo, Session]) -> None:
    k, _, _ = kernel
    k.init()
    assert k.call(_abi.GETATTR, 42) == (0, b"attr of 42")
    assert k.call(_abi.READLINK)[0] == ImageError.errno  # a PuzzleFSError: its errno
    assert k.call(_abi.READ)[0] == errno.EIO  # on data, every failure is EIO
    assert k.call(_abi.STATFS)[0] == errno.EIO  # a bug: EIO (and a logged traceback)
    assert k.call(_abi.ACCESS)[0] == errno.EPERM
    assert k.call(_abi.MKDIR)[0] == errno.EROFS  # anything that writes
    assert k.call(_abi.WRITE)[0] == errno.EROFS
    assert k.call(_abi.LSEEK)[0] == errno.ENOSYS  # anything else we do not serve
    assert k.call(99)[0] == errno.ENOSYS
    k.send(_abi.FORGET, 5, struct.pack("<Q", 1))  # no reply to these
    k.send(_abi.INTERRUPT, 0, struct.pack("<Q", 1))
    assert k.call(_abi.GETATTR, 7) == (0, b"attr of 7")  # the next reply is this one's


def test_a_short_request_is_skipped(kernel: tuple[Kernel, Echo, Session]) -> None:
    k, _, _ = kernel
    k.init()
    k.sock.send(b"tiny")
    assert k.call(_abi.GETATTR, 3) == (0, b"attr of 3")


# -- the puzzlefs handlers, for a kernel that still sends OPEN and OPENDIR -------------


@pytest.fixture()
def image_fs(tmp_path: Path) -> ImageFS:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"hello")
    build(src, tmp_path / "oci", "t")
    image = OpenedImage(ImageLayout(tmp_path / "oci"), "t")
    tables = load_tables(image, directory=tmp_path / "idx")
    data = ChunkReader(image.layout, lambda d: None, verify_verity=False)
    fs = ImageFS(tables, data)
    fs.negotiated(Connection(38, 0, 131072, 32))  # no FUSE_NO_OPEN(DIR)_SUPPORT
    return fs


def req(opcode: int, nodeid: int, body: bytes = b"") -> Request:
    return Request(opcode, 1, nodeid, 0, 0, 0, memoryview(body))


def test_open_and_opendir_keep_the_kernels_caches(image_fs: ImageFS) -> None:
    root = image_fs.tables.attr(image_fs.tables.root_row)
    d = image_fs.tables.lookup(root, b"d")
    assert d is not None
    f_row = image_fs.tables.lookup(image_fs.tables.attr(d), b"f")
    assert f_row is not None
    f_ino = image_fs.tables.attr(f_row).ino
    d_ino = image_fs.tables.attr(d).ino
    _, flags, _ = _abi.OPEN_OUT.unpack(
        image_fs.open(req(_abi.OPEN, f_ino, struct.pack("<II", os.O_RDONLY, 0)))
    )  # type: ignore[arg-type]
    assert flags == _abi.FOPEN_KEEP_CACHE
    _, flags, _ = _abi.OPEN_OUT.unpack(image_fs.opendir(req(_abi.OPENDIR, d_ino, bytes(8))))  # type: ignore[arg-type]
    assert flags == _abi.FOPEN_KEEP_CACHE | _abi.FOPEN_CACHE_DIR
    for bad, err in ((os.O_WRONLY, errno.EROFS), (os.O_RDWR, errno.EROFS)):
        with pytest.raises(FuseError) as e:
            image_fs.open(req(_abi.OPEN, f_ino, struct.pack("<II", bad, 0)))
        assert e.value.errno == err
    with pytest.raises(FuseError) as e:
        image_fs.open(req(_abi.OPEN, d_ino, struct.pack("<II", os.O_RDONLY, 0)))
    assert e.value.errno == errno.EISDIR
    with pytest.raises(FuseError) as e:
        image_fs.opendir(req(_abi.OPENDIR, f_ino, bytes(8)))
    assert e.value.errno == errno.ENOTDIR


def test_plain_readdir_and_reads(image_fs: ImageFS) -> None:
    reply = image_fs.readdir(req(_abi.READDIR, 1, _abi.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0)))
    assert isinstance(reply, bytes | memoryview)
    listing = bytes(reply)
    ino, off, namelen, kind = _abi.DIRENT.unpack_from(listing)
    assert listing[_abi.DIRENT.size : _abi.DIRENT.size + namelen] == b"d"
    assert (off, kind) == (1, stat.S_IFDIR >> 12)
    empty = image_fs.readdir(req(_abi.READDIR, 1, _abi.READ_IN.pack(0, 1, 4096, 0, 0, 0, 0)))
    assert bytes(empty) == b""  # type: ignore[arg-type]
    d = image_fs.tables.attr(
        image_fs.tables.lookup(image_fs.tables.attr(image_fs.tables.root_row), b"d") or 0
    )
    f = image_fs.tables.attr(image_fs.tables.lookup(d, b"f") or 0)
    parts = image_fs.read(req(_abi.READ, f.ino, _abi.READ_IN.pack(0, 1, 3, 0, 0, 0, 0)))
    assert b"".join(parts) == b"ell"  # type: ignore[arg-type]
    assert image_fs.read(req(_abi.READ, f.ino, _abi.READ_IN.pack(0, 10, 3, 0, 0, 0, 0))) == b""
    with pytest.raises(FuseError) as e:
        image_fs.getattr(req(_abi.GETATTR, 123456))
    assert e.value.errno == errno.ENOENT


def test_readdirplus_gives_attributes_for_directories_only(image_fs: ImageFS) -> None:
    """A file's entry has node id 0 (the kernel makes no inode for it until it is looked
    up); a directory's carries its attributes, so a walk descends without a LOOKUP."""
    tables = image_fs.tables
    root = tables.attr(tables.root_row)
    d = tables.attr(tables.lookup(root, b"d") or 0)
    f = tables.attr(tables.lookup(d, b"f") or 0)
    plus = _abi.DIRENTPLUS
    for parent, child, name in ((1, d, b"d"), (d.ino, f, b"f")):
        body = _abi.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0)
        reply = bytes(image_fs.readdirplus(req(_abi.READDIRPLUS, parent, body)))  # type: ignore[arg-type]
        fields = plus.unpack_from(reply)
        nodeid, mode = fields[0], fields[15]
        ino, off, namelen, kind = fields[-4:]
        assert reply[plus.size : plus.size + namelen] == name
        assert (ino, off, kind) == (child.ino, 1, child.kind >> 12)
        assert len(reply) == (plus.size + namelen + 7) & ~7
        if child.kind == stat.S_IFDIR:
            assert (nodeid, mode) == (child.ino, child.mode)
        else:
            assert reply[: plus.size - _abi.DIRENT.size] == bytes(plus.size - _abi.DIRENT.size)
