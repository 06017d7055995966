"""Running the reference implementation (the Rust ``puzzlefs`` 0.2.0 binary) beside
ours, and comparing trees modulo the reference's own bugs, each named.

The reference's ``extract`` calls chown through symlinks, so it only ever runs inside
a chroot of a scratch directory (:class:`Jail`) that holds copies of the binary and
its libraries, the images and the output: a symlink in an image then resolves inside
the jail, never on the host. Its ``mount`` only reads, and runs as is.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuse"))

from fusehelp import mount_entry, wait_until  # noqa: E402
from treeutil import describe  # noqa: E402

from puzzlefs import build, open_image  # noqa: E402
from puzzlefs.compression import ZstdOptions  # noqa: E402

TIMEOUT = 120

# The reference's bugs a comparison may tolerate, by name.
SETID_CLEARED = "extract clears setuid/setgid (it chowns after chmod)"
CHOWN_THROUGH_SYMLINKS = "extract chowns through symlinks (the target gets the link's owner)"
MOUNT_NLINK_0 = "mount reports nlink 0 for every inode"
MOUNT_RDEV_0 = "mount reports rdev 0 for devices"


@dataclass(frozen=True)
class Built:
    """An image built from ``source`` (by either implementation)."""

    oci: Path
    tag: str
    source: Path
    digest: str = ""  # the manifest's fs-verity digest, as the builder printed it

    @property
    def image(self) -> str:
        return f"{self.oci}:{self.tag}"


def run_reference(binary: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env={**os.environ, "RUST_LOG": "warn"},
    )


def reference_build(
    binary: Path, rootfs: Path, oci: Path, tag: str, *, compress: bool = False, base: str = ""
) -> str:
    """``puzzlefs build`` with the reference; returns the manifest digest it printed."""
    flags = (["-c"] if compress else []) + (["-b", base] if base else [])
    done = run_reference(binary, "build", *flags, rootfs, f"{oci}:{tag}")
    assert done.returncode == 0, done.stderr
    found = re.search(r"puzzlefs image manifest digest: ([0-9a-f]{64})", done.stdout)
    assert found, done.stdout
    return found.group(1)


class Jail:
    """A scratch root for the reference's extract: its binary and the shared libraries
    it loads, copied in (never linked: a chown through a symlink must not reach a host
    file through a shared inode)."""

    def __init__(self, root: Path, binary: Path) -> None:
        self.root = root
        (root / "bin").mkdir(parents=True)
        shutil.copy(binary, root / "bin" / "puzzlefs")
        ldd = subprocess.run(
            ["ldd", str(binary)], capture_output=True, text=True, check=True, timeout=TIMEOUT
        )
        for lib in re.findall(r"(/\S+) \(0x", ldd.stdout):
            dest = root / lib.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lib, dest)  # follows the library's own symlinks: a plain copy

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def extract(self, image_inside: str, dest_inside: str) -> subprocess.CompletedProcess[str]:
        """``chroot JAIL /bin/puzzlefs extract IMAGE DEST`` (paths inside the jail)."""
        return subprocess.run(
            ["chroot", str(self.root), "/bin/puzzlefs", "extract", image_inside, dest_inside],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
            env={**os.environ, "RUST_LOG": "warn"},
        )


@contextlib.contextmanager
def reference_mount(binary: Path, image: str, mountpoint: Path) -> Iterator[Path]:
    """The reference's FUSE mount, in the foreground (its background mode needs a
    syslog daemon), for the ``with`` block; unmounted and reaped afterwards."""
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [str(binary), "mount", "-f", image, str(mountpoint)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    try:
        up = wait_until(lambda: mount_entry(mountpoint) is not None or proc.poll() is not None)
        assert up and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield mountpoint
    finally:
        if mount_entry(mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, timeout=TIMEOUT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        if mount_entry(mountpoint) is not None:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, timeout=TIMEOUT)
        if proc.stderr:
            proc.stderr.close()


def reference_walk_order(root: Path) -> dict[bytes, int]:
    """Each path's position in the reference extract's walk: breadth first, every
    directory's entries sorted by name bytes."""
    order: dict[bytes, int] = {b"": 0}
    queue: deque[bytes] = deque([b""])
    base = os.fsencode(root)
    while queue:
        rel = queue.popleft()
        full = os.path.join(base, rel) if rel else base
        if not stat.S_ISDIR(os.lstat(full).st_mode):
            continue
        for name in sorted(os.listdir(full)):
            child = os.path.join(rel, name) if rel else name
            order[child] = len(order)
            queue.append(child)
    return order


def make_reference_extractable(root: Path) -> list[bytes]:
    """Remove, in place, what the reference's extract cannot get through, and return
    those paths: sockets (it panics: ``todo!()``), and symlinks that are absolute,
    point outside the tree, or point at what its walk has not written yet (it chowns
    through every symlink, and aborts when that finds nothing)."""
    order = reference_walk_order(root)
    base = os.fsencode(root)
    removed = []
    for rel, position in sorted(order.items(), key=lambda item: item[1]):
        full = os.path.join(base, rel)
        st = os.lstat(full)
        if stat.S_ISSOCK(st.st_mode):
            removed.append(rel)
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            resolved = os.path.realpath(full)
            inside = os.path.relpath(resolved, base)
            if (
                target.startswith(b"/")
                or inside.startswith(b"..")
                or not os.path.lexists(resolved)
                or order.get(inside, position + 1) > position
            ):
                removed.append(rel)
    for rel in removed:
        os.unlink(os.path.join(base, rel))
    return removed


def assert_same_tree_but(src: Path, out: Path, *bugs: str) -> None:
    """``out`` is ``src`` exactly, except for what the named reference bugs change."""
    a, b = describe(src), describe(out)
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    if CHOWN_THROUGH_SYMLINKS in bugs:
        base = os.fsencode(src)
        for rel, info in list(a.items()):
            if info["type"] == stat.S_IFLNK:
                target = os.path.relpath(os.path.realpath(os.path.join(base, rel)), base)
                for path in (rel, target if target in a else None):
                    if path is not None:
                        for d in (a, b):
                            d[path].pop("uid", None)
                            d[path].pop("gid", None)
    for d in (a, b):
        for info in d.values():
            if SETID_CLEARED in bugs and info["type"] != stat.S_IFDIR and "mode" in info:
                info["mode"] = info["mode"] & ~0o6000  # type: ignore[operator]
            if MOUNT_NLINK_0 in bugs:
                info.pop("nlink", None)
            if MOUNT_RDEV_0 in bugs:
                info.pop("rdev", None)
    for path in a:
        assert a[path] == b[path], (path, a[path], b[path])


def build_ours(
    trees: dict[str, Path], into: Path, reference: Path, v1: Path, v2: Path
) -> dict[str, Built]:
    """Our builds: each tree plain and ``-c`` (the all-types tree also with 64K frames
    at level 19, which every reader must read too); ``-b`` chains plain and ``-c`` on
    our own base, and on a base the reference built."""
    built: dict[str, Built] = {}
    for name, tree in trees.items():
        variants: list[tuple[str, bool | ZstdOptions]] = [("", False), ("-c", True)]
        if name == "all-types":
            variants.append(("-c-64k-19", ZstdOptions(frame_size=65536, level=19)))
        for suffix, compress in variants:
            oci = into / (name + suffix)
            result = build(tree, oci, "t", compress=compress)
            built[name + suffix] = Built(oci, "t", tree, result.manifest_verity)
    for name, compress, reference_base in [
        ("delta", False, False),
        ("delta-c", True, False),
        ("delta-on-reference-base", False, True),
    ]:
        oci = into / name
        if reference_base:
            reference_build(reference, v1, oci, "v1")
        else:
            build(v1, oci, "v1", compress=compress)
        result = build(v2, oci, "v2", compress=compress, base_tag="v1")
        # A real layer on the base, not the flat image a build on a base may choose.
        assert open_image(oci, "v2").rootfs.layer_count == 2
        built[name] = Built(oci, "v2", v2, result.manifest_verity)
    return built
