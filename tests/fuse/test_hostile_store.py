"""A mount over a store whose chunk blobs are not what they claim (issue 11, item 5):
a FIFO, a link to /dev/zero, a 3 GB sparse file. The file that needs the blob gives
EIO at once; the daemon is not blocked, and every other file still reads."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from fusehelp import MountFn
from fuzz.layout import CaseLayout, copy_layout
from fuzz.mutate import make_kind
from fuzz.seeds import build_seeds

from puzzlefs.format import Kind, Rootfs


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-link", "sparse-3g", "device"])
def test_bad_chunk_blob_fails_only_its_file(mount: MountFn, tmp_path: Path, kind: str) -> None:
    seeds = build_seeds(tmp_path / "seeds")
    copy_layout(seeds["plain"].oci, tmp_path / "oci")
    case = CaseLayout(tmp_path / "oci", "t")
    rootfs = case.rootfs()
    by_ino = {i.ino: i for i in rootfs.layers[0]}
    root = by_ino[1]
    a = by_ino[next(e.ino for e in root.entries if e.name == b"a")]
    multi = by_ino[next(e.ino for e in a.entries if e.name == b"multi")]
    assert multi.kind is Kind.FILE
    bad = multi.chunks[0].blob.digest.hex()
    make_kind(case.blobs / bad, kind)
    with mount(f"{case.path}:t") as m:
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            (m.path / "a" / "multi").read_bytes()
        assert info.value.errno == errno.EIO
        assert time.monotonic() - start < 10, "the read waited on the blob"
        assert (m.path / "a" / "small").read_bytes() == b"small file\n"
        assert (m.path / "a" / "deep" / "er" / "text").read_bytes() == b"text " * 3000
        assert sorted(os.listdir(m.path / "a")) == ["deep", "multi", "small", "zeros"]
        log = m.log_text()
        assert bad in log
        assert ("more than it can be" if kind == "sparse-3g" else "not a regular file") in log


def _bad_fields(rootfs: Rootfs) -> set[bytes]:
    """Give some inodes fields Linux cannot represent; return their names at the root."""
    by_ino = {i.ino: i for i in rootfs.layers[0]}
    root = by_ino[1]
    names = {e.ino: e.name for e in root.entries}
    spoiled: set[bytes] = set()
    for inode in rootfs.layers[0]:
        if inode.ino not in names:
            continue
        if inode.kind is Kind.CHR and not spoiled & {b"chr"}:
            inode.major = 1 << 32
            spoiled.add(names[inode.ino])
        elif inode.kind is Kind.LNK and len(spoiled) < 3:
            inode.symlink_target = b"a\0b"
            spoiled.add(names[inode.ino])
    return spoiled


def test_bad_inodes_are_hidden_and_the_rest_served(mount: MountFn, tmp_path: Path) -> None:
    """The mount hides only the entries whose inodes it cannot represent (issue 11,
    item 6), says so in its log, and serves everything else."""
    seeds = build_seeds(tmp_path / "seeds")
    copy_layout(seeds["plain"].oci, tmp_path / "oci")
    case = CaseLayout(tmp_path / "oci", "t")
    rootfs = case.rootfs()
    before = {e.name for e in rootfs.layers[0][0].entries}
    spoiled = _bad_fields(rootfs)
    assert spoiled
    case.set_rootfs_obj(rootfs)
    with mount(f"{case.path}:t") as m:
        listed = {os.fsencode(n) for n in os.listdir(m.path)}
        assert listed == before - spoiled
        for name in spoiled:
            with pytest.raises(FileNotFoundError):
                os.lstat(os.path.join(os.fsencode(m.path), name))
        assert (m.path / "a" / "small").read_bytes() == b"small file\n"
