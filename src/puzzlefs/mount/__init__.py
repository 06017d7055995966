"""Mounting and unmounting images.

``mount`` checks everything it can before the filesystem goes live (the mountpoint,
the options, the image and its fs-verity chain, the index of its tree) so that errors
reach the user's terminal as one line; :mod:`puzzlefs.mount.daemon` then serves it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from puzzlefs.errors import MountError
from puzzlefs.mount.mountinfo import FSTYPE, MountInfo, canonical, find_mount
from puzzlefs.mount.options import parse_options

if TYPE_CHECKING:
    from puzzlefs.fuse.filesystem import ImageFS
    from puzzlefs.fuse.kernel import MountFlags
    from puzzlefs.fuse.session import Connection
    from puzzlefs.mount import overlay
    from puzzlefs.mount.daemon import MakeFS
    from puzzlefs.oci import ImageLayout
    from puzzlefs.reader._data import ChunkReader

__all__ = [
    "FSTYPE",
    "MountInfo",
    "check_mountpoint",
    "find_mount",
    "mount",
    "umount",
]

# Threads reading the kernel's requests: with one, every request waited for the
# previous reply's wake-ups (an lstat of every file took 2.7x as long); reads are
# still served one at a time (``serial_reads``: see ImageFS). A registry mount serves
# with more, its reads unserialized (a fetch holds its thread for a round trip).
SERVING_THREADS = 2


def check_mountpoint(path: str | os.PathLike[str], *, allow_nonempty: bool = False) -> str:
    """The absolute mountpoint, after refusing anything a mount must not go onto."""
    p = canonical(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(
                f"mountpoint {path} is a dead FUSE mount (transport endpoint is not "
                f"connected); clean it with: puzzlefs umount {path}"
            ) from None
        raise MountError(f"mountpoint {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    existing = find_mount(p)
    if existing is not None:
        raise MountError(
            f"mountpoint {path} is already a mount point ({existing.fstype} from "
            f"{existing.source}); unmount it first"
        )
    if not allow_nonempty:
        try:
            with os.scandir(p) as it:
                nonempty = any(True for _ in it)
        except OSError as e:
            raise MountError(f"mountpoint {path}: {e.strerror}") from None
        if nonempty:
            raise MountError(f"mountpoint {path} is not empty (-o nonempty mounts over it)")
    return p


def mount(
    oci_dir: str | os.PathLike[str],
    tag: str,
    mountpoint: str | os.PathLike[str],
    *,
    verity_digest: str | None = None,
    options: Iterable[str] = (),
    foreground: bool = False,
    init_pipe: str | None = None,
    log_file: str | None = None,
    threads: int = SERVING_THREADS,
    writable: bool = False,
    persist: str | None = None,
    layout: ImageLayout | None = None,
    on_live: Callable[[], None] | None = None,
    serial_reads: bool = True,
) -> None:
    """Mount ``oci_dir:tag`` read-only at ``mountpoint``.

    The image is opened (and with ``verity_digest``, its manifest and rootfs checked
    against the fs-verity chain) and its index loaded or built before anything is
    mounted. Background (default): returns once the mount is live; the daemon logs to
    syslog, or to ``log_file``. Foreground: serves until unmounted or signalled,
    logging to stderr (and to ``log_file`` if given). ``init_pipe``: a FIFO (or file)
    that gets ``s`` once the mount is live, ``f`` if it failed, as the reference
    writes. ``writable`` (or ``persist``, a directory that keeps the changes): an
    overlayfs over the image (:mod:`puzzlefs.mount.overlay`). Raises a
    :class:`~puzzlefs.errors.PuzzleFSError` (nothing left mounted).

    ``layout``: the layout of ``oci_dir`` to read through, if not a plain one (a
    registry's lazy cache, :mod:`puzzlefs.registry`); ``on_live`` is called in the
    serving process once the mount is live (to start its background work there);
    ``serial_reads``: serve one READ at a time (right where data comes from a local
    disk, wrong where a read may wait for a network).
    """
    from puzzlefs.mount import daemon, logs

    notify = daemon.InitPipe(init_pipe)
    layer: overlay.Overlay | None = None
    try:
        opts = parse_options(options, oci_dir, tag)
        target = check_mountpoint(mountpoint, allow_nonempty=opts.nonempty)
        make_fs = _filesystem(
            Path(os.path.abspath(oci_dir)),
            tag,
            verity_digest,
            opts.allow_root,
            layout,
            on_live,
            serial_reads=serial_reads,
        )
        handler = logs.log_handler(log_file, foreground)
        flags = opts.flags
        if writable or persist is not None:
            from puzzlefs.mount import overlay  # shutil and more: for a writable mount only

            layer = overlay.prepare(persist)
            flags = dataclasses.replace(opts.flags, nosuid=False, nodev=False, noexec=False)
        image_at = target if layer is None else str(layer.lower)
        if foreground:
            handlers = [handler, logs.stderr_handler()]
            daemon.serve_foreground(
                make_fs, image_at, flags, notify, threads, handlers,
                on_live=_on_top(layer, target, opts.flags),
                before_unmount=_take_down(layer, target),
            )  # fmt: skip
        else:
            daemon.serve_background(make_fs, image_at, flags, notify, threads, handler)
            if layer is not None:
                try:
                    overlay.mount_overlay(layer, target, opts.flags)
                except BaseException:
                    daemon.force_unmount(image_at)
                    raise
    except BaseException:
        notify.send(b"f")
        if layer is not None and find_mount(layer.lower) is None:
            overlay.discard(layer)
        raise
    finally:
        notify.close()


def _on_top(
    layer: overlay.Overlay | None, target: str, flags: MountFlags
) -> Callable[[], None] | None:
    """Foreground: put the overlay on once the image is live."""
    if layer is None:
        return None
    from puzzlefs.mount import overlay

    return lambda: overlay.mount_overlay(layer, target, flags)


def _take_down(layer: overlay.Overlay | None, target: str) -> Callable[[], None] | None:
    if layer is None:
        return None
    from puzzlefs.mount import daemon

    return lambda: daemon.force_unmount(target)


def _filesystem(
    oci_dir: Path,
    tag: str,
    verity_digest: str | None,
    allow_root: bool,
    layout: ImageLayout | None = None,
    started: Callable[[], None] | None = None,
    *,
    serial_reads: bool = True,
) -> MakeFS:
    """Open the image now (errors are the caller's; with a digest the chain is checked
    before anything is mounted); the filesystem object is made in the process that
    serves it, and its chunk reader on the first read (nothing of it is needed to
    answer INIT, or metadata requests)."""
    from puzzlefs.fuse.filesystem import ImageFS
    from puzzlefs.oci import ImageLayout
    from puzzlefs.reader._open import OpenedImage
    from puzzlefs.reader.index import load_tables

    image = OpenedImage(layout or ImageLayout(oci_dir), tag, verity_digest=verity_digest)
    tables = load_tables(image)
    allow = frozenset({0, os.geteuid()}) if allow_root else None

    def data() -> ChunkReader:
        from puzzlefs.reader._data import ChunkReader

        verity = {digest: v for digest, v in tables.blobs() if v is not None}
        reader = ChunkReader(
            image.layout,
            verity.get,
            verify_verity=image.verify_verity,
            stream=image.chunk_stream,
            zstd_image=image.zstd_image,
        )
        reader.enable_readahead()
        return reader

    def make(on_live: Callable[[Connection], None]) -> ImageFS:
        def live(conn: Connection) -> None:
            if started is not None:
                started()
            on_live(conn)

        return ImageFS(
            tables,
            data,
            stored_bytes=image.stored_chunk_bytes,
            on_live=live,
            allow_uids=allow,
            serial_reads=serial_reads,
        )

    return make


def umount(mountpoint: str | os.PathLike[str]) -> None:
    """Unmount a puzzlefs mount; refuse anything else."""
    from puzzlefs.fuse.kernel import unmount
    from puzzlefs.mount import overlay

    info = find_mount(mountpoint)
    if info is None:
        raise MountError(f"{mountpoint} is not a mount point")
    if overlay.is_puzzlefs_overlay(info):
        overlay.teardown(info)
        return
    if not info.is_puzzlefs:
        raise MountError(
            f"{mountpoint} is not a puzzlefs mount (it is {info.fstype} from {info.source})"
        )
    unmount(info.mountpoint)
