"""Write an image's tree into a directory.

Safety: every entry is created relative to its parent directory's file descriptor,
with O_NOFOLLOW/O_EXCL, so nothing in the image (a `..` name, a symlink planted
before a file of the same path, a hard link to a path outside) can make us write
outside the destination. Names are checked to be single path components; a
directory met twice (a loop) is refused.

Order: contents, then owners, then modes (chown clears setuid/setgid); directory
modes last, deepest first, so a read-only directory can still be filled.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from puzzlefs._limits import MAX_MAJOR, MAX_MINOR, device_in_range
from puzzlefs.errors import ExtractError, MetadataError, one_line
from puzzlefs.format import Inode, Kind
from puzzlefs.progress import Progress
from puzzlefs.reader import Image, is_valid_name

__all__ = ["ExtractStats", "extract"]

_PROC_FD = os.path.isdir("/proc/self/fd")
_ZERO_BLOCK = 64 * 1024
_ZEROS = bytes(_ZERO_BLOCK)


@dataclass
class ExtractStats:
    files: int = 0
    dirs: int = 0
    bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def extract(
    image: Image,
    dest: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    owners: bool | None = None,
) -> ExtractStats:
    """Extract ``image`` into ``dest``, which must not exist or be an empty directory.

    ``owners`` (default: when running as root) restores uid/gid. On any failure or
    interruption nothing is left: what was written is removed again (and ``dest``
    itself, if this call made it), before the error goes on.
    """
    dest_path = Path(dest)
    if owners is None:
        owners = os.geteuid() == 0
    made = not os.path.lexists(dest_path)
    try:
        dest_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExtractError(f"cannot create {dest_path}: {e.strerror}") from None
    if not dest_path.is_dir() or dest_path.is_symlink():
        raise ExtractError(f"{dest_path} is not a directory")
    if any(dest_path.iterdir()):
        raise ExtractError(f"{dest_path} is not empty")
    try:
        return _Extractor(image, dest_path, owners, progress).run()
    except BaseException:
        _remove_written(dest_path, made)
        raise


def _remove_written(dest: Path, made: bool) -> None:
    """Undo a failed extraction. rmtree works through directory descriptors and never
    follows a symlink; a directory already given a read-only mode is opened up and
    tried again."""
    with contextlib.suppress(OSError):
        os.chmod(dest, 0o700)
    if made:
        _rmtree(str(dest))
        return
    with os.scandir(dest) as it:
        for entry in list(it):
            if entry.is_dir(follow_symlinks=False):
                _rmtree(entry.path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _rmtree(path: str) -> None:
    def opened_up(func: object, failed: str, exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
                _rmtree(failed)
            else:
                os.unlink(failed)

    shutil.rmtree(path, onerror=opened_up)


class _Extractor:
    def __init__(self, image: Image, dest: Path, owners: bool, progress: Progress | None):
        self.image = image
        self.dest = dest
        self.owners = owners
        self.progress = progress
        self.stats = ExtractStats()
        self.links: dict[int, bytes] = {}  # ino -> relative path of its first entry
        self.dir_modes: list[tuple[bytes, Inode]] = []

    def run(self) -> ExtractStats:
        root = self.image.root
        self.root_fd = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            seen: set[int] = {root.ino}
            stack: list[tuple[bytes, Inode]] = [(b"", root)]
            self.dir_modes.append((b"", root))
            while stack:
                path, inode = stack.pop()
                subdirs = self._fill_dir(path, inode, seen)
                stack.extend(reversed(subdirs))
            for path, inode in reversed(self.dir_modes):
                self._finish_dir(path, inode)
        finally:
            os.close(self.root_fd)
        if self.progress:
            self.progress.done()
        return self.stats

    def _open_dir(self, path: bytes) -> int:
        if not path:
            return os.dup(self.root_fd)
        # Every component is a directory this run created (names are single components,
        # unique per directory), so resolving the path cannot meet a symlink.
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.root_fd)

    def _fill_dir(self, path: bytes, inode: Inode, seen: set[int]) -> list[tuple[bytes, Inode]]:
        subdirs: list[tuple[bytes, Inode]] = []
        dirfd = self._open_dir(path)
        try:
            for name, child in self.image.listdir(inode):
                if not is_valid_name(name):  # listdir checks too; be explicit here
                    raise MetadataError(f"invalid name {name!r} in the image")
                child_path = path + b"/" + name if path else name
                if child.kind is Kind.DIR:
                    if child.ino in seen:
                        raise MetadataError(f"directory loop at {os.fsdecode(child_path)}")
                    seen.add(child.ino)
                    self._create(
                        dirfd,
                        name,
                        child_path,
                        lambda name=name: os.mkdir(name, 0o700, dir_fd=dirfd),
                    )
                    subdirs.append((child_path, child))
                    self.dir_modes.append((child_path, child))
                    self.stats.dirs += 1
                else:
                    self._entry(dirfd, name, child_path, child)
        finally:
            os.close(dirfd)
        return subdirs

    def _create(self, dirfd: int, name: bytes, path: bytes, make: object) -> None:
        try:
            make()  # type: ignore[operator]
        except FileExistsError:
            raise MetadataError(f"the image lists {os.fsdecode(path)} twice") from None
        except OSError as e:
            raise ExtractError(f"cannot create {os.fsdecode(path)}: {e.strerror}") from None

    def _entry(self, dirfd: int, name: bytes, path: bytes, inode: Inode) -> None:
        first = self.links.get(inode.ino)
        if first is not None:
            self._create(
                dirfd,
                name,
                path,
                lambda: os.link(
                    first, name, src_dir_fd=self.root_fd, dst_dir_fd=dirfd, follow_symlinks=False
                ),
            )
            return
        self.links[inode.ino] = path
        kind = inode.kind
        if kind is Kind.FILE:
            self._file(dirfd, name, path, inode)
            return
        if kind is Kind.LNK:
            target = inode.symlink_target or b""
            self._create(dirfd, name, path, lambda: os.symlink(target, name, dir_fd=dirfd))
        elif kind in (Kind.CHR, Kind.BLK, Kind.FIFO, Kind.SOCK):
            fmt = {
                Kind.CHR: stat.S_IFCHR,
                Kind.BLK: stat.S_IFBLK,
                Kind.FIFO: stat.S_IFIFO,
                Kind.SOCK: stat.S_IFSOCK,
            }[kind]
            dev = 0
            if kind in (Kind.CHR, Kind.BLK):
                if not device_in_range(inode.major, inode.minor):
                    raise ExtractError(
                        f"{os.fsdecode(path)}: device {inode.major}:{inode.minor} is beyond"
                        f" what Linux can create (majors up to {MAX_MAJOR}, minors up to"
                        f" {MAX_MINOR})"
                    )
                dev = os.makedev(inode.major, inode.minor)
            self._create(dirfd, name, path, lambda: os.mknod(name, fmt | 0o600, dev, dir_fd=dirfd))
        else:
            self.stats.warnings.append(f"{os.fsdecode(path)}: skipped inode of unknown type")
            return
        self._metadata(dirfd, name, path, inode, fd=None)

    def _file(self, dirfd: int, name: bytes, path: bytes, inode: Inode) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd: int | None = None

        def make() -> None:
            nonlocal fd
            fd = os.open(name, flags, 0o600, dir_fd=dirfd)

        self._create(dirfd, name, path, make)
        assert fd is not None
        try:
            size = 0
            for piece in self.image.read_all(inode):
                _write_sparse(fd, piece, size)
                size += len(piece)
            os.ftruncate(fd, size)
            self.stats.files += 1
            self.stats.bytes += size
            if self.progress:
                self.progress.add("files")
                self.progress.add("bytes", size)
            self._metadata(dirfd, name, path, inode, fd=fd)
        except OSError as e:
            raise ExtractError(f"cannot write {os.fsdecode(path)}: {e.strerror}") from None
        finally:
            os.close(fd)

    def _metadata(self, dirfd: int, name: bytes, path: bytes, inode: Inode, fd: int | None) -> None:
        # setxattr has no *at() form. For an entry not opened (a symlink, fifo, device
        # or socket: opening would follow it or block), the path goes through the
        # parent's descriptor, and its last component is never followed.
        target: int | bytes = fd if fd is not None else self._entry_path(dirfd, name, path)
        for key, value in inode.xattrs:
            try:
                os.setxattr(target, key, value, follow_symlinks=fd is not None)
            except OSError as e:
                msg = f"{os.fsdecode(path)}: cannot set xattr {os.fsdecode(key)}: {e.strerror}"
                # Linux refuses user.* xattrs on anything but files and directories,
                # for everyone; and without root, trusted.* and security.* too.
                not_here = fd is None and key.startswith(b"user.") and e.errno == errno.EPERM
                if not_here or (
                    e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) and not self.owners
                ):
                    self.stats.warnings.append(msg)
                else:
                    raise ExtractError(msg) from None
        if inode.kind is Kind.LNK:
            if self.owners:
                os.chown(name, inode.uid, inode.gid, dir_fd=dirfd, follow_symlinks=False)
        elif fd is not None:
            if self.owners:
                os.fchown(fd, inode.uid, inode.gid)
            os.fchmod(fd, inode.permissions)
        else:
            if self.owners:
                os.chown(name, inode.uid, inode.gid, dir_fd=dirfd, follow_symlinks=False)
            os.chmod(name, inode.permissions, dir_fd=dirfd)
        if self.image.times is not None:  # last: nothing changes the entry after this
            ns = self.image.mtime_ns(inode)
            if fd is not None:
                os.utime(fd, ns=(ns, ns))
            else:
                os.utime(name, ns=(ns, ns), dir_fd=dirfd, follow_symlinks=False)

    def _entry_path(self, dirfd: int, name: bytes, path: bytes) -> bytes:
        if _PROC_FD:
            return b"/proc/self/fd/%d/%s" % (dirfd, name)
        # No /proc (a bare chroot): every directory on the way was made by this run.
        return os.path.join(os.fsencode(self.dest), path)

    def _finish_dir(self, path: bytes, inode: Inode) -> None:
        fd = self._open_dir(path)
        try:
            self._metadata(fd, b"", path, inode, fd=fd)
        finally:
            os.close(fd)


def _write_sparse(fd: int, data: bytes, offset: int) -> None:
    """Write ``data`` at ``offset``, leaving holes where whole blocks are zero."""
    mv = memoryview(data)
    n = len(mv)
    pos = 0
    while pos < n:
        block = mv[pos : pos + _ZERO_BLOCK]
        if len(block) == _ZERO_BLOCK and block == _ZEROS:
            pos += _ZERO_BLOCK
            continue
        written = os.pwrite(fd, block, offset + pos)
        pos += written


def warn(stats: ExtractStats) -> None:
    for w in stats.warnings:
        print(f"warning: {one_line(w)}", file=sys.stderr)
