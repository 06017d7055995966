"""A case's copy of a seed layout, and the edits that keep its digests consistent.

A case directory starts as a copy whose blobs are hard links to the seed's (one link
per blob: cheap). Edits never write into an existing file (that would change the seed
too): a changed blob is a new file, either under its new digest with every reference
updated ("fixed") or under its old name ("unfixed").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from puzzlefs.format import Rootfs, RootfsReader, encode_rootfs
from puzzlefs.verity import fsverity_digest

MEDIA_ROOTFS = "application/vnd.puzzlefs.image.rootfs.v1"
ANNOTATION_VERITY = "io.puzzlefsoci.puzzlefs.puzzlefs_verity_root_hash"
ANNOTATION_REF = "org.opencontainers.image.ref.name"


def copy_layout(seed: Path, dest: Path) -> None:
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for name in ("oci-layout", "index.json"):
        shutil.copyfile(seed / name, dest / name)
    src = seed / "blobs" / "sha256"
    for name in os.listdir(src):
        os.link(src / name, blobs / name)


def read_file(path: Path) -> bytes:
    """A regular file's bytes; OSError for anything else (a FIFO an earlier mutation
    made must not hang the fuzzer itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 64 << 20:
            raise OSError(f"{path} is not a small regular file")
        return os.read(fd, st.st_size + 1)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """New contents in a new inode (the old one may be shared with the seed)."""
    if path.is_symlink() or path.exists():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.write_bytes(data)


class CaseLayout:
    def __init__(self, path: Path, tag: str) -> None:
        self.path = path
        self.tag = tag
        self.blobs = path / "blobs" / "sha256"
        self.verity: str | None = None  # the manifest's fs-verity digest, once changed

    # -- reading the pristine structure ------------------------------------------------
    def index(self) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(read_file(self.path / "index.json"))
        return obj

    def tag_entry(self, index: dict[str, Any]) -> dict[str, Any]:
        for m in index["manifests"]:
            if m.get("annotations", {}).get(ANNOTATION_REF) == self.tag:
                entry: dict[str, Any] = m
                return entry
        raise KeyError(self.tag)

    def manifest_hex(self) -> str:
        return str(self.tag_entry(self.index())["digest"]).removeprefix("sha256:")

    def manifest(self) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(self.read(self.manifest_hex()))
        return obj

    def rootfs_hex(self) -> str:
        for layer in self.manifest()["layers"]:
            if layer["mediaType"] == MEDIA_ROOTFS:
                return str(layer["digest"]).removeprefix("sha256:")
        raise KeyError("rootfs")

    def config_hex(self) -> str:
        return str(self.manifest()["config"]["digest"]).removeprefix("sha256:")

    def chunk_hexes(self) -> list[str]:
        return sorted(
            str(d["digest"]).removeprefix("sha256:")
            for d in self.manifest()["layers"]
            if d["mediaType"] != MEDIA_ROOTFS
        )

    def rootfs(self) -> Rootfs:
        return RootfsReader(self.read(self.rootfs_hex())).decode()

    def read(self, hexd: str) -> bytes:
        return read_file(self.blobs / hexd)

    # -- writing ----------------------------------------------------------------------
    def put(self, data: bytes) -> str:
        hexd = hashlib.sha256(data).hexdigest()
        path = self.blobs / hexd
        if not path.exists():
            path.write_bytes(data)
        return hexd

    def unfixed(self, hexd: str, data: bytes) -> None:
        """``data`` under the old name: its sha256 no longer matches."""
        replace_file(self.blobs / hexd, data)

    def set_index(self, data: bytes) -> None:
        replace_file(self.path / "index.json", data)

    def set_manifest(self, data: bytes) -> None:
        hexd = self.put(data)
        index = self.index()
        entry = self.tag_entry(index)
        entry["digest"] = f"sha256:{hexd}"
        entry["size"] = len(data)
        self.set_index(json.dumps(index).encode())
        self.verity = fsverity_digest(data).hex()

    def _set_layer(self, old_hex: str, data: bytes, verity: bool) -> None:
        manifest = self.manifest()
        hexd = self.put(data)
        for d in [manifest["config"], *manifest["layers"]]:
            if d["digest"] == f"sha256:{old_hex}":
                d["digest"] = f"sha256:{hexd}"
                d["size"] = len(data)
                if verity:
                    d.setdefault("annotations", {})[ANNOTATION_VERITY] = fsverity_digest(data).hex()
        self.set_manifest(json.dumps(manifest, sort_keys=True).encode())

    def set_config(self, data: bytes) -> None:
        self._set_layer(self.config_hex(), data, verity=False)

    def set_rootfs(self, data: bytes) -> None:
        self._set_layer(self.rootfs_hex(), data, verity=True)

    def set_rootfs_obj(self, rootfs: Rootfs) -> None:
        self.set_rootfs(encode_rootfs(rootfs))

    def set_chunk(self, old_hex: str, data: bytes) -> None:
        """A chunk's new bytes under their digest: the rootfs's references (BlobRefs,
        fsVerityData) and the manifest's descriptor follow."""
        new_hex = self.put(data)
        old, new = bytes.fromhex(old_hex), bytes.fromhex(new_hex)
        rootfs = self.rootfs()
        for layer in rootfs.layers:
            for inode in layer:
                inode.chunks = [
                    type(c)(type(c.blob)(new, c.blob.offset, c.blob.compressed), c.len)
                    if c.blob.digest == old
                    else c
                    for c in inode.chunks
                ]
        if old in rootfs.verity:
            del rootfs.verity[old]
            rootfs.verity[new] = fsverity_digest(data)
        manifest = self.manifest()
        for d in manifest["layers"]:
            if d["digest"] == f"sha256:{old_hex}":
                d["digest"] = f"sha256:{new_hex}"
                d["size"] = len(data)
        rootfs_data = encode_rootfs(rootfs)
        rootfs_hex = self.put(rootfs_data)
        for d in manifest["layers"]:
            if d["mediaType"] == MEDIA_ROOTFS:
                d["digest"] = f"sha256:{rootfs_hex}"
                d["size"] = len(rootfs_data)
                d.setdefault("annotations", {})[ANNOTATION_VERITY] = fsverity_digest(
                    rootfs_data
                ).hex()
        self.set_manifest(json.dumps(manifest, sort_keys=True).encode())
