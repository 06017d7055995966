"""Reading the files of a store we do not trust, and writing files whole or not at all.

Reading (:func:`open_regular`, :func:`read_regular`): the files of an OCI layout
(blobs, index.json, oci-layout) are opened without following a final symlink
(O_NOFOLLOW: a blob that is a link to /dev/zero is refused, not read forever), without
blocking (O_NONBLOCK: opening a FIFO would wait for a writer that never comes), and are
refused unless ``fstat`` says they are regular files. Their size is checked against
what they must or may be before a byte is read, so a 3 GB sparse file where a 500-byte
manifest belongs costs one ``fstat``. A directory may still be reached through
symlinks (``blobs/sha256`` may link to a shared store): only the last component is
never followed.

Writing (:class:`AtomicDir`, :func:`atomic_write`, :func:`atomic_output`): every file
the project adds or replaces (blobs, index.json, oci-layout, an exported tar) is written
to an unnamed file (O_TMPFILE) and linked into place once complete, or where the
filesystem cannot, to a temporary file in the same directory renamed into place. A
reader never sees half a file, and a writer killed half-way leaves nothing (or, on the
fallback, a ``.tmp-*`` file that ``gc`` removes). Durable writes fsync the file before
it gets its name and the directory after; blob writes are not durable one by one (the
store flushes the whole filesystem once before index.json makes them reachable).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from puzzlefs.errors import ImageError, UnsafeFile

__all__ = ["AtomicDir", "atomic_output", "atomic_write", "open_regular", "read_regular"]

PathLike = str | bytes | os.PathLike[str]

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# os.read returns at most this much at once (Linux MAX_RW_COUNT).
_MAX_READ = 0x7FFFF000

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: PathLike, what: str, *, dir_fd: int | None = None) -> tuple[int, int]:
    """Open a regular file for reading; return ``(fd, size)``. Raises
    :class:`~puzzlefs.errors.UnsafeFile` for anything else (FileNotFoundError and
    other OSErrors pass through)."""
    try:
        fd = os.open(path, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise UnsafeFile(f"{what} is a symbolic link, not a regular file") from None
        if e.errno == errno.ENXIO:  # a socket, or a FIFO opened for writing
            raise UnsafeFile(f"{what} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"{what} is {_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def check_size(what: str, actual: int, size: int | None, limit: int | None) -> None:
    """``size``: what the file must measure (its descriptor's); ``limit``: the most a
    file of its kind can."""
    if size is not None and actual != size:
        raise ImageError(f"{what}: size {actual}, its descriptor says {size}")
    if limit is not None and actual > limit:
        raise UnsafeFile(f"{what} is {actual} bytes, more than it can be ({limit})")


def read_fd(fd: int, size: int) -> bytes:
    """``size`` bytes from the start of ``fd`` (fewer if the file shrank meanwhile)."""
    if size <= 0:
        return b""
    data = os.pread(fd, min(size, _MAX_READ), 0)
    if len(data) == size or not data:
        return data
    parts = [data]
    done = len(data)
    while done < size:
        more = os.pread(fd, min(size - done, _MAX_READ), done)
        if not more:
            break
        parts.append(more)
        done += len(more)
    return b"".join(parts)


def read_regular(
    path: PathLike,
    what: str,
    *,
    size: int | None = None,
    limit: int | None = None,
    dir_fd: int | None = None,
) -> bytes:
    """The whole contents of a regular file, checked against ``size`` and ``limit``
    (see :func:`check_size`) before reading."""
    fd, actual = open_regular(path, what, dir_fd=dir_fd)
    try:
        check_size(what, actual, size, limit)
        return read_fd(fd, actual)
    finally:
        os.close(fd)


def user_cache_dir(name: str, override: str) -> Path:
    """Our cache directory ``name``: ``$<override>`` if set, else
    ``$XDG_CACHE_HOME/puzzlefs/<name>``, else ``~/.cache/puzzlefs/<name>``."""
    env = os.environ.get(override)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "puzzlefs" / name


# -- writing -------------------------------------------------------------------------

# O_TMPFILE unsupported by the filesystem (EOPNOTSUPP, EISDIR on old kernels, EINVAL),
# or /proc/self/fd missing (ENOENT), not allowed (EACCES, EPERM) or not linkable (EXDEV).
_NO_TMPFILE = frozenset(
    {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EPERM}
    | {errno.EXDEV}
)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class AtomicDir:
    """A directory whose files are written whole or not at all (see the module's
    docstring). Remembers whether its filesystem has O_TMPFILE, so a filesystem
    without it costs one failed call, not one per file."""

    __slots__ = ("path", "unnamed")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.unnamed = True  # O_TMPFILE works here (until it fails once)

    def write(
        self,
        name: str,
        data: bytes | memoryview,
        *,
        keep_existing: bool = False,
        durable: bool = True,
        mode: int = 0o644,
    ) -> bool:
        """Write ``data`` as ``name``. ``keep_existing`` is for content-addressed
        names: a file already there (stored by a racing writer) is kept and False
        returned. Returns True when this call gave ``name`` its file."""
        with self._new_file(name, mode) as (dir_fd, fd, tmp):
            _write_all(fd, data)
            return self._commit(dir_fd, fd, tmp, name, keep_existing, durable, mode)

    @contextlib.contextmanager
    def create(self, name: str, *, durable: bool = True, mode: int = 0o644) -> Iterator[BinaryIO]:
        """A file object whose contents replace ``name`` when the block ends without
        an exception (and are thrown away when it raises)."""
        with self._new_file(name, mode) as (dir_fd, fd, tmp):
            with os.fdopen(fd, "wb", closefd=False) as f:
                yield f
            self._commit(dir_fd, fd, tmp, name, False, durable, mode)

    @contextlib.contextmanager
    def _new_file(self, name: str, mode: int) -> Iterator[tuple[int, int, str | None]]:
        """``(directory fd, file fd, temporary name)`` of a new file for ``name``; the
        file is thrown away if the block raises (before or in its commit)."""
        dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd, tmp = self._open(dir_fd, name, mode)
            try:
                yield dir_fd, fd, tmp
            except BaseException:
                self._discard(dir_fd, tmp)
                raise
            finally:
                os.close(fd)
        finally:
            os.close(dir_fd)

    def _tmp_name(self, name: str) -> str:
        return f".tmp-{name}-{os.getpid()}-{threading.get_ident()}"

    def _open(self, dir_fd: int, name: str, mode: int) -> tuple[int, str | None]:
        """A file to write: unnamed (tmp None), or a temporary name in the directory."""
        if self.unnamed:
            flags = os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC  # RDWR: see _link_unnamed
            try:
                return os.open(".", flags, mode, dir_fd=dir_fd), None
            except OSError as e:
                if e.errno not in _NO_TMPFILE:
                    raise
                self.unnamed = False
        return self._open_named(dir_fd, name, mode)

    def _open_named(self, dir_fd: int, name: str, mode: int) -> tuple[int, str]:
        tmp = self._tmp_name(name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(tmp, flags, mode, dir_fd=dir_fd), tmp
        except FileExistsError:
            # Left by a dead process that had our pid and thread id (a live one with
            # both is us): it is no one's.
            os.unlink(tmp, dir_fd=dir_fd)
            return os.open(tmp, flags, mode, dir_fd=dir_fd), tmp

    def _commit(
        self,
        dir_fd: int,
        fd: int,
        tmp: str | None,
        name: str,
        keep_existing: bool,
        durable: bool,
        mode: int,
    ) -> bool:
        if durable:
            os.fsync(fd)
        os.fchmod(fd, mode)  # whatever the umask
        if tmp is None:
            tmp = self._link_unnamed(dir_fd, fd, name, keep_existing, mode)
            if tmp is None:
                return False  # keep_existing, and it existed
            if tmp == name:
                if durable:
                    os.fsync(dir_fd)
                return True
        try:
            # For keep_existing too: on this path the names are content-addressed, so
            # replacing a racing writer's file replaces it with the same bytes.
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            self._discard(dir_fd, tmp)
            raise
        if durable:
            os.fsync(dir_fd)
        return True

    def _link_unnamed(
        self, dir_fd: int, fd: int, name: str, keep_existing: bool, mode: int
    ) -> str | None:
        """Give the unnamed file ``fd`` a name: with ``keep_existing``, ``name`` itself
        (None if it exists); else the temporary name for the caller to rename. Where
        the link cannot be made (no /proc, a filesystem that refuses it), the bytes
        are copied into a named temporary file instead, and the directory is
        remembered as one without O_TMPFILE."""
        target = name if keep_existing else self._tmp_name(name)
        try:
            # A dir_fd makes Python use linkat(), which can follow the /proc link
            # (plain link() would try to link the symlink itself).
            os.link(f"/proc/self/fd/{fd}", target, dst_dir_fd=dir_fd, follow_symlinks=True)
            return target
        except FileExistsError:
            if keep_existing:
                return None  # another writer stored the same name first
            os.unlink(target, dir_fd=dir_fd)  # a dead process's (as in _open_named)
            os.link(f"/proc/self/fd/{fd}", target, dst_dir_fd=dir_fd, follow_symlinks=True)
            return target
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
        self.unnamed = False
        copy_fd, tmp = self._open_named(dir_fd, name, mode)
        try:
            size = os.fstat(fd).st_size
            done = 0
            while done < size:
                n = os.sendfile(copy_fd, fd, done, size - done)
                if n == 0:
                    raise OSError(errno.EIO, "short copy of an unnamed file")
                done += n
            os.fsync(copy_fd)
            os.fchmod(copy_fd, mode)
        except BaseException:
            self._discard(dir_fd, tmp)
            raise
        finally:
            os.close(copy_fd)
        return tmp

    @staticmethod
    def _discard(dir_fd: int, tmp: str | None) -> None:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` by ``data``, durably (see :class:`AtomicDir`)."""
    p = Path(path)
    AtomicDir(p.parent).write(p.name, data, mode=mode)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A file object that replaces ``path``, durably, when the block succeeds."""
    p = Path(path)
    with AtomicDir(p.parent).create(p.name, mode=mode) as f:
        yield f
