"""Make source trees for tests, and compare two trees in every detail the format keeps."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import stat
from pathlib import Path


def shared_dir() -> Path | None:
    env = os.environ.get("PUZZLEFS_SHARED")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" for p in here.parents]
    for c in candidates:
        if (c / "vectors").is_dir():
            return c
    return None


MAX_CHUNK = 256 * 1024


def _write(path: Path, data: bytes, mode: int | None = None) -> None:
    path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)


def make_all_types_tree(root: Path, seed: int = 1) -> None:
    """Every inode type and the edge cases of issue 2. Needs root (devices, chown)."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    # Names starting with "0" come first in the stream: all-zero data cuts at the maximum
    # chunk size, so these end exactly on, and just past, a chunk boundary.
    _write(root / "00-exact", bytes(MAX_CHUNK))
    _write(root / "01-past", bytes(MAX_CHUNK + 1))
    _write(root / "empty", b"")
    _write(root / "one", b"x")
    _write(root / "random-5M", rng.randbytes(5 * 1024 * 1024))
    _write(root / "text", b"hello puzzlefs\n" * 1000)
    _write(root / "dup-a", b"same content " * 5000)
    _write(root / "dup-b", b"same content " * 5000)
    with open(root / "sparse", "wb") as f:
        f.seek(3 * 1024 * 1024)
        f.write(b"end of a sparse file")
    os.fsync(os.open(root, os.O_RDONLY))
    # names
    (root / "names").mkdir()
    _write(root / "names" / os.fsdecode(b"non-utf8-\xff\xfe"), b"bytes")
    _write(root / "names" / ("n" * 255), b"long name")
    _write(root / "names" / "new\nline", b"newline")
    _write(root / "names" / "space and ünïcødé", b"unicode")
    # deep nesting
    deep = root / "deep"
    for i in range(60):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    _write(deep / "bottom", b"deep file")
    # links
    (root / "links").mkdir()
    _write(root / "links" / "target", b"link target")
    os.symlink("target", root / "links" / "rel")
    os.symlink("/etc/nonexistent/absolute", root / "links" / "abs-dangling")
    os.symlink("../names", root / "links" / "dirlink")
    (root / "hard").mkdir()
    _write(root / "hard" / "first", b"hard linked " * 3000, 0o640)
    os.link(root / "hard" / "first", root / "links" / "second")
    os.link(root / "hard" / "first", root / "third")
    # special files
    (root / "dev").mkdir()
    os.mkfifo(root / "dev" / "fifo", 0o620)
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev" / "loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mknod(root / "dev" / "big-dev", 0o600 | stat.S_IFCHR, os.makedev(4095, 1048575))
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "dev" / "socket"))
    s.close()
    # modes, owners, xattrs
    _write(root / "setuid", b"#!/bin/sh\n", 0o4755)
    _write(root / "setgid", b"#!/bin/sh\n", 0o2711)
    (root / "sticky").mkdir(mode=0o1777)
    os.chmod(root / "sticky", 0o1777)
    (root / "readonly").mkdir()
    _write(root / "readonly" / "inside", b"in a read-only dir", 0o444)
    os.chmod(root / "readonly", 0o555)
    _write(root / "owned", b"owned", 0o600)
    os.chown(root / "owned", 1234, 5678)
    os.chown(root / "dev" / "fifo", 42, 43)
    os.lchown(root / "links" / "rel", 7, 8)
    _write(root / "xattrs", b"x")
    os.setxattr(root / "xattrs", "user.empty", b"")
    os.setxattr(root / "xattrs", "user.binary", bytes(range(256)))
    os.setxattr(root / "xattrs", "user.text", b"value")
    os.setxattr(root / "names", "user.on-dir", b"dir value")
    os.setxattr(root / "setuid", "trusted.root-only", b"t")
    # On SELinux hosts every inode has a label, symlinks and special files included.
    label = b"system_u:object_r:bin_t:s0\0"
    for special in ("links/rel", "dev/fifo", "dev/null", "dev/loop0", "dev/socket"):
        os.setxattr(root / special, "security.selinux", label, follow_symlinks=False)
    os.setxattr(root / "links" / "abs-dangling", "trusted.on-link", b"v", follow_symlinks=False)


def describe(root: Path) -> dict[bytes, dict[str, object]]:
    """Everything the format keeps about each path (times excluded)."""
    out: dict[bytes, dict[str, object]] = {}
    inode_ids: dict[tuple[int, int], bytes] = {}
    root_b = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(root_b):
        dirnames.sort()
        entries = [dirpath] if dirpath == root_b else []
        entries += [os.path.join(dirpath, n) for n in sorted(dirnames + filenames)]
        for path in entries:
            rel = os.path.relpath(path, root_b)
            st = os.lstat(path)
            info: dict[str, object] = {
                "mode": stat.S_IMODE(st.st_mode),
                "type": stat.S_IFMT(st.st_mode),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "xattrs": sorted(
                    (k, os.getxattr(path, k, follow_symlinks=False))
                    for k in os.listxattr(path, follow_symlinks=False)
                ),
            }
            if stat.S_ISREG(st.st_mode):
                info["size"] = st.st_size
                with open(path, "rb") as f:
                    info["sha256"] = hashlib.sha256(f.read()).hexdigest()
                first = inode_ids.setdefault((st.st_dev, st.st_ino), rel)
                info["link_group"] = first
                info["nlink"] = st.st_nlink
            elif stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(path)
                del info["mode"]  # symlink modes are not meaningful on Linux
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = info
    return out


def set_mtimes(root: Path, ns: int = 0) -> None:
    """Give every path under ``root`` (and the root) one modification time."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(ns, ns))


def mtimes(root: Path) -> dict[str, int]:
    """Every path's modification time (ns), the root's included."""
    out = {".": os.lstat(root).st_mtime_ns}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            path = os.path.join(dirpath, n)
            out[os.path.relpath(path, root)] = os.lstat(path).st_mtime_ns
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    da, db = describe(a), describe(b)
    assert sorted(da) == sorted(db), set(da) ^ set(db)
    for path in da:
        assert da[path] == db[path], (path, da[path], db[path])


def point_tag_at_other_manifest(oci: Path, tag: str, other: str) -> None:
    """Tamper with index.json: ``tag`` now names ``other``'s manifest. Every sha256 in
    the store stays consistent; only the fs-verity digest of the manifest can tell."""
    index = json.loads((oci / "index.json").read_text())
    by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    by_tag[tag]["digest"] = by_tag[other]["digest"]
    by_tag[tag]["size"] = by_tag[other]["size"]
    (oci / "index.json").write_text(json.dumps(index))
