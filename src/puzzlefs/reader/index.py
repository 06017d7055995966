"""The persistent index of an image's tree: its tables (:mod:`puzzlefs.reader._tables`)
kept in a private cache directory, named by the sha256 of the rootfs they come from.

The first mount of an image builds the index from the rootfs; later mounts of any
image with the same rootfs map it in milliseconds. A file is used only if it is ours,
private, of this format version, made from exactly this rootfs (its header names the
rootfs's sha256, which the manifest vouches for, and with ``--digest`` the fs-verity
chain), and its own checksum holds; anything else is rebuilt, never served (with a times blob, the
name and header are of both blobs' digests). The rootfs
stays the authority: the index is derived from it, and rebuilt from it whenever in
doubt. The cache is bounded (least recently used indexes go first).

Where: ``$PUZZLEFS_INDEX_DIR``, else ``$XDG_CACHE_HOME/puzzlefs/index``, else
``~/.cache/puzzlefs/index``. Where it cannot be written, the index lives in memory for
the one mount.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import threading
from pathlib import Path

from puzzlefs.errors import MetadataError
from puzzlefs.reader._open import OpenedImage
from puzzlefs.reader._tables import VERSION, Tables, build_tables, open_tables

__all__ = ["CACHE_BYTES", "index_dir", "load_tables"]

log = logging.getLogger(__name__)

CACHE_BYTES = 2 << 30  # indexes beyond this many bytes: the least recently used go


def index_dir() -> Path:
    env = os.environ.get("PUZZLEFS_INDEX_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "puzzlefs" / "index"


def _path(directory: Path, key_hex: str) -> Path:
    return directory / f"{key_hex}.v{VERSION}"


def source_key(image: OpenedImage) -> bytes:
    """What an index is made from, as one digest: the rootfs's sha256, or with a
    times blob, the sha256 of both sha256s."""
    rootfs = image.rootfs_descriptor.digest.raw
    times = image.manifest.times
    if times is None:
        return rootfs
    return hashlib.sha256(rootfs + times.digest.raw).digest()


def load_tables(image: OpenedImage, *, directory: Path | None = None) -> Tables:
    """The image's tables: the stored index if it is sound, else built (and stored).

    Either way the rootfs (and times blob) must be there and intact: an index is never
    served for a rootfs that is not. They are checked in full (sha256; with a digest,
    the fs-verity chain) unless, without a digest, the very files were checked before
    and have not changed since (same device, inode, size, mtime and ctime: what git's
    index trusts too), which spares a mount reading the whole rootfs. With an index at
    hand, that check and the index's own checksum run side by side.
    """
    where = directory or index_dir()
    key = source_key(image)
    path = _path(where, key.hex())
    seen = _Seen(path.with_name(path.name + ".seen"), image)
    checked: list[BaseException | None] = []

    def check() -> None:
        try:
            image.check_rootfs()
            image.times_bytes()
            checked.append(None)
        except BaseException as e:
            checked.append(e)

    if path.exists():
        known = seen.known() and not image.verify_verity
        thread = None if known else threading.Thread(target=check, name="puzzlefs-check")
        if thread is not None:
            thread.start()
        try:
            tables: Tables | None = open_tables(str(path))
        except (OSError, MetadataError) as e:
            log.warning("index %s is unusable (%s): rebuilding it", path, e)
            tables = None
        if thread is not None:
            thread.join()
            if checked[0] is not None:
                if tables is not None:
                    tables.close()
                raise checked[0]
        if tables is not None:
            if tables.source == key:
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used
                if not known:
                    seen.add()
                return tables
            tables.close()
            log.warning("index %s was made from another rootfs: rebuilding it", path)
    from puzzlefs.format import MANIFEST_VERSION
    from puzzlefs.format._bulk import decode_rootfs

    data = image.rootfs_bytes()
    decoded = decode_rootfs(data, expected_version=MANIFEST_VERSION)
    built = build_tables(decoded, key, image.times_bytes())
    for line in built.problems:
        log.warning("%s:%s: %s", image.layout.path, image.tag, line)
    try:
        _store(where, path, built.data)
        seen.add(fresh=True)
    except OSError as e:
        log.info("cannot keep the index in %s (%s): it lives in memory", where, e.strerror)
        return Tables(built.data)
    try:
        return open_tables(str(path))
    except (OSError, MetadataError):
        return Tables(built.data)


class _Seen:
    """The identities of rootfs (and times) blob files that were checked in full and
    found to be what an index was made from: one line each, beside the index."""

    LIMIT = 64  # lines kept (layouts holding the same rootfs)

    def __init__(self, path: Path, image: OpenedImage) -> None:
        self.path = path
        self.line = _identity(image)

    def _lines(self) -> list[str]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return []
            return os.read(fd, 1 << 16).decode(errors="replace").splitlines()
        finally:
            os.close(fd)

    def known(self) -> bool:
        return self.line is not None and self.line in self._lines()

    def add(self, *, fresh: bool = False) -> None:
        if self.line is None:
            return
        lines = [] if fresh else [x for x in self._lines() if x != self.line]
        lines = (lines + [self.line])[-self.LIMIT :]
        with contextlib.suppress(OSError):
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, self.path)


def _identity(image: OpenedImage) -> str | None:
    """The rootfs and times blob files as the kernel knows them."""
    parts = []
    for desc in (image.rootfs_descriptor, image.manifest.times):
        if desc is None:
            continue
        path = image.layout.blobs.path(desc.digest)
        try:
            st = os.stat(path, follow_symlinks=False)
        except (OSError, TypeError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        parts.append(
            f"{desc.digest.hex}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        )
    return " ".join(parts)


def _store(directory: Path, path: Path, data: bytes) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _evict(directory, keep=path)


def _evict(directory: Path, keep: Path, limit: int = CACHE_BYTES) -> None:
    """Remove the least recently used indexes until the rest fit in ``limit``."""
    entries = []
    with contextlib.suppress(OSError), os.scandir(directory) as it:
        for e in it:
            with contextlib.suppress(OSError):
                if e.is_file(follow_symlinks=False) and not e.name.startswith(".tmp-"):
                    st = e.stat(follow_symlinks=False)
                    entries.append((st.st_mtime, st.st_size, e.path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path != str(keep) and not path.endswith(".seen"):
            with contextlib.suppress(OSError):
                os.unlink(path)
                os.unlink(path + ".seen")
            total -= size
