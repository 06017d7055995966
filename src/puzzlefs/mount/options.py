"""``-o`` mount options: what each means for a read-only puzzlefs mount."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from puzzlefs.errors import UsageError
from puzzlefs.fuse.kernel import MountFlags
from puzzlefs.mount.mountinfo import SUBTYPE

__all__ = ["MountOptions", "parse_options"]

# VFS flags: option -> (MountFlags attribute, value)
_FLAGS = {
    "suid": ("nosuid", False),
    "nosuid": ("nosuid", True),
    "dev": ("nodev", False),
    "nodev": ("nodev", True),
    "exec": ("noexec", False),
    "noexec": ("noexec", True),
    "atime": ("noatime", False),
    "noatime": ("noatime", True),
    "diratime": ("nodiratime", False),
    "nodiratime": ("nodiratime", True),
}
# Accepted for compatibility, nothing to do: the mount is always read-only, its
# permissions always checked by the kernel, and the kernel caches as much as it can.
_ALWAYS = {
    "ro",
    "default_permissions",
    "relatime",
    "strictatime",
    "lazytime",
    "async",
    "kernel_cache",
    "auto_cache",
    "use_ino",
    "readdir_ino",
}
_REFUSED = {
    "rw": "puzzlefs mounts are read-only; -o rw is not supported (-w adds a writable overlay)",
}


@dataclass
class MountOptions:
    flags: MountFlags
    nonempty: bool = False  # mount over a non-empty directory (ours; libfuse 3 dropped it)
    allow_root: bool = False  # others than the owner are let in by the kernel, root by us


def parse_options(user: Iterable[str], oci_dir: str | os.PathLike[str], tag: str) -> MountOptions:
    """The mount's settings from ``-o`` groups. Defaults: ``ro``, ``nosuid``,
    ``nodev``, ``default_permissions``, ``fsname=OCI_DIR:TAG``, ``subtype=puzzlefs``."""
    flags = MountFlags(source=f"{os.path.abspath(oci_dir)}:{tag}", subtype=SUBTYPE)
    kernel = {"default_permissions"}
    out = MountOptions(flags)
    for group in user:
        for opt in split_options(group):
            if not opt:
                continue
            name, eq, value = opt.partition("=")
            if opt in _REFUSED:
                raise UsageError(_REFUSED[opt])
            if opt in _FLAGS:
                attr, on = _FLAGS[opt]
                setattr(flags, attr, on)
            elif opt in _ALWAYS:
                continue
            elif opt == "nonempty":
                out.nonempty = True
            elif opt == "allow_other":
                kernel.add("allow_other")
            elif opt == "allow_root":
                kernel.add("allow_other")
                out.allow_root = True
            elif eq and name == "fsname":
                flags.source = value
            elif eq and name == "subtype":
                flags.subtype = value
            elif eq and name == "max_read" and value.isdigit():
                kernel.add(opt)
            else:
                raise UsageError(
                    f"unknown mount option {opt!r} (known: ro, suid/nosuid, dev/nodev, "
                    "exec/noexec, atime/noatime, allow_other, allow_root, "
                    "default_permissions, fsname=, subtype=, max_read=, nonempty)"
                )
    for text in (flags.source, flags.subtype):
        if "\0" in text or "\n" in text:
            raise UsageError(f"invalid character in mount option value {text!r}")
    flags.kernel_options = sorted(kernel)
    return out


def split_options(group: str) -> list[str]:
    """Split at commas not escaped with a backslash (libfuse's convention, and
    overlayfs's), unescaping."""
    out, cur, i = [], [], 0
    while i < len(group):
        c = group[i]
        if c == "\\" and i + 1 < len(group):
            cur.append(group[i + 1])
            i += 2
            continue
        if c == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out
