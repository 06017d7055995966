"""The FUSE kernel protocol (``<linux/fuse.h>``, version 7.38): opcodes, flags and the
layouts of the messages this filesystem reads and writes. The only module that knows
them; everything is little-endian on the machines we run on (the kernel uses host
order: we refuse to start on a big-endian host).
"""

from __future__ import annotations

import struct
import sys

if sys.byteorder != "little":  # pragma: no cover - every supported host is
    raise ImportError("puzzlefs's FUSE layer assumes a little-endian host")

KERNEL_MAJOR = 7
KERNEL_MINOR = 38  # the layouts below are this version's (and every older one's)
ROOT_ID = 1

# Opcodes.
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51

OPCODE_NAMES = {
    value: name.lower()
    for name, value in list(globals().items())
    if name.isupper()
    and isinstance(value, int)
    and name not in ("KERNEL_MAJOR", "KERNEL_MINOR", "ROOT_ID")
}

# Requests that change the filesystem: a read-only image answers EROFS.
WRITING = frozenset(
    {
        SETATTR,
        SYMLINK,
        MKNOD,
        MKDIR,
        UNLINK,
        RMDIR,
        RENAME,
        LINK,
        WRITE,
        SETXATTR,
        REMOVEXATTR,
        CREATE,
        FALLOCATE,
        RENAME2,
        COPY_FILE_RANGE,
        TMPFILE,
    }
)
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags (fuse_init_in.flags / fuse_init_out.flags).
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25

# fuse_open_out.open_flags.
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

# Sizes the kernel insists on.
MIN_READ_BUFFER = 8192
MIN_MAX_WRITE = 4096

# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# struct fuse_out_header: len, error (negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")
# struct fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec,
# ctimensec, mode, nlink, uid, gid, rdev, blksize, flags (the times are u64 in the
# header and signed to the kernel: packed signed, so times before 1970 pass)
_ATTR = "QQQqqqIIIIIIIIII"
ATTR_SIZE = struct.calcsize("<" + _ATTR)
# struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec,
# attr_valid_nsec, attr
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR)
# struct fuse_attr_out: attr_valid, attr_valid_nsec, dummy, attr
ATTR_OUT = struct.Struct("<QII" + _ATTR)
# struct fuse_open_out: fh, open_flags, padding
OPEN_OUT = struct.Struct("<QII")
# struct fuse_init_in: major, minor, max_readahead, flags (flags2 and more follow on 7.36+)
INIT_IN = struct.Struct("<IIII")
# struct fuse_init_out: major, minor, max_readahead, flags, max_background,
# congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
# struct fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
# struct fuse_getxattr_in (size, padding) and fuse_getxattr_out (size, padding)
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
# struct fuse_forget_in (nlookup); fuse_batch_forget_in (count, dummy)
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
# struct fuse_dirent: ino, off, namelen, type; then the name, padded to 8 bytes
DIRENT = struct.Struct("<QQII")
# struct fuse_direntplus: an entry_out, then a dirent (the name follows, padded to 8)
DIRENTPLUS = struct.Struct("<QQQQII" + _ATTR + "QQII")
# struct fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize,
# padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
# struct fuse_interrupt_in: unique
INTERRUPT_IN = struct.Struct("<Q")


def dirent_size(name_len: int, plus: bool) -> int:
    """Bytes one entry takes in a READDIR(PLUS) reply (8-byte aligned)."""
    base = (ENTRY_OUT.size if plus else 0) + DIRENT.size + name_len
    return (base + 7) & ~7
