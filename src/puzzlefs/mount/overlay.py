"""Writable mounts: overlayfs over the read-only image, as the reference's ``-w`` and
``-p UPPERDIR`` make them.

The image is mounted with FUSE on a directory of our own (``lower``), and overlayfs
on the mountpoint takes it as its lower layer. ``-w`` gives the overlay a temporary
upper and work directory beside ``lower``, removed again by ``umount``; ``-p UPPERDIR``
keeps the changes in UPPERDIR across mounts (its work directory, which overlayfs needs
on the same filesystem, sits beside it as ``.NAME.puzzlefs-work``). A small state
directory (``$PUZZLEFS_RUN_DIR``, default /var/tmp: an upper layer can grow large, so
not a RAM-backed /run) holds ``lower`` and a record of what belongs to the mount, so
that ``puzzlefs umount MOUNTPOINT`` takes both layers down and cleans up.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from puzzlefs.errors import MountError
from puzzlefs.fuse.kernel import MountFlags, unmount
from puzzlefs.mount.mountinfo import MountInfo, find_mount
from puzzlefs.mount.options import split_options

__all__ = ["Overlay", "is_puzzlefs_overlay", "mount_overlay", "prepare", "teardown"]

RECORD = "puzzlefs-overlay.json"
_libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]


@dataclass(frozen=True)
class Overlay:
    state: Path  # ours: holds lower (and, for -w, upper and work) and the record
    lower: Path
    upper: Path
    work: Path
    temporary: bool  # -w: upper and work go with the mount


def _run_dir() -> Path:
    return Path(os.environ.get("PUZZLEFS_RUN_DIR") or "/var/tmp")


def prepare(persist: str | None) -> Overlay:
    """Check that an overlay can be made here, and make its directories."""
    if os.geteuid() != 0:
        raise MountError("a writable mount (-w, -p) needs root: overlayfs mounts are root's")
    if not _has_overlayfs():
        raise MountError("overlayfs is not available in this kernel (try: modprobe overlay)")
    try:
        state = Path(tempfile.mkdtemp(prefix="puzzlefs-overlay-", dir=_run_dir()))
    except OSError as e:
        raise MountError(f"cannot make a state directory in {_run_dir()}: {e.strerror}") from None
    lower = state / "lower"
    if persist is None:
        upper, work, temporary = state / "upper", state / "work", True
    else:
        upper = Path(os.path.abspath(persist))
        work = upper.parent / f".{upper.name}.puzzlefs-work"
        temporary = False
    overlay = Overlay(state, lower, upper, work, temporary)
    try:
        lower.mkdir()
        upper.mkdir(parents=True, exist_ok=True)
        work.mkdir(exist_ok=True)
        if not upper.is_dir() or upper.is_symlink():
            raise MountError(f"{persist} is not a directory")
        if os.stat(upper).st_dev != os.stat(work).st_dev:
            raise MountError(f"{work} and {upper} must be on one filesystem")
        record = {"upper": str(upper), "work": str(work), "temporary": temporary}
        (state / RECORD).write_text(json.dumps(record))
    except OSError as e:
        discard(overlay)
        raise MountError(f"cannot prepare the writable layer: {e.strerror}: {e.filename}") from None
    except MountError:
        discard(overlay)
        raise
    return overlay


def _has_overlayfs() -> bool:
    with contextlib.suppress(OSError), open("/proc/filesystems") as f:
        if any(line.split()[-1] == "overlay" for line in f if line.strip()):
            return True
    return os.path.isdir("/sys/module/overlay")


def _escape(path: Path) -> str:
    # overlayfs splits its options at commas and lowerdir at colons.
    text = str(path)
    return text.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def mount_overlay(overlay: Overlay, target: str, flags: MountFlags) -> None:
    data = (
        f"lowerdir={_escape(overlay.lower)},upperdir={_escape(overlay.upper)},"
        f"workdir={_escape(overlay.work)}"
    )
    vfs = flags.vfs_flags() & ~1  # the overlay is writable: everything but MS_RDONLY
    if _libc.mount(b"puzzlefs-overlay", os.fsencode(target), b"overlay", vfs, data.encode()) != 0:
        err = ctypes.get_errno()
        raise MountError(f"cannot mount the writable overlay at {target}: {os.strerror(err)}")


def discard(overlay: Overlay) -> None:
    """Remove what prepare made (nothing may be mounted on it any more)."""
    if overlay.temporary:
        shutil.rmtree(overlay.state, ignore_errors=True)
        return
    shutil.rmtree(overlay.work, ignore_errors=True)
    shutil.rmtree(overlay.state, ignore_errors=True)


def _state_of(info: MountInfo) -> Overlay | None:
    """The overlay record of a mount, if it is one of ours."""
    opts = dict(o.partition("=")[::2] for o in split_options(info.options))
    lowers = opts.get("lowerdir")
    if info.fstype != "overlay" or lowers is None:
        return None
    lower = Path(lowers.split(":")[0])
    state = lower.parent
    try:
        record = json.loads((state / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or lower.name != "lower":
        return None
    return Overlay(
        state, lower, Path(record["upper"]), Path(record["work"]), bool(record["temporary"])
    )


def is_puzzlefs_overlay(info: MountInfo) -> bool:
    return _state_of(info) is not None


def teardown(info: MountInfo) -> None:
    """``umount`` of a writable mount: the overlay, then the image under it, then our
    directories (a -p upper stays)."""
    overlay = _state_of(info)
    assert overlay is not None
    try:
        unmount(info.mountpoint)
    except MountError as e:
        raise MountError(f"{e} (the writable layer stays mounted)") from None
    lower = find_mount(overlay.lower)
    if lower is not None:
        try:
            unmount(str(overlay.lower))
        except MountError as e:
            if "busy" not in str(e):
                raise
            unmount(str(overlay.lower), lazy=True)
    discard(overlay)
