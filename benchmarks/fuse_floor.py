#!/usr/bin/env python3
"""The least a pyfuse3 filesystem can do to answer ``find``: a floor for the mount.

Loads an image's whole tree with the puzzlefs reader before mounting, then serves
lookup, getattr and directory listings from ready-made replies held in dicts (no image
decoding, no caches, no error handling), with the same pyfuse3 + trio loop and mount
options as ``puzzlefs mount`` (one task, ``ro``, ``default_permissions``). Whatever
``find`` costs through this mount is the cost of the binding and the kernel round trips
alone; ``benchmarks/mount.py`` times it beside puzzlefs and squashfuse_ll. File
contents are not served.

Runs in the foreground until unmounted:

    python3 benchmarks/fuse_floor.py OCI_DIR:TAG MOUNTPOINT
"""

from __future__ import annotations

import errno
import sys

import pyfuse3
import trio

from puzzlefs.format import Kind
from puzzlefs.oci import parse_image_ref
from puzzlefs.reader import InodeAttr, open_image

TIMEOUT = 365 * 24 * 3600.0


def _entry_attributes(a: InodeAttr) -> pyfuse3.EntryAttributes:
    """The attributes puzzlefs's mount replies with, as pyfuse3 wants them."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = a.ino
    e.entry_timeout = e.attr_timeout = TIMEOUT
    e.st_mode, e.st_nlink, e.st_uid, e.st_gid = a.mode, a.nlink, a.uid, a.gid
    e.st_rdev, e.st_size, e.st_blocks = a.rdev, a.size, a.blocks
    e.st_blksize = 128 * 1024
    return e


class Floor(pyfuse3.Operations):
    def __init__(self, ref: str) -> None:
        super().__init__()
        image = open_image(*parse_image_ref(ref))
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.listings: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self.names: dict[int, dict[bytes, pyfuse3.EntryAttributes]] = {}
        for _, node in image.walk():
            # The very replies puzzlefs mount gives, made once.
            self.attrs[node.ino] = _entry_attributes(image.attr(node))
            if node.kind is Kind.DIR:
                listing = [
                    (name, _entry_attributes(image.attr(c))) for name, c in image.listdir(node)
                ]
                self.listings[node.ino] = listing
                self.names[node.ino] = dict(listing)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs[inode]

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        entry = self.names[parent_inode].get(name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode  # the handle is the directory's inode: nothing to keep per open

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.listings[fh]
        for i in range(start_id, len(listing)):
            name, attrs = listing[i]
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass


def main() -> int:
    ref, mountpoint = sys.argv[1:3]
    options = {"ro", "default_permissions", "fsname=fuse-floor", "subtype=floor"}
    pyfuse3.init(Floor(ref), mountpoint, options)
    try:
        trio.run(lambda: pyfuse3.main(min_tasks=1, max_tasks=1))
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
