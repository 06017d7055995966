"""The valid images every case starts from: small, but with every inode type, several
chunks per file, xattrs, hard links; plain, compressed (``-c``) and delta (``-b``)."""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from puzzlefs import build
from puzzlefs.chunking import ChunkParams
from puzzlefs.compression import ZstdOptions
from puzzlefs.format import RootfsReader
from puzzlefs.oci import ImageLayout

TAG = "t"
BASE_TAG = "base"
# Small chunks: a few KiB of data already spans several chunks and blobs.
PARAMS = ChunkParams(1024, 4096, 16384)
KINDS = ("plain", "zstd", "delta")


@dataclass(frozen=True)
class Seed:
    kind: str
    oci: Path
    tag: str
    verity: str  # the manifest's fs-verity digest, as build printed it


def make_tree(root: Path, seed: int = 1) -> None:
    rng = random.Random(seed)
    is_root = os.geteuid() == 0
    root.mkdir(parents=True)
    (root / "a" / "deep" / "er").mkdir(parents=True)
    (root / "a" / "small").write_bytes(b"small file\n")
    (root / "a" / "multi").write_bytes(rng.randbytes(40_000))
    (root / "a" / "zeros").write_bytes(bytes(70_000))
    (root / "a" / "deep" / "er" / "text").write_bytes(b"text " * 3000)
    (root / "dup").write_bytes(b"small file\n")
    (root / "empty").write_bytes(b"")
    (root / "empty-dir").mkdir()
    os.link(root / "a" / "multi", root / "hardlink")
    os.symlink("a/small", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.mkfifo(root / "fifo")
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    os.setxattr(root / "a" / "small", "user.note", b"a value")
    os.setxattr(root / "a", "user.dir", b"on a directory")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(root / "socket"))
    s.close()
    if is_root:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "loop", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
        os.chown(root / "a" / "small", 1000, 1000)
        os.setxattr(root / "rel-link", "trusted.link", b"t", follow_symlinks=False)


def _changed_tree(src: Path, dst: Path) -> None:
    """The delta's new version: one file changed, one removed, one added."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # fifos, sockets, links
    (dst / "a" / "deep" / "er" / "text").write_bytes(b"changed text " * 2000)
    (dst / "dup").unlink()
    (dst / "a" / "added").write_bytes(random.Random(9).randbytes(9000))


def build_seeds(work: Path) -> dict[str, Seed]:
    tree = work / "tree"
    if not tree.exists():
        make_tree(tree)
    seeds: dict[str, Seed] = {}
    plain = build(tree, work / "plain", TAG, params=PARAMS)
    seeds["plain"] = Seed("plain", work / "plain", TAG, plain.manifest_verity)
    zstd = build(tree, work / "zstd", TAG, params=PARAMS, compress=ZstdOptions(frame_size=1024))
    seeds["zstd"] = Seed("zstd", work / "zstd", TAG, zstd.manifest_verity)
    build(tree, work / "delta", BASE_TAG, params=PARAMS)
    _changed_tree(tree, work / "tree2")
    delta = build(work / "tree2", work / "delta", TAG, params=PARAMS, base_tag=BASE_TAG)
    seeds["delta"] = Seed("delta", work / "delta", TAG, delta.manifest_verity)
    layout = ImageLayout(work / "delta")
    _, _, manifest = layout.read_manifest(TAG)
    layers = RootfsReader(layout.blobs.get(manifest.rootfs.digest)).layer_count
    assert layers == 2, "the delta seed must be a delta (two metadata layers)"
    for s in seeds.values():  # blobs are shared by hard links with every case: read-only
        for blob in (s.oci / "blobs" / "sha256").iterdir():
            blob.chmod(0o444)
    return seeds
