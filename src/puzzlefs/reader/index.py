"""The persistent index of an image's tree: its tables (:mod:`puzzlefs.reader._tables`)
kept in a private cache directory, named by the sha256 of the rootfs they come from.

The first mount of an image builds the index from the rootfs; later mounts of any
image with the same rootfs map it in milliseconds. A file is used only if it is ours,
private, of this format version, made from exactly this rootfs (its header names the
rootfs's sha256, which the manifest vouches for, and with ``--digest`` the fs-verity
chain), and its own checksum holds; anything else is rebuilt, never served. (With a
times blob, the name and header are of both blobs' digests.) The rootfs stays the
authority: the index is derived from it, and rebuilt from it whenever in doubt. The
cache is bounded (least recently used indexes go first).

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
import sys
import tempfile
import threading
from pathlib import Path

from puzzlefs._files import user_cache_dir
from puzzlefs.errors import (
    BlobNotFound,
    ImageError,
    MetadataError,
    PuzzleFSError,
    UnsupportedVersion,
)
from puzzlefs.reader._open import OpenedImage
from puzzlefs.reader._tables import VERSION, Tables, build_tables, open_tables

__all__ = ["CACHE_BYTES", "index_dir", "load_tables"]

log = logging.getLogger(__name__)

CACHE_BYTES = 2 << 30  # indexes beyond this many bytes: the least recently used go


def index_dir() -> Path:
    return user_cache_dir("index", "PUZZLEFS_INDEX_DIR")


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
    served for a rootfs that is not. They, and the index's own checksum, are checked
    in full (sha256; with a digest, the fs-verity chain) unless, without a digest, the
    very files (the blobs and the index) were checked together before and none has
    changed since: the same device, inode, size, mtime and ctime, which is what git's
    index trusts too. A mount then reads neither the rootfs nor the index up front:
    its pages come in as requests need them, and the mount costs the same at any size.
    """
    where = directory or index_dir()
    key = source_key(image)
    path = _path(where, key.hex())
    seen = _Seen(path.with_name(path.name + ".seen"), image)
    if path.exists():
        tables = _open_sound(image, path, key, seen)
        if tables is not None:
            return tables
    built = _build_elsewhere(image, key, where, path)
    if built is not None:  # kept in memory: the cache cannot be written
        return Tables(built)
    try:
        tables = open_tables(str(path))
    except (OSError, MetadataError) as e:
        raise MetadataError(f"the index just built is unusable: {e}") from None
    seen.add(_file_identity(path))
    return tables


def _open_sound(image: OpenedImage, path: Path, key: bytes, seen: _Seen) -> Tables | None:
    """The stored index, once it and the image's blobs pass their checks; None when
    the index must be built again."""
    index_id = _file_identity(path)
    if not image.verify_verity and index_id is not None and seen.known(index_id):
        try:
            tables = open_tables(str(path), verify=False)  # the header is still checked
        except (OSError, MetadataError) as e:
            log.warning("index %s is unusable (%s): rebuilding it", path, e)
            return None
        if tables.source == key:
            seen.touch()
            return tables
        tables.close()
    checked: list[BaseException | None] = []

    def check() -> None:
        try:
            image.check_rootfs()
            image.times_bytes()
            checked.append(None)
        except BaseException as e:
            checked.append(e)

    thread = threading.Thread(target=check, name="puzzlefs-check")
    thread.start()
    try:
        found: Tables | None = open_tables(str(path))
    except (OSError, MetadataError) as e:
        log.warning("index %s is unusable (%s): rebuilding it", path, e)
        found = None
    thread.join()
    if checked[0] is not None:
        if found is not None:
            found.close()
        raise checked[0]
    if found is None:
        return None
    if found.source != key:
        found.close()
        log.warning("index %s was made from another rootfs: rebuilding it", path)
        return None
    seen.add(index_id)
    return found


def _build_elsewhere(image: OpenedImage, key: bytes, where: Path, path: Path) -> bytes | None:
    """Build the index and store it at ``path``. In a child process where fork is safe,
    so that the memory a build takes (a few hundred MB at 300,000 inodes) is given
    back whole, and a mount daemon forked later never holds it. Returns the index
    bytes instead when it cannot be stored."""
    if threading.active_count() > 1 or not hasattr(os, "fork"):
        return _build_and_store(image, key, where, path)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - seen through its effects
        os.close(r)
        code = 0
        try:
            if _build_and_store(image, key, where, path) is not None:
                os.write(w, b"memory")
        except PuzzleFSError as e:
            os.write(w, f"{type(e).__name__}\n{e}".encode(errors="replace"))
            code = 1
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(w, f"MetadataError\nbuilding the index failed: {e!r}".encode(errors="replace"))
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    if said == b"memory":
        return _build_and_store(image, key, where, path)  # again, here: nowhere to keep it
    if said:
        name, _, message = said.decode(errors="replace").partition("\n")
        raise _ERRORS.get(name, MetadataError)(message)
    return None


_ERRORS: dict[str, type[PuzzleFSError]] = {
    cls.__name__: cls for cls in (MetadataError, UnsupportedVersion, ImageError, BlobNotFound)
}


def _build_and_store(image: OpenedImage, key: bytes, where: Path, path: Path) -> bytes | None:
    from puzzlefs.format import MANIFEST_VERSION
    from puzzlefs.format._bulk import decode_rootfs

    data = image.rootfs_bytes()
    decoded = decode_rootfs(data, expected_version=MANIFEST_VERSION)
    built = build_tables(decoded, key, image.times_bytes())
    for line in built.problems:
        log.warning("%s:%s: %s", image.layout.path, image.tag, line)
    try:
        _store(where, path, built.data)
    except OSError as e:
        log.info("cannot keep the index in %s (%s): it lives in memory", where, e.strerror)
        return built.data
    return None


def _file_identity(path: Path) -> str | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return f"index:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class _Seen:
    """The identities of rootfs (and times) blob files and of the index that were
    checked in full together: one line per layout holding the image, beside the index."""

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

    def known(self, index: str) -> bool:
        """The blobs and the index were checked together, and none changed since."""
        return self.line is not None and f"{self.line} {index}" in self._lines()

    def add(self, index: str | None) -> None:
        if self.line is None or index is None:
            return
        line = f"{self.line} {index}"
        lines = [x for x in self._lines() if not x.startswith(self.line + " ")]
        lines = (lines + [line])[-self.LIMIT :]
        with contextlib.suppress(OSError):
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                f.write("\n".join(lines) + "\n")
            os.replace(tmp, self.path)

    def touch(self) -> None:
        """Recently used (for eviction; the index's own times stay as they are)."""
        with contextlib.suppress(OSError):
            os.utime(self.path)


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
                name = e.name
                if e.is_file(follow_symlinks=False) and not name.startswith(".tmp-"):
                    if name.endswith(".seen"):
                        continue
                    st = e.stat(follow_symlinks=False)
                    used = st.st_mtime
                    with contextlib.suppress(OSError):  # its .seen: when last used
                        used = max(used, os.stat(e.path + ".seen").st_mtime)
                    entries.append((used, st.st_size, e.path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= limit:
            break
        if path != str(keep):
            with contextlib.suppress(OSError):
                os.unlink(path)
                os.unlink(path + ".seen")
            total -= size
