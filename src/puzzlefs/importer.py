"""OCI v1 images (tar layers) -> a PuzzleFS image, without extracting anything.

Pipeline: resolve ``SRC:TAG`` (an image index is narrowed to linux and this machine's
architecture) -> each layer blob is streamed once: its sha256 and size are checked
against the descriptor while it is decompressed (none, gzip or zstd) into one spool
file per layer in a temporary directory, and the uncompressed sha256 against the
config's ``diff_ids`` -> the members of each spool are read with :mod:`tarfile`
(headers only: file contents stay where they are, as ``Region(spool, offset, size)``)
-> the layers are applied in order, in memory, with the OCI whiteout rules -> the
merged tree is numbered exactly as :func:`puzzlefs.builder.walk.walk` numbers a
directory -> :func:`puzzlefs.builder.build_tree`. So the result is byte for byte what
``build`` gives for the tree that unpacking the image would make.

Everything that can be refused (a missing or altered blob, a layer that is not a tar,
names that are absolute or climb with ``..``, hard links to nowhere) is refused before
the destination is touched; the spool directory is removed in every case.

Layer semantics, as umoci and the container runtimes apply them:

- ``.wh.NAME`` deletes NAME (and its subtree) from the LOWER layers;
  ``DIR/.wh..wh..opq`` hides everything the lower layers had in DIR. Entries of the
  same layer are never hidden by its own whiteouts, whatever their order in the tar.
  Whiteouts never appear in the result; aufs metadata (``.wh..wh.*``) is ignored.
- An entry replaces whatever was at its path (a file by a directory and the other way
  round); a directory entry over an existing directory only updates its owner, mode
  and xattrs (the contents stay).
- Missing parent directories are implied, 0755 root:root; so is the root when no
  layer has a ``./`` entry (FORMAT.md §7).
- Symlinks in the parent part of a path are followed inside the image (chroot
  semantics: ``..`` stops at the root, absolute targets start at it).
- A hard link (LNKTYPE) is the inode at the target path in the merged tree so far
  (lower layers included); parent symlinks followed, the last component not.
- Owners are the numeric uid/gid; xattrs come from ``SCHILY.xattr.*`` pax records
  (and libarchive's ``LIBARCHIVE.xattr.*`` where no SCHILY record names the key). A
  record with an empty value deletes its keyword (POSIX pax), so an xattr whose value
  is empty is not imported: the Go tar reader under docker, containerd and umoci
  drops it the same way (GNU tar would set it).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from puzzlefs._files import open_regular
from puzzlefs._limits import (
    MAX_MAJOR,
    MAX_MINOR,
    NAME_MAX,
    PATH_MAX,
    XATTR_NAME_MAX,
    XATTR_NAMESPACES,
    XATTR_SIZE_MAX,
    device_in_range,
)
from puzzlefs.builder import BuildResult, build_tree
from puzzlefs.builder.walk import Node, Region, Tree
from puzzlefs.chunking import ChunkParams
from puzzlefs.compression import ZstdOptions
from puzzlefs.errors import (
    BlobNotFound,
    DigestMismatch,
    ImageError,
    LayerError,
    LayerTooLarge,
    TagNotFound,
    UsageError,
)
from puzzlefs.format import ROOT_INO, Ino
from puzzlefs.oci import (
    ANNOTATION_REF_NAME,
    MEDIA_TYPE_CHUNK,
    MEDIA_TYPE_CHUNK_ZSTD,
    MEDIA_TYPE_ROOTFS,
    Descriptor,
    ImageLayout,
    Manifest,
)
from puzzlefs.oci.layout import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_JSON_BLOB,
    load_json,
    pick_platform,
)
from puzzlefs.progress import Progress

__all__ = ["LayerError", "TarStat", "import_image", "read_image_tree"]


# Layer media type -> compression.
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

_READ_SIZE = 1 << 20
_HEX_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_SYMLINK_HOPS = 40
_MAX_INDEX_DEPTH = 4
_WH = b".wh."
_WH_META = b".wh..wh."
_WH_OPAQUE = b".wh..wh..opq"


@dataclass(frozen=True, slots=True)
class TarStat:
    """What a build needs to know about an inode (the ``Stat`` protocol of
    :mod:`puzzlefs.builder.walk`), from a tar header instead of lstat."""

    st_mode: int
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_mtime_ns: int = 0


_IMPLIED_DIR = TarStat(stat.S_IFDIR | 0o755)


# -- the source image ---------------------------------------------------------------


@dataclass(frozen=True)
class _SourceImage:
    layout: ImageLayout
    name: str  # SRC:TAG, for messages
    layers: list[Descriptor]
    diff_ids: list[str] | None


def _read_blob(layout: ImageLayout, desc: Descriptor, what: str) -> bytes:
    if desc.size > MAX_JSON_BLOB:
        raise LayerError(f"{what} is implausibly large ({desc.size} bytes)")
    try:  # the size checked before reading, the sha256 after
        return layout.blobs.get(desc.digest, size=desc.size)
    except BlobNotFound:
        raise BlobNotFound(f"{what} {desc.digest} is missing from {layout.path}") from None
    except DigestMismatch:
        raise
    except ImageError as e:  # not a regular file, or not its descriptor's size
        raise LayerError(f"{what}: {e}") from None


def _read_json_blob(layout: ImageLayout, desc: Descriptor, what: str) -> dict[str, Any]:
    data = _read_blob(layout, desc, what)
    try:
        return load_json(data, f"{what} {desc.digest}")
    except ImageError as e:  # not JSON, not an object, nested too deeply
        raise LayerError(str(e)) from None


def open_source(src_dir: Path, tag: str) -> _SourceImage:
    """Resolve ``src_dir:tag`` to its manifest's layers (and the config's diff_ids)."""
    name = f"{src_dir}:{tag}"
    layout = ImageLayout(src_dir)
    tags: dict[str, Descriptor] = {}  # the last descriptor of a tag wins, as in resolve
    for i, d in enumerate(layout.read_index().get("manifests", [])):
        desc = Descriptor.from_json(d, f"{src_dir}/index.json manifest {i}")
        ref = desc.annotations.get(ANNOTATION_REF_NAME)
        if isinstance(ref, str):
            tags[ref] = desc
    if tag not in tags:
        known = ", ".join(sorted(tags)) or "none"
        raise TagNotFound(f"tag {tag!r} not found in {src_dir} (tags: {known})")
    desc = tags[tag]
    for _ in range(_MAX_INDEX_DEPTH):
        if desc.media_type not in INDEX_TYPES:
            break
        index = _read_json_blob(layout, desc, f"{name}: image index")
        desc = pick_platform(index, f"{name}: image index {desc.digest}")
    if desc.media_type not in MANIFEST_TYPES:
        raise LayerError(f"{name}: unsupported manifest media type {desc.media_type!r}")
    manifest = Manifest.from_bytes(_read_blob(layout, desc, f"{name}: manifest"), name)
    kinds = {d.media_type for d in manifest.layers}
    if kinds & {MEDIA_TYPE_ROOTFS, MEDIA_TYPE_CHUNK, MEDIA_TYPE_CHUNK_ZSTD}:
        raise LayerError(f"{name} is already a puzzlefs image, not an image of tar layers")
    for i, d in enumerate(manifest.layers, 1):
        if d.media_type not in _LAYER_TYPES:
            raise LayerError(f"{name}: layer {i} has an unsupported media type {d.media_type!r}")
    config = _read_json_blob(layout, manifest.config, f"{name}: config")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not (
        isinstance(diff_ids, list)
        and len(diff_ids) == len(manifest.layers)
        and all(isinstance(x, str) for x in diff_ids)
    ):
        diff_ids = None  # nothing to check the uncompressed layers against
    return _SourceImage(layout, name, manifest.layers, diff_ids)


# -- layer blobs -> uncompressed spool files ----------------------------------------


class _BlobReader:
    """Reads a layer blob at most one byte past its declared size, hashing as it goes."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._left = size + 1
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > _READ_SIZE:
            n = _READ_SIZE
        data = self._f.read(min(n, self._left))
        self._left -= len(data)
        self.size += len(data)
        self.sha256.update(data)
        return data

    def drain(self) -> int:
        """Hash what the decoder left (after a failure); return its length."""
        n = 0
        while data := self.read():
            n += len(data)
        return n


def _gunzip(src: _BlobReader, write: Callable[[bytes], object]) -> None:
    """gzip members one after another, zero padding between them allowed (as gzip(1)
    and Python's gzip module read them); output is bounded per call, so a small
    hostile blob cannot take all the memory."""
    d: Any = None  # the current member's decompressor; None between members
    members = 0
    while data := src.read():
        while data:
            if d is None:
                if members:
                    data = data.lstrip(b"\0")
                    if not data:
                        break
                d = zlib.decompressobj(zlib.MAX_WBITS | 16)
            out = d.decompress(data, _READ_SIZE)
            write(out)
            while not d.eof and not d.unconsumed_tail and len(out) == _READ_SIZE:
                out = d.decompress(b"", _READ_SIZE)  # output still pending
                write(out)
            if d.eof:
                data, d = d.unused_data, None
                members += 1
            else:
                data = d.unconsumed_tail
    if d is not None:
        raise LayerError("truncated gzip stream")
    if not members:
        raise LayerError("empty blob, not a gzip stream")


def _unzstd(src: _BlobReader, write: Callable[[bytes], object]) -> None:
    reader = zstandard.ZstdDecompressor().stream_reader(
        cast(IO[bytes], src), read_size=_READ_SIZE, read_across_frames=True
    )
    while data := reader.read(_READ_SIZE):
        write(data)


def _copy(src: _BlobReader, write: Callable[[bytes], object]) -> None:
    while data := src.read():
        write(data)


_DECODERS: dict[str, Callable[[_BlobReader, Callable[[bytes], object]], None]] = {
    "none": _copy,
    "gzip": _gunzip,
    "zstd": _unzstd,
}


class _Budget:
    """How much the spool may hold, so that a gzip bomb or a sparse member that
    declares 10 GiB is refused, not spooled until the disk is full.

    - Bytes written to the spool never exceed its filesystem's free space at the start
      less a reserve (a twentieth of the filesystem, at most half of what is free), for
      everyone else on that disk.
    - A layer's uncompressed size, sparse files counted at their full size (what the
      build then reads), is capped by ``max_layer_size`` when given, else by the same
      free-space figure.
    """

    def __init__(self, spool_dir: Path, max_layer_size: int | None) -> None:
        st = os.statvfs(spool_dir)
        free = st.f_bavail * st.f_frsize
        self.disk = free - min(free // 2, st.f_blocks * st.f_frsize // 20)
        self.spool_dir = spool_dir
        self.max_layer_size = max_layer_size
        self.written = 0  # real bytes in the spool, all layers
        self.layer = 0  # this layer's uncompressed size

    def start_layer(self) -> None:
        self.layer = 0

    def add(self, what: str, written: int, apparent: int | None = None) -> None:
        """``written`` bytes go to disk; the layer grows by ``apparent`` (default the
        same). Raises LayerTooLarge before they would exceed a limit."""
        grow = written if apparent is None else apparent
        if self.max_layer_size is not None and self.layer + grow > self.max_layer_size:
            raise LayerTooLarge(
                f"{what}: more than {_human(self.max_layer_size)} uncompressed (--max-layer-size)"
            )
        if self.max_layer_size is None and self.layer + grow > self.disk:
            raise LayerTooLarge(
                f"{what}: expands to more than {_human(self.disk)} uncompressed, more than"
                f" {self.spool_dir} can spool (give a larger --tmpdir, or --max-layer-size"
                " to allow more sparse data)"
            )
        if self.written + written > self.disk:
            raise LayerTooLarge(
                f"{what}: the layers expand to more than {_human(self.disk)}, more than"
                f" {self.spool_dir} can spool (give --tmpdir on a larger filesystem)"
            )
        self.layer += grow
        self.written += written


def _human(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _spool_layer(
    source: _SourceImage, i: int, spool: Path, progress: Progress | None, budget: _Budget
) -> None:
    """Decompress layer ``i`` (1-based) into ``spool``, checking its digests."""
    desc = source.layers[i - 1]
    what = f"{source.name}: layer {i} ({desc.digest})"
    compression = _LAYER_TYPES[desc.media_type]
    try:  # a regular file only (a FIFO would hang the import), its size checked first
        fd, size = open_regular(source.layout.blobs.path(desc.digest), f"{what}: the blob")
    except FileNotFoundError:
        raise BlobNotFound(f"{what}: blob missing from {source.layout.path}") from None
    except OSError as e:
        raise LayerError(f"{what}: cannot read the blob: {e.strerror}") from None
    f = os.fdopen(fd, "rb")
    uncompressed = hashlib.sha256()
    check_diff_id = source.diff_ids is not None and compression != "none"
    budget.start_layer()

    def write(data: bytes) -> None:
        budget.add(what, len(data))
        if check_diff_id:
            uncompressed.update(data)
        out.write(data)
        if progress:
            progress.add("bytes", len(data))

    with f, open(spool, "wb") as out:
        if size != desc.size:
            raise LayerError(f"{what}: blob size {size}, the manifest says {desc.size}")
        reader = _BlobReader(f, desc.size)
        failure: str | None = None
        try:
            _DECODERS[compression](reader, write)
        except LayerTooLarge:
            raise
        except LayerError as e:
            failure = str(e)
        except (zlib.error, zstandard.ZstdError) as e:
            failure = f"not a valid {compression} stream ({e})"
        except OSError as e:
            raise LayerError(f"{what}: cannot write {spool}: {e.strerror}") from None
        left = reader.drain()
        actual = reader.sha256.hexdigest()
        if actual != desc.digest.hex:  # the blob is not what the manifest names
            raise DigestMismatch(what, desc.digest.hex, actual)
        if reader.size != desc.size:
            raise LayerError(f"{what}: blob size {reader.size}, the manifest says {desc.size}")
        if failure is None and left:
            failure = f"{left} bytes after the end of the {compression} stream"
        if failure is not None:
            raise LayerError(f"{what}: {failure}")
    if source.diff_ids is not None:  # the uncompressed tar is what the config says
        expected = source.diff_ids[i - 1]
        actual = uncompressed.hexdigest() if check_diff_id else desc.digest.hex
        if not _HEX_DIGEST.fullmatch(expected):
            shown = expected if len(expected) <= 80 else expected[:72] + "..."
            raise LayerError(f"{what}: its config diff_id {shown!r} is not a sha256 digest")
        if expected != f"sha256:{actual}":
            raise DigestMismatch(
                f"{what} uncompressed (config diff_ids)", expected.removeprefix("sha256:"), actual
            )
    if progress:
        progress.add("layers")


# -- tar members --------------------------------------------------------------------


@dataclass(slots=True)
class _Member:
    """One tar member, checked and decoded (names as raw bytes)."""

    comps: tuple[bytes, ...]  # the normalised path; () is the root
    name: bytes  # as in the tar, for messages
    st: TarStat
    xattrs: list[tuple[bytes, bytes]]
    region: Region | None = None  # regular files
    target: bytes | None = None  # symlinks
    link: tuple[bytes, ...] | None = None  # hard links: the target's components


@dataclass(slots=True)
class _Layer:
    whiteouts: list[tuple[tuple[bytes, ...], bytes | None]] = field(default_factory=list)
    members: list[_Member] = field(default_factory=list)


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _components(name: bytes, what: str, kind: str = "name") -> tuple[bytes, ...]:
    if not name:
        raise LayerError(f"{what}: empty {kind}")
    if name.startswith(b"/"):
        raise LayerError(f"{what}: absolute {kind} {_show(name)}")
    if b"\0" in name:
        raise LayerError(f"{what}: {kind} {_show(name)} has a NUL byte")
    comps = tuple(c for c in name.split(b"/") if c not in (b"", b"."))
    if b".." in comps:
        raise LayerError(f"{what}: {kind} {_show(name)} has a '..' component")
    for c in comps:
        if len(c) > NAME_MAX:
            raise LayerError(f"{what}: a {kind} component longer than {NAME_MAX} bytes")
    if len(name) >= PATH_MAX:
        raise LayerError(f"{what}: a {kind} longer than {PATH_MAX - 1} bytes")
    return comps


def _show(name: bytes) -> str:
    return repr(os.fsdecode(name))


_FILE_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE}
_TYPE_BITS = {
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def _xattrs(pax: Mapping[str, str], what: str) -> list[tuple[bytes, bytes]]:
    out: dict[bytes, bytes] = {}
    for k, v in pax.items():
        if k.startswith("SCHILY.xattr."):
            out[_b(k[len("SCHILY.xattr.") :])] = _b(v)
    for k, v in pax.items():
        if k.startswith("LIBARCHIVE.xattr.") and v:
            key = urllib.parse.unquote_to_bytes(k[len("LIBARCHIVE.xattr.") :])
            try:
                out.setdefault(key, base64.b64decode(v, validate=True))
            except ValueError:
                raise LayerError(f"{what}: xattr {_show(key)} is not base64") from None
    for key, value in out.items():
        if not key.startswith(XATTR_NAMESPACES) or key in XATTR_NAMESPACES or b"\0" in key:
            raise LayerError(f"{what}: xattr {_show(key)} is not a name Linux can set")
        if len(key) > XATTR_NAME_MAX:
            raise LayerError(f"{what}: xattr name longer than {XATTR_NAME_MAX} bytes")
        if len(value) > XATTR_SIZE_MAX:
            raise LayerError(f"{what}: xattr {_show(key)} larger than {XATTR_SIZE_MAX} bytes")
    # A pax record with an empty value deletes the keyword (POSIX pax; Go's archive/tar,
    # so docker, containerd and umoci, drop such xattrs; Python's tarfile keeps them).
    return sorted((k, v) for k, v in out.items() if v)


def _read_layer(spool: Path, where: str, sparse_spool: Path, budget: _Budget) -> _Layer:
    """Every member of one uncompressed layer, checked; contents stay in the spool."""
    layer = _Layer()
    spool_b = os.fsencode(spool)
    spool_size = spool.stat().st_size
    sparse = _SparseSpool(sparse_spool, spool, spool_size)
    try:
        tar = tarfile.open(spool, "r:", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except (tarfile.TarError, EOFError) as e:
        raise LayerError(f"{where}: not a tar archive ({e})") from None
    except (ValueError, OverflowError) as e:  # pax numbers tarfile cannot parse
        raise LayerError(f"{where}: not a valid tar archive ({e})") from None
    try:
        with tar:
            try:
                while (info := tar.next()) is not None:
                    member = _member(info, where)
                    if member is None:
                        continue
                    if isinstance(member, tuple):
                        layer.whiteouts.append(member)
                        continue
                    if member.region is not None:
                        what = f"{where}: {_show(member.name)}"
                        if info.sparse is not None:  # GNU sparse: expand the holes
                            member.region = sparse.add(info, what, budget)
                        elif info.offset_data + info.size > spool_size:
                            raise LayerError(f"{what} is truncated")
                        else:
                            member.region = Region(spool_b, info.offset_data, info.size)
                    layer.members.append(member)
                    tar.members.clear()  # type: ignore[attr-defined]  # keep only our records
            except (tarfile.TarError, EOFError) as e:
                raise LayerError(f"{where}: corrupt tar archive ({e})") from None
            except (ValueError, OverflowError) as e:  # as above: tarfile's own int()s
                raise LayerError(f"{where}: corrupt tar archive ({e})") from None
            _check_end(tar, spool, where)
    finally:
        sparse.close()
    return layer


def _check_end(tar: tarfile.TarFile, spool: Path, where: str) -> None:
    """tarfile stops quietly at a header it cannot parse; tar(1) would not: refuse
    anything but zero blocks (or nothing) where the member headers end."""
    with open(spool, "rb") as f:
        f.seek(tar.offset)
        block = f.read(tarfile.BLOCKSIZE)
    if block.strip(b"\0"):
        raise LayerError(f"{where}: invalid tar header at offset {tar.offset}")


class _SparseSpool:
    """GNU sparse members of one layer, expanded one after another into one file whose
    holes stay holes: a member that declares 10 GiB of holes costs no disk (its size
    still counts against the layer's limit, as the build reads all of it)."""

    def __init__(self, path: Path, tar_spool: Path, tar_size: int) -> None:
        self.path = path
        self._tar_spool = tar_spool
        self._tar_size = tar_size
        self._fd: int | None = None
        self._src: int | None = None
        self._end = 0

    def add(self, info: tarfile.TarInfo, what: str, budget: _Budget) -> Region:
        # (offset, length) of each data run, in file order (typeshed says bytes: wrong)
        segments = cast(list[tuple[int, int]], info.sparse or [])
        pos = 0
        for offset, length in segments:
            if offset < pos or length < 0 or offset + length > info.size:
                raise LayerError(f"{what}: a corrupt GNU sparse map")
            pos = offset + length
        stored = sum(length for _, length in segments)
        if info.offset_data + stored > self._tar_size:
            raise LayerError(f"{what} is truncated")
        budget.add(what, stored, info.size)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            self._src = os.open(self._tar_spool, os.O_RDONLY | os.O_CLOEXEC)
        assert self._src is not None
        start = self._end
        src = info.offset_data
        for offset, length in segments:
            done = 0
            while done < length:
                data = os.pread(self._src, min(_READ_SIZE, length - done), src + done)
                if not data:
                    raise LayerError(f"{what} is truncated")
                _pwrite_all(self._fd, data, start + offset + done)
                done += len(data)
            src += length
        self._end = start + info.size
        os.ftruncate(self._fd, self._end)
        return Region(os.fsencode(self.path), start, info.size)

    def close(self) -> None:
        for fd in (self._fd, self._src):
            if fd is not None:
                os.close(fd)
        self._fd = self._src = None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _member(
    info: tarfile.TarInfo, where: str
) -> _Member | tuple[tuple[bytes, ...], bytes | None] | None:
    """A member record; a whiteout as (directory, name or None for opaque); None for
    what is skipped (aufs metadata)."""
    name = _b(info.name)
    what = f"{where}: {_show(name)}"
    if info.isdir() and all(c in (b"", b".") for c in name.split(b"/")):
        # The root itself: `./` (tar, buildah, docker) or `/` (umoci), which tarfile
        # gives as "." and "". It sets the root's owner, mode and xattrs, as tar does.
        comps: tuple[bytes, ...] = ()
    else:
        comps = _components(name, where, "member name")
    if any(c.startswith(_WH_META) for c in comps[:-1]):
        return None  # aufs hard-link and metadata directories
    if any(c.startswith(_WH) for c in comps[:-1]):
        raise LayerError(f"{what}: a whiteout used as a directory")
    if comps and comps[-1].startswith(_WH):
        leaf = comps[-1]
        if leaf == _WH_OPAQUE:
            return comps[:-1], None
        if leaf.startswith(_WH_META):
            return None
        if leaf == _WH:
            raise LayerError(f"{what}: a whiteout without a name")
        return comps[:-1], leaf[len(_WH) :]
    if not (0 <= info.uid < 1 << 32 and 0 <= info.gid < 1 << 32):
        raise LayerError(f"{what}: owner {info.uid}:{info.gid} out of range")
    if info.size < 0:
        raise LayerError(f"{what}: a negative size")
    perms = info.mode & 0o7777
    xattrs = _xattrs(info.pax_headers, what)
    mtime = _mtime_ns(info)
    if info.type in _FILE_TYPES:
        st = TarStat(stat.S_IFREG | perms, info.uid, info.gid, 0, info.size, mtime)
        return _Member(comps, name, st, xattrs, region=Region(b"", 0, info.size))
    if info.type == tarfile.LNKTYPE:
        link = _components(_b(info.linkname), what, "hard link target")
        return _Member(comps, name, TarStat(0), [], link=link)
    bits = _TYPE_BITS.get(info.type)
    if bits is None:
        raise LayerError(f"{what}: unsupported tar member type {info.type!r}")
    rdev = 0
    if bits in (stat.S_IFCHR, stat.S_IFBLK):
        major, minor = info.devmajor, info.devminor
        if not device_in_range(major, minor):
            raise LayerError(
                f"{what}: device {major}:{minor} out of range (Linux allows majors up to"
                f" {MAX_MAJOR} and minors up to {MAX_MINOR})"
            )
        rdev = os.makedev(major, minor)
    target = None
    size = 0
    if bits == stat.S_IFLNK:
        target = _b(info.linkname)
        if not target:
            raise LayerError(f"{what}: a symlink with an empty target")
        if b"\0" in target:
            raise LayerError(f"{what}: a symlink target with a NUL byte")
        if len(target) >= PATH_MAX:
            raise LayerError(f"{what}: a symlink target longer than {PATH_MAX - 1} bytes")
        size = len(target)
        perms = 0o777  # what lstat shows for every symlink on Linux, whatever tar says
    st = TarStat(bits | perms, info.uid, info.gid, rdev, size, mtime)
    return _Member(comps, name, st, xattrs, target=target)


def _mtime_ns(info: tarfile.TarInfo) -> int:
    """The member's mtime in ns: the pax record's exact decimal when there is one."""
    text = info.pax_headers.get("mtime")
    if text:
        whole, _, frac = text.strip().partition(".")
        if whole.lstrip("-").isdigit() and (not frac or frac.isdigit()):
            sign = -1 if whole.startswith("-") else 1
            ns = int(whole.lstrip("-")) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
            return sign * ns
    return int(info.mtime) * 1_000_000_000


# -- applying layers ----------------------------------------------------------------


class _Entry:
    """An inode of the merged tree. Hard links are one _Entry in several directories."""

    __slots__ = ("children", "region", "st", "target", "where", "xattrs")

    def __init__(
        self,
        st: TarStat,
        where: bytes,
        xattrs: list[tuple[bytes, bytes]],
        region: Region | None = None,
        target: bytes | None = None,
    ) -> None:
        self.st = st
        self.where = where
        self.xattrs = xattrs
        self.region = region
        self.target = target
        self.children: dict[bytes, _Entry] | None = {} if stat.S_ISDIR(st.st_mode) else None


class _Merger:
    def __init__(self) -> None:
        self.root = _Entry(_IMPLIED_DIR, b"/", [])

    def _dir(self, comps: tuple[bytes, ...], create: bool, what: str) -> _Entry | None:
        """The directory at ``comps``, following symlinks inside the tree. With
        ``create``, missing directories are implied; else None if there is none."""
        stack = [self.root]
        todo = list(reversed(comps))
        hops = 0
        while todo:
            c = todo.pop()
            if c in (b"", b"."):
                continue
            if c == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            children = stack[-1].children
            assert children is not None
            child = children.get(c)
            if child is None:
                if not create:
                    return None
                child = children[c] = _Entry(_IMPLIED_DIR, os.fsencode(what), [])
            if child.children is not None:
                stack.append(child)
            elif child.target is not None:
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise LayerError(f"{what}: too many levels of symbolic links")
                if child.target.startswith(b"/"):
                    del stack[1:]
                todo.extend(reversed(child.target.split(b"/")))
            elif create:
                raise LayerError(f"{what}: a parent is not a directory")
            else:
                return None
        return stack[-1]

    def whiteout(self, parent: tuple[bytes, ...], name: bytes | None, what: str) -> None:
        d = self._dir(parent, False, what)
        if d is None:
            return
        assert d.children is not None
        if name is None:
            d.children.clear()  # opaque: the lower layers' contents are hidden
        else:
            d.children.pop(name, None)

    def apply(self, m: _Member, where: str) -> None:
        what = f"{where}: {_show(m.name)}"
        if not m.comps:
            if not stat.S_ISDIR(m.st.st_mode):
                raise LayerError(f"{what}: the root must be a directory")
            self.root.st, self.root.xattrs = m.st, m.xattrs
            return
        parent = self._dir(m.comps[:-1], True, what)
        assert parent is not None and parent.children is not None
        leaf = m.comps[-1]
        existing = parent.children.get(leaf)
        if m.link is not None:
            if not m.link:
                raise LayerError(f"{what}: hard link to the root directory")
            d = self._dir(m.link[:-1], False, what)
            target = d.children.get(m.link[-1]) if d is not None and d.children else None
            if target is None:
                raise LayerError(f"{what}: hard link to a missing path {_show(b'/'.join(m.link))}")
            if target.children is not None:
                raise LayerError(f"{what}: hard link to a directory")
            parent.children[leaf] = target
            return
        if stat.S_ISDIR(m.st.st_mode) and existing is not None and existing.children is not None:
            existing.st, existing.xattrs = m.st, m.xattrs  # contents stay
            return
        parent.children[leaf] = _Entry(m.st, os.fsencode(what), m.xattrs, m.region, m.target)

    def tree(self) -> Tree:
        """Number the merged tree exactly as builder.walk numbers a directory."""

        def node(ino: Ino, e: _Entry) -> Node:
            return Node(ino, e.where, e.st, [], e.region, list(e.xattrs), e.target)

        root = node(ROOT_INO, self.root)
        nodes = [root]
        first: dict[int, Ino] = {}  # id(_Entry) -> its number, for hard links
        next_ino = ROOT_INO + 1
        stack = [(root, self.root, b"")]
        while stack:
            parent, pentry, ppath = stack.pop()
            assert pentry.children is not None
            subdirs: list[tuple[Node, _Entry, bytes]] = []
            for name in sorted(pentry.children):
                e = pentry.children[name]
                path = ppath + b"/" + name if ppath else name
                if len(path) >= PATH_MAX:  # through symlinked parents, say
                    raise LayerError(
                        f"{os.fsdecode(e.where)}: its path in the image is longer than"
                        f" {PATH_MAX - 1} bytes"
                    )
                ino = Ino(next_ino)
                next_ino += 1
                if e.children is None:
                    seen = first.get(id(e))
                    if seen is not None:
                        parent.entries.append((name, seen))
                        continue
                    first[id(e)] = ino
                n = node(ino, e)
                nodes.append(n)
                parent.entries.append((name, ino))
                if e.children is not None:
                    subdirs.append((n, e, path))
            stack.extend(reversed(subdirs))
        nodes.sort(key=lambda n: n.ino)
        return Tree(nodes, Ino(next_ino - 1))


# -- the whole import ---------------------------------------------------------------


def read_image_tree(
    src_dir: str | os.PathLike[str],
    src_tag: str,
    spool_dir: str | os.PathLike[str],
    progress: Progress | None = None,
    *,
    max_layer_size: int | None = None,
) -> Tree:
    """The merged tree of an OCI image of tar layers, with file contents as regions of
    spool files written into ``spool_dir`` (which must outlive the tree's use).
    ``max_layer_size``: the most a layer may hold uncompressed (see :class:`_Budget`)."""
    source = open_source(Path(src_dir), src_tag)
    spool_root = Path(spool_dir)
    budget = _Budget(spool_root, max_layer_size)
    merger = _Merger()
    for i in range(1, len(source.layers) + 1):
        where = f"{source.name}: layer {i} ({source.layers[i - 1].digest})"
        spool = spool_root / f"layer-{i}.tar"
        _spool_layer(source, i, spool, progress, budget)
        layer = _read_layer(spool, where, spool_root / f"layer-{i}.sparse", budget)
        for parent, name in layer.whiteouts:  # only the lower layers: first
            merger.whiteout(parent, name, where)
        for member in layer.members:
            merger.apply(member, where)
    if progress:
        progress.done()
    return merger.tree()


def _spool_parent(tmp_dir: str | os.PathLike[str] | None) -> str | None:
    """Layers can be large: prefer $TMPDIR, else /var/tmp (a disk, where /tmp is often
    a RAM tmpfs), else Python's default."""
    if tmp_dir is not None:
        return os.fspath(tmp_dir)
    if os.environ.get("TMPDIR"):
        return None
    return "/var/tmp" if os.access("/var/tmp", os.W_OK | os.X_OK) else None


def import_image(
    src_dir: str | os.PathLike[str],
    src_tag: str,
    oci_dir: str | os.PathLike[str],
    tag: str,
    *,
    compress: bool | ZstdOptions = False,
    params: ChunkParams | None = None,
    workers: int | None = None,
    tmp_dir: str | os.PathLike[str] | None = None,
    max_layer_size: int | None = None,
    progress: bool = False,
    mtimes: bool = True,
) -> BuildResult:
    """Import ``src_dir:src_tag`` (an OCI image of tar layers) as ``oci_dir:tag``.

    The result equals ``build`` of the tree that unpacking the image gives. Nothing is
    written to ``oci_dir`` unless every layer was read and checked; the uncompressed
    layers are spooled in a temporary directory (``tmp_dir``, default $TMPDIR or
    /var/tmp) that is removed in every case. A layer may expand to at most
    ``max_layer_size`` bytes (sparse files at their full size), and the spool never
    to more than the free space of its filesystem (less a reserve).
    """
    dest = Path(oci_dir)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest} exists and is not a directory")
    try:
        spool_cm = tempfile.TemporaryDirectory(
            prefix="puzzlefs-import-", dir=_spool_parent(tmp_dir)
        )
    except OSError as e:
        raise LayerError(f"cannot create a spool directory: {e.strerror}") from None
    with spool_cm as spool_dir:
        tree = read_image_tree(
            src_dir,
            src_tag,
            spool_dir,
            Progress("reading layers", enabled=None if progress else False),
            max_layer_size=max_layer_size,
        )
        return build_tree(
            tree,
            dest,
            tag,
            compress=compress,
            params=params,
            workers=workers,
            progress=Progress("building", enabled=None if progress else False),
            mtimes=mtimes,
        )
