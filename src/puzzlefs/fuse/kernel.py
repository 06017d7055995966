"""Making and removing FUSE mounts: ``mount(2)`` with a /dev/fuse descriptor as root,
``fusermount3`` (which hands the descriptor back over a socket) otherwise."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass, field

from puzzlefs.errors import MountError

__all__ = ["MountFlags", "mount_fuse", "unmount"]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


@dataclass
class MountFlags:
    """A FUSE mount's settings: VFS flags, the fuse filesystem's own options (handed to
    the kernel: default_permissions, allow_other, max_read=...), its source and
    subtype as /proc/self/mountinfo shows them."""

    source: str
    subtype: str
    nosuid: bool = True
    nodev: bool = True
    noexec: bool = False
    noatime: bool = False
    nodiratime: bool = False
    kernel_options: list[str] = field(default_factory=list)

    def vfs_flags(self) -> int:
        flags = MS_RDONLY
        for on, bit in (
            (self.nosuid, MS_NOSUID),
            (self.nodev, MS_NODEV),
            (self.noexec, MS_NOEXEC),
            (self.noatime, MS_NOATIME),
            (self.nodiratime, MS_NODIRATIME),
        ):
            if on:
                flags |= bit
        return flags

    def fusermount_options(self) -> str:
        names = ["ro"]
        names += ["nosuid"] if self.nosuid else ["suid"]
        names += ["nodev"] if self.nodev else ["dev"]
        names += ["noexec"] if self.noexec else ["exec"]
        names += ["noatime"] if self.noatime else []
        names += ["nodiratime"] if self.nodiratime else []
        names += self.kernel_options
        names += [f"fsname={_escape(self.source)}", f"subtype={_escape(self.subtype)}"]
        return ",".join(names)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


def mount_fuse(target: str, flags: MountFlags) -> int:
    """Mount a FUSE filesystem at ``target``; return its /dev/fuse descriptor (the
    kernel then waits for the INIT reply on it)."""
    if os.geteuid() == 0:
        return _mount_as_root(target, flags)
    return _mount_with_fusermount(target, flags)


def _mount_as_root(target: str, flags: MountFlags) -> int:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(
            f"cannot open /dev/fuse: {e.strerror} (is the fuse module loaded?)"
        ) from None
    st = os.stat(target)
    data = ",".join(
        [
            f"fd={fd}",
            f"rootmode={st.st_mode & 0o170000:o}",
            f"user_id={os.geteuid()}",
            f"group_id={os.getegid()}",
            *flags.kernel_options,
        ]
    )
    fstype = f"fuse.{flags.subtype}" if flags.subtype else "fuse"
    if (
        _libc.mount(
            os.fsencode(flags.source),
            os.fsencode(target),
            fstype.encode(),
            flags.vfs_flags(),
            data.encode(),
        )
        != 0
    ):
        err = ctypes.get_errno()
        os.close(fd)
        hint = " (an unknown -o option?)" if err == errno.EINVAL else ""
        raise MountError(f"cannot mount at {target}: {os.strerror(err)}{hint}")
    return fd


def _mount_with_fusermount(target: str, flags: MountFlags) -> int:
    import socket  # only here: a root mount needs neither
    import subprocess

    fusermount = _fusermount()
    if fusermount is None:
        raise MountError("mounting as a user needs fusermount3 (Debian: apt install fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        done = subprocess.run(
            [fusermount, "-o", flags.fusermount_options(), "--", target],
            env={**os.environ, "_FUSE_COMMFD": str(theirs.fileno())},
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        theirs.close()
        if done.returncode != 0:
            said = " ".join(done.stderr.split()).removeprefix(f"{fusermount}: ")
            raise MountError(f"cannot mount at {target}: {said or 'fusermount3 failed'}")
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MountError(f"cannot mount at {target}: fusermount3 sent no descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def unmount(target: str, *, lazy: bool = False) -> None:
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0) != 0:
            err = ctypes.get_errno()
            if err == errno.EBUSY:
                raise MountError(f"{target} is busy (a process is using it)")
            raise MountError(f"cannot unmount {target}: {os.strerror(err)}")
        return
    import subprocess

    fusermount = _fusermount()
    if fusermount is None:
        raise MountError("fusermount3 not found (Debian: apt install fuse3)")
    cmd = [fusermount, "-u", *(["-z"] if lazy else []), "--", target]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = " ".join(done.stderr.split()) or f"{fusermount} failed"
        raise MountError(f"cannot unmount {target}: {said.removeprefix(fusermount + ': ')}")


def _fusermount() -> str | None:
    import shutil  # bz2, lzma and more: not for a mount as root

    return shutil.which("fusermount3") or shutil.which("fusermount")
