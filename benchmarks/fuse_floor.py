#!/usr/bin/env python3
"""The least a pyfuse3 filesystem can do to answer metadata requests: a floor for the mount.

Walks a directory tree (the source tree of an image) before mounting and serves it
from ready-made replies held in dicts: lookup, getattr, opendir/readdir(plus)/
releasedir, readlink, getxattr/listxattr (ENODATA where the tree has none, as puzzlefs
answers), statfs; no decoding, no caches, no error handling. It runs the same pyfuse3 +
trio loop with the same options as today's ``puzzlefs mount`` (one task, ``ro``,
``default_permissions``, entry and attribute timeouts of a year), so what a workload
costs through this mount is the binding's and the kernel's share alone. File contents
are not served. The replies come from the directory, not from a puzzlefs image, so the
floor does not depend on the adapter it is the floor of; the tree is the same.

``--counts FILE`` writes, when unmounted, how many requests of each kind reached the
handlers (JSON), so a workload's time divides into microseconds per request;
``benchmarks/mount.py`` also counts them in the kernel (tracefs), for every FUSE peer.
``--tasks N`` runs pyfuse3 with N tasks (today's mount: 1).

Runs in the foreground until unmounted:

    python3 benchmarks/fuse_floor.py TREE MOUNTPOINT [--counts FILE] [--tasks N]
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import stat
import sys
from collections.abc import Sequence

import pyfuse3
import trio

TIMEOUT = 365 * 24 * 3600.0  # as puzzlefs mount: the tree never changes
ENOATTR = getattr(pyfuse3, "ENOATTR", errno.ENODATA)


class Floor(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: str) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.attrs: dict[int, pyfuse3.EntryAttributes] = {}
        self.listings: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self.names: dict[int, dict[bytes, pyfuse3.EntryAttributes]] = {}
        self.links: dict[int, bytes] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        numbers: dict[tuple[int, int], int] = {}  # hard links share an inode number
        root = os.fsencode(tree)

        def entry(path: bytes) -> pyfuse3.EntryAttributes:
            st = os.lstat(path)
            ino = numbers.setdefault((st.st_dev, st.st_ino), len(numbers) + 1)
            if ino in self.attrs:
                return self.attrs[ino]
            e = pyfuse3.EntryAttributes()
            e.st_ino = ino
            e.entry_timeout = e.attr_timeout = TIMEOUT
            for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size"):
                setattr(e, name, getattr(st, name))
            e.st_blksize, e.st_blocks = st.st_blksize, st.st_blocks
            self.attrs[ino] = e
            if stat.S_ISLNK(st.st_mode):
                self.links[ino] = os.readlink(path)
            else:
                keys = os.listxattr(path, follow_symlinks=False)
                if keys:
                    self.xattrs[ino] = {
                        os.fsencode(k): os.getxattr(path, k, follow_symlinks=False) for k in keys
                    }
            return e

        todo = [(root, entry(root))]
        while todo:
            path, parent = todo.pop()
            listing = []
            with os.scandir(path) as it:
                for d in sorted(it, key=lambda d: d.name):
                    child = entry(d.path)
                    listing.append((d.name, child))
                    if d.is_dir(follow_symlinks=False):
                        todo.append((d.path, child))
            self.listings[parent.st_ino] = listing
            self.names[parent.st_ino] = dict(listing)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counts["getattr"] += 1
        return self.attrs[inode]

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self.counts["lookup"] += 1
        entry = self.names[parent_inode].get(name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self.counts["readlink"] += 1
        return self.links[inode]

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self.counts["getxattr"] += 1
        value = self.xattrs.get(inode, {}).get(name)
        if value is None:
            raise pyfuse3.FUSEError(ENOATTR)
        return value

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        self.counts["listxattr"] += 1
        return list(self.xattrs.get(inode, {}))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.counts["opendir"] += 1
        return inode  # the handle is the directory's inode: nothing to keep per open

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.counts["readdir"] += 1
        listing = self.listings[fh]
        for i in range(start_id, len(listing)):
            name, attrs = listing[i]
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self.counts["releasedir"] += 1

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.counts["forget"] += 1

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        self.counts["statfs"] += 1
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_files = len(self.attrs)
        s.f_namemax = 255
        return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("tree")
    ap.add_argument("mountpoint")
    ap.add_argument("--counts", help="write the request counts here (JSON) when unmounted")
    ap.add_argument("--tasks", type=int, default=1, help="pyfuse3 tasks (puzzlefs mount: 1)")
    args = ap.parse_args()
    ops = Floor(args.tree)
    options = {"ro", "default_permissions", "fsname=fuse-floor", "subtype=floor"}
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(lambda: pyfuse3.main(min_tasks=args.tasks, max_tasks=args.tasks))
    finally:
        pyfuse3.close(unmount=True)
        if args.counts:
            with open(args.counts, "w") as f:
                json.dump(dict(sorted(ops.counts.items())), f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
