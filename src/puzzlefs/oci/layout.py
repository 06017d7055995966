"""An OCI image layout directory: ``oci-layout``, ``index.json`` and ``blobs/sha256``.

A tag names an image manifest, or, for an image whose manifest would exceed what
registries accept (:data:`MANIFEST_LIMIT`), an image index of several: the first is the
image's manifest (rootfs, times, and the chunk layers that fit), the others list the
remaining chunk layers (artifact type :data:`ARTIFACT_CHUNKS`, the empty config).
:meth:`ImageLayout.read_manifest` gives either as one manifest with every chunk layer.

index.json is the only file that makes blobs reachable, so it is written last, through a
temporary file and a rename, after the blobs it names are durable. Its updates are
read-modify-write under an exclusive ``flock`` on the layout directory, so that
concurrent builds into one layout cannot lose each other's tags; the blobs have a lock
of their own (:mod:`puzzlefs.oci.store`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzlefs.digest import Digest
from puzzlefs.errors import (
    DigestMismatch,
    ImageError,
    InvalidDigest,
    NotAnOCILayout,
    TagNotFound,
    UsageError,
)
from puzzlefs.oci._json import canonical_json
from puzzlefs.oci._lock import flocked
from puzzlefs.oci.store import DiskBlobStore

MEDIA_TYPE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_EMPTY = "application/vnd.oci.empty.v1+json"
MEDIA_TYPE_ROOTFS = "application/vnd.puzzlefs.image.rootfs.v1"
MEDIA_TYPE_CHUNK = "application/vnd.puzzlefs.image.filedata.v1"
MEDIA_TYPE_CHUNK_ZSTD = "application/vnd.puzzlefs.image.filedata.v1+zstd"
MEDIA_TYPE_TIMES = "application/vnd.puzzlefs.image.times.v1"  # ours: puzzlefs.format.times
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_VERITY_ROOT = "io.puzzlefsoci.puzzlefs.puzzlefs_verity_root_hash"
# The manifests of an image's chunk layers beyond the first manifest (ours).
ARTIFACT_CHUNKS = "application/vnd.puzzlefs.image.chunks.v1"
# The largest manifest the distribution registry and containers/image accept.
MANIFEST_LIMIT = 4 * 1024 * 1024
MAX_SPLIT_PARTS = 4096  # manifests under one index: ~100 million chunks
OCI_LAYOUT_CONTENT = b'{"imageLayoutVersion":"1.0.0"}'
EMPTY_CONFIG_BYTES = b"{}"
MAX_JSON_BLOB = 64 * 1024 * 1024


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] | None = None
    data: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "digest": str(self.digest),
            "mediaType": self.media_type,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = dict(self.platform)
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ImageError(f"{where}: descriptor is not a JSON object")
        try:
            media_type = obj["mediaType"]
            digest = Digest.parse(obj["digest"])
            size = obj["size"]
        except KeyError as e:
            raise ImageError(f"{where}: descriptor lacks {e.args[0]!r}") from None
        except (InvalidDigest, AttributeError, TypeError) as e:
            raise ImageError(f"{where}: {e}") from None
        if not isinstance(media_type, str) or not isinstance(size, int) or size < 0:
            raise ImageError(f"{where}: malformed descriptor")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise ImageError(f"{where}: annotations are not an object")
        data = obj.get("data")
        return cls(media_type, digest, size, dict(annotations), obj.get("platform"), data)


# As newer reference versions write it: the empty blob, also inlined as base64 data.
EMPTY_CONFIG = Descriptor(
    MEDIA_TYPE_EMPTY, Digest.of(EMPTY_CONFIG_BYTES), len(EMPTY_CONFIG_BYTES), data="e30="
)

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armv7l": "arm"}


def host_architecture() -> str:
    """The builder's architecture in Go's names, as the reference writes it."""
    machine = os.uname().machine
    return _GOARCH.get(machine, machine)


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {
            "config": self.config.to_json(),
            "layers": [d.to_json() for d in self.layers],
            "mediaType": MEDIA_TYPE_MANIFEST,
            "schemaVersion": 2,
        }
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        return canonical_json(obj)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> Manifest:
        obj = _load_json(data, where)
        if obj.get("schemaVersion") != 2:
            raise ImageError(f"{where}: schemaVersion is not 2")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{where}: no layers list")
        annotations = obj.get("annotations") or {}
        return cls(
            Descriptor.from_json(obj.get("config"), f"{where} config"),
            [Descriptor.from_json(d, f"{where} layer {i}") for i, d in enumerate(layers)],
            dict(annotations) if isinstance(annotations, dict) else {},
        )

    @property
    def rootfs(self) -> Descriptor:
        """The metadata layer, found by media type (its position varies by writer)."""
        found = [d for d in self.layers if d.media_type == MEDIA_TYPE_ROOTFS]
        if len(found) != 1:
            raise ImageError(f"manifest has {len(found)} rootfs layers, expected exactly 1")
        return found[0]

    @property
    def times(self) -> Descriptor | None:
        """The times layer (a puzzlefs extension: puzzlefs.format.times), if any."""
        found = [d for d in self.layers if d.media_type == MEDIA_TYPE_TIMES]
        if len(found) > 1:
            raise ImageError(f"manifest has {len(found)} times layers, expected at most 1")
        return found[0] if found else None

    @property
    def chunk_layers(self) -> list[Descriptor]:
        return [d for d in self.layers if d.media_type in (MEDIA_TYPE_CHUNK, MEDIA_TYPE_CHUNK_ZSTD)]


def split_parts(index_bytes: bytes, where: str) -> list[Descriptor]:
    """The manifests of an image split under an index: the image's own first, then
    the parts that carry the remaining chunk layers. Anything else is refused (an
    index of platforms, say, is not one puzzlefs image)."""
    obj = _load_json(index_bytes, where)
    entries = obj.get("manifests")
    if obj.get("schemaVersion") != 2 or not isinstance(entries, list) or not entries:
        raise ImageError(f"{where}: not an image index with manifests")
    if len(entries) > MAX_SPLIT_PARTS:
        raise ImageError(f"{where}: {len(entries)} manifests (at most {MAX_SPLIT_PARTS})")
    parts = []
    for i, entry in enumerate(entries):
        desc = Descriptor.from_json(entry, f"{where} manifest {i}")
        artifact = entry.get("artifactType")
        expected = None if i == 0 else ARTIFACT_CHUNKS
        if desc.media_type != MEDIA_TYPE_MANIFEST or artifact != expected:
            raise ImageError(
                f"{where} is not a puzzlefs image split into parts (manifest {i} is a "
                f"{desc.media_type} of artifact type {artifact or 'none'}): "
                "pull or import a single image"
            )
        parts.append(desc)
    return parts


def chunk_part_bytes(layers: list[Descriptor]) -> bytes:
    """A manifest that only carries chunk layers, for an image split into parts."""
    return canonical_json(
        {
            "artifactType": ARTIFACT_CHUNKS,
            "config": EMPTY_CONFIG.to_json(),
            "layers": [d.to_json() for d in layers],
            "mediaType": MEDIA_TYPE_MANIFEST,
            "schemaVersion": 2,
        }
    )


def split_index_bytes(parts: list[Descriptor]) -> bytes:
    """The image index naming an image's manifest parts, the image's own first."""
    entries = []
    for i, d in enumerate(parts):
        entry = d.to_json()
        if i > 0:
            entry["artifactType"] = ARTIFACT_CHUNKS
        entries.append(entry)
    return canonical_json({"manifests": entries, "mediaType": MEDIA_TYPE_INDEX, "schemaVersion": 2})


def _load_json(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ImageError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{where} is not a JSON object")
    return obj


def parse_image_ref(text: str) -> tuple[Path, str]:
    """Split ``OCI_DIR:TAG`` at the last colon (the reference splits at the only one)."""
    path, sep, tag = text.rpartition(":")
    if not sep or not path or not tag:
        raise UsageError(f"expected OCI_DIR:TAG, got {text!r}")
    if "/" in tag:
        raise UsageError(f"invalid tag {tag!r} in {text!r}")
    return Path(path), tag


class ImageLayout:
    """An OCI layout directory. ``create=True`` makes an empty one if needed."""

    def __init__(self, path: Path | str, *, create: bool = False) -> None:
        self.path = Path(path)
        layout_file = self.path / "oci-layout"
        if create and not layout_file.exists():
            if self.path.exists() and not self.path.is_dir():
                raise UsageError(f"{self.path} exists and is not a directory")
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            _atomic_write(layout_file, OCI_LAYOUT_CONTENT)
        if not self.path.is_dir():
            raise NotAnOCILayout(f"{self.path}: no such directory")
        try:
            layout = _load_json(layout_file.read_bytes(), f"{layout_file}")
        except FileNotFoundError:
            raise NotAnOCILayout(
                f"{self.path} is not an OCI image layout (no oci-layout)"
            ) from None
        if not isinstance(layout.get("imageLayoutVersion"), str):
            raise NotAnOCILayout(f"{layout_file}: no imageLayoutVersion")
        self.blobs = DiskBlobStore(self.path / "blobs" / "sha256")

    # -- index.json ---------------------------------------------------------------
    def read_index(self) -> dict[str, Any]:
        index_file = self.path / "index.json"
        try:
            data = index_file.read_bytes()
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}
        obj = _load_json(data, str(index_file))
        if not isinstance(obj.get("manifests", []), list):
            raise ImageError(f"{index_file}: manifests is not a list")
        return obj

    def tags(self) -> dict[str, Descriptor]:
        out: dict[str, Descriptor] = {}
        for i, d in enumerate(self.read_index().get("manifests", [])):
            desc = Descriptor.from_json(d, f"index.json manifest {i}")
            tag = desc.annotations.get(ANNOTATION_REF_NAME)
            if tag is not None and desc.media_type in (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX):
                out[tag] = desc
        return out

    def resolve(self, tag: str) -> Descriptor:
        tags = self.tags()
        if tag not in tags:
            known = ", ".join(sorted(tags)) or "none"
            raise TagNotFound(f"tag {tag!r} not found in {self.path} (tags: {known})")
        return tags[tag]

    def read_manifest(self, tag: str) -> tuple[Descriptor, bytes, Manifest]:
        """The tag's descriptor, the bytes it names (the one digest the fs-verity chain
        starts from) and its manifest; for an index of parts, the first part's
        manifest with the chunk layers of every part, each part checked against the
        sha256 and size the index gives it."""
        desc = self.resolve(tag)
        data = self._json_blob(desc, f"manifest of {tag!r}", "index.json")
        if desc.media_type == MEDIA_TYPE_INDEX:
            return desc, data, self._merged(data, tag)
        return desc, data, Manifest.from_bytes(data, f"manifest of {tag!r}")

    def _json_blob(self, desc: Descriptor, what: str, named_by: str) -> bytes:
        if desc.size > MAX_JSON_BLOB:
            raise ImageError(f"{what} is implausibly large ({desc.size} bytes)")
        try:
            data = self.blobs.get(desc.digest)
        except DigestMismatch as e:
            raise DigestMismatch(f"{what} (blob {desc.digest.hex})", e.expected, e.actual) from None
        if len(data) != desc.size:
            raise ImageError(f"{what}: size {len(data)} does not match {named_by} ({desc.size})")
        return data

    def _merged(self, index_bytes: bytes, tag: str) -> Manifest:
        parts = split_parts(index_bytes, f"image index of {tag!r}")
        manifests = []
        for i, part in enumerate(parts):
            what = f"manifest part {i} of {tag!r}"
            data = self._json_blob(part, what, "its image index")
            manifests.append(Manifest.from_bytes(data, what))
        first = manifests[0]
        layers = list(first.layers)
        for i, m in enumerate(manifests[1:], 1):
            if len(m.chunk_layers) != len(m.layers):
                raise ImageError(f"manifest part {i} of {tag!r} holds layers other than chunks")
            layers += m.layers
        return Manifest(first.config, layers, dict(first.annotations))

    def set_tag(
        self,
        tag: str,
        manifest_digest: Digest,
        manifest_size: int,
        *,
        lock: bool = True,
        media_type: str = MEDIA_TYPE_MANIFEST,
    ) -> None:
        """Point ``tag`` at a manifest or image index (already stored): drop any old
        descriptor with that tag and append the new one, then replace index.json
        atomically. ``lock`` is False when the caller already holds the layout's
        lock."""
        if media_type not in (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX):
            raise ImageError(f"a tag names a manifest or an index, not {media_type}")
        with self.locked() if lock else contextlib.nullcontext():
            self.blobs.sync()
            platform = {"architecture": host_architecture(), "os": "linux"}
            desc = Descriptor(
                media_type,
                manifest_digest,
                manifest_size,
                {ANNOTATION_REF_NAME: tag},
                platform if media_type == MEDIA_TYPE_MANIFEST else None,
            )
            self._replace_tags({tag}, [desc.to_json()])

    def untag(self, tags: set[str]) -> None:
        """Drop the descriptors of ``tags`` from index.json (the caller holds the lock)."""
        self._replace_tags(tags, [])

    def _replace_tags(self, tags: set[str], new: list[dict[str, Any]]) -> None:
        index = self.read_index()
        manifests = [
            m
            for m in index.get("manifests", [])
            if not (
                isinstance(m, dict)
                and isinstance(m.get("annotations"), dict)
                and m["annotations"].get(ANNOTATION_REF_NAME) in tags
            )
        ]
        index["manifests"] = manifests + new
        index["schemaVersion"] = 2
        _atomic_write(self.path / "index.json", canonical_json(index))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """index.json's lock: held while it is read, changed and replaced."""
        with flocked(self.path):
            yield


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
