"""Managing a store: its tags, removing them, and collecting the blobs no tag needs.

Garbage collection follows the store's rules (:mod:`puzzlefs.oci.store`): it holds the
store's lock exclusively, so it runs only while no build, import or pull is between
storing a blob and committing its tag, and they wait for it. What it keeps is every
blob reachable from index.json: each manifest it names (tagged or not), and through
it the config, every layer, and for a puzzlefs rootfs every chunk any of its layers
uses (an image written by the reference may list fewer chunks in its manifest than
its rootfs needs). A store shared with other layouts (``blobs/sha256`` a symlink)
is refused: their tags cannot be seen from here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzlefs.digest import Digest
from puzzlefs.errors import ImageError, PuzzleFSError, TagNotFound, UsageError
from puzzlefs.format import Kind, RootfsReader
from puzzlefs.oci import MEDIA_TYPE_ROOTFS, Descriptor, ImageLayout
from puzzlefs.oci.layout import MAX_JSON_BLOB, MAX_ROOTFS_BLOB, load_json

__all__ = ["GcReport", "gc", "reachable_blobs", "remove_tags"]

_MAX_DEPTH = 8  # image indexes inside image indexes


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)  # blob hex digests
    freed: int = 0  # bytes
    kept: int = 0  # blobs
    temporary: int = 0  # leftovers of killed writers, removed too
    dry_run: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "removed": len(self.removed),
            "freed_bytes": self.freed,
            "kept": self.kept,
            "temporary_files": self.temporary,
        }


def remove_tags(layout: ImageLayout, tags: list[str]) -> None:
    """Drop tags from index.json (their blobs stay until ``gc``)."""
    with layout.locked():
        known = layout.tags()
        missing = [t for t in tags if t not in known]
        if missing:
            names = ", ".join(sorted(known)) or "none"
            raise TagNotFound(f"tag {missing[0]!r} not found in {layout.path} (tags: {names})")
        layout.untag(set(tags))


def reachable_blobs(layout: ImageLayout) -> set[str]:
    """The hex digests of every blob index.json leads to. Raises if a manifest, index
    or rootfs on the way cannot be read: then what it needs cannot be known."""
    keep: set[str] = set()
    for i, d in enumerate(layout.read_index().get("manifests", [])):
        _reach(layout, Descriptor.from_json(d, f"index.json manifest {i}"), keep, 0)
    return keep


def _reach(layout: ImageLayout, desc: Descriptor, keep: set[str], depth: int) -> None:
    if desc.digest.hex in keep:
        return
    keep.add(desc.digest.hex)
    if desc.media_type == MEDIA_TYPE_ROOTFS:
        _reach_rootfs(layout, desc, keep)
        return
    if not desc.media_type.endswith(("manifest.v1+json", "manifest.v2+json")) and not (
        desc.media_type.endswith(("index.v1+json", "list.v2+json"))
    ):
        return  # a layer or config: a leaf
    if depth > _MAX_DEPTH:
        raise ImageError(f"image indexes nested deeper than {_MAX_DEPTH} at {desc.digest}")
    obj = _json_blob(layout, desc)
    children: list[Any] = []
    if isinstance(obj.get("config"), dict):
        children.append(obj["config"])
    for key in ("layers", "manifests", "blobs"):
        if isinstance(obj.get(key), list):
            children += obj[key]
    if isinstance(obj.get("subject"), dict):
        children.append(obj["subject"])
    for j, child in enumerate(children):
        _reach(layout, Descriptor.from_json(child, f"{desc.digest} entry {j}"), keep, depth + 1)


def _json_blob(layout: ImageLayout, desc: Descriptor) -> dict[str, Any]:
    if desc.size > MAX_JSON_BLOB:
        raise ImageError(f"manifest {desc.digest} is implausibly large ({desc.size} bytes)")
    data = layout.blobs.get(desc.digest, size=desc.size)  # size checked before reading
    return load_json(data, f"manifest {desc.digest}")  # ImageError, nesting included


def _reach_rootfs(layout: ImageLayout, desc: Descriptor, keep: set[str]) -> None:
    reader = RootfsReader(layout.blobs.get(desc.digest, size=desc.size, limit=MAX_ROOTFS_BLOB))
    keep.update(raw.hex() for raw in reader.verity())
    for layer in range(reader.layer_count):
        for inode in reader.layer(layer):
            if inode.kind is Kind.FILE:
                keep.update(c.blob.digest.hex() for c in inode.chunks)


def gc(layout: ImageLayout, *, dry_run: bool = False) -> GcReport:
    """Remove every blob no tag (nor untagged manifest) in index.json needs."""
    blob_dir = layout.path / "blobs" / "sha256"
    if blob_dir.is_symlink():
        raise UsageError(
            f"{blob_dir} is a symlink to a shared store ({os.path.realpath(blob_dir)}): "
            "gc cannot see the tags of the other layouts that use it"
        )
    report = GcReport(dry_run=dry_run)
    with layout.blobs.collecting(), layout.locked():
        try:
            keep = reachable_blobs(layout)
        except PuzzleFSError as e:
            raise ImageError(f"gc refuses to run: {e} (fix or remove that tag first)") from None
        for entry in _entries(blob_dir):
            name = entry.name
            if name.startswith(".tmp-"):  # a killed writer's (none runs now)
                report.temporary += 1
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                continue
            if name in keep:
                report.kept += 1
                continue
            if not _is_blob_name(name) or not entry.is_file(follow_symlinks=False):
                continue  # not ours to judge
            report.removed.append(name)
            report.freed += entry.stat(follow_symlinks=False).st_size
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        # index.json's temporary files (puzzlefs._files; older versions' names too)
        leftovers = [*layout.path.glob(".tmp-index.json-*"), *layout.path.glob(".index.json.tmp-*")]
        for leftover in leftovers:
            report.temporary += 1
            if not dry_run:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
    report.removed.sort()
    return report


def _entries(blob_dir: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(blob_dir) as it:
            return list(it)
    except FileNotFoundError:  # no store: no blob to remove
        return []


def _is_blob_name(name: str) -> bool:
    try:
        Digest(name)
    except PuzzleFSError:
        return False
    return True
