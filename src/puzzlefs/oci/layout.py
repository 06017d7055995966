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
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzlefs._files import atomic_write, read_regular
from puzzlefs.digest import Digest
from puzzlefs.errors import (
    BlobNotFound,
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
# Docker's schema2 (docker push writes them): kept as they are, as skopeo
# --preserve-digests keeps them; import reads them, gc follows them.
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST)
INDEX_TYPES = (MEDIA_TYPE_INDEX, MEDIA_TYPE_DOCKER_LIST)
MEDIA_TYPE_ROOTFS = "application/vnd.puzzlefs.image.rootfs.v1"
MEDIA_TYPE_CHUNK = "application/vnd.puzzlefs.image.filedata.v1"
MEDIA_TYPE_CHUNK_ZSTD = "application/vnd.puzzlefs.image.filedata.v1+zstd"
CHUNK_MEDIA_TYPES = frozenset((MEDIA_TYPE_CHUNK, MEDIA_TYPE_CHUNK_ZSTD))
# image-spec 1.1: a manifest whose config is the empty descriptor names its artifact
# type. Readers accept manifests with or without it (the reference writes none).
ARTIFACT_TYPE = "application/vnd.puzzlefs.image.v1"
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
MAX_LAYOUT_FILE = 64 * 1024  # oci-layout: one small object
# A rootfs is read whole into memory. About 100 bytes per inode: room for ten million.
MAX_ROOTFS_BLOB = 1024 * 1024 * 1024


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
        """Every field this project uses is checked for its JSON type: a hostile or
        broken layout gives an ImageError naming the field, never a TypeError later."""
        if not isinstance(obj, dict):
            raise ImageError(f"{where}: descriptor is not a JSON object")
        try:
            media_type = obj["mediaType"]
            digest_text = obj["digest"]
            size = obj["size"]
        except KeyError as e:
            raise ImageError(f"{where}: descriptor lacks {e.args[0]!r}") from None
        if not isinstance(media_type, str):
            raise ImageError(f"{where}: mediaType is not a string")
        if not isinstance(digest_text, str):
            raise ImageError(f"{where}: digest is not a string")
        try:
            digest = Digest.parse(digest_text)
        except InvalidDigest as e:
            raise ImageError(f"{where}: {e}") from None
        # bool is an int in Python, not in JSON
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{where}: size is not a non-negative integer")
        annotations = string_map(obj.get("annotations"), f"{where}: annotations")
        platform = obj.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise ImageError(f"{where}: platform is not an object")
        data = obj.get("data")
        if data is not None and not isinstance(data, str):
            raise ImageError(f"{where}: data is not a string")
        return cls(media_type, digest, size, annotations, platform, data)


def string_map(value: Any, where: str) -> dict[str, str]:
    """An OCI annotations object: string keys to string values (null or absent: {})."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ImageError(f"{where} are not an object")
    for k, v in value.items():
        if not isinstance(v, str):
            raise ImageError(f"{where}: the value of {k!r} is not a string")
    return dict(value)


# As newer reference versions write it: the empty blob, also inlined as base64 data.
EMPTY_CONFIG = Descriptor(
    MEDIA_TYPE_EMPTY, Digest.of(EMPTY_CONFIG_BYTES), len(EMPTY_CONFIG_BYTES), data="e30="
)

_GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "386", "armv7l": "arm"}


def host_architecture() -> str:
    """The builder's architecture in Go's names, as the reference writes it."""
    machine = os.uname().machine
    return _GOARCH.get(machine, machine)


class Manifest:
    """An image manifest: its config, layers and annotations.

    Parsed from bytes, its layers are checked in full at once (:func:`_plain_layers`
    over the whole list, or :meth:`Descriptor.from_json` one by one, which names what
    is wrong), but made into :class:`Descriptor` objects only when first asked for:
    a mount reads the rootfs, times and chunk digests of an image with tens of
    thousands of chunks without making an object for each (:meth:`chunk_blobs`).
    """

    __slots__ = ("config", "annotations", "_layers", "_raw", "_chunk_blobs")

    def __init__(
        self,
        config: Descriptor,
        layers: list[Descriptor],
        annotations: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.annotations = annotations if annotations is not None else {}
        self._layers: list[Descriptor] | None = list(layers)
        self._raw: list[dict[str, Any]] = []
        self._chunk_blobs: list[tuple[bytes, int, str]] | None = None

    @classmethod
    def _checked(
        cls, config: Descriptor, raw: list[dict[str, Any]], annotations: dict[str, str]
    ) -> Manifest:
        """From layers :func:`_plain_layers` passed: their objects are made later."""
        m = cls(config, [], annotations)
        m._layers, m._raw = None, raw
        return m

    @property
    def layers(self) -> list[Descriptor]:
        if self._layers is None:
            self._layers = [Descriptor.from_json(d, "layer") for d in self._raw]
        return self._layers

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return (self.config, self.layers, self.annotations) == (
            other.config,
            other.layers,
            other.annotations,
        )

    __hash__ = None  # type: ignore[assignment]

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {
            "artifactType": ARTIFACT_TYPE,
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
        obj = load_json(data, where)
        if obj.get("schemaVersion") != 2:
            raise ImageError(f"{where}: schemaVersion is not 2")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise ImageError(f"{where}: no layers list")
        config = Descriptor.from_json(obj.get("config"), f"{where} config")
        annotations = string_map(obj.get("annotations"), f"{where}: annotations")
        if _plain_layers(layers):
            return cls._checked(config, layers, annotations)
        return cls(
            config,
            [Descriptor.from_json(d, f"{where} layer {i}") for i, d in enumerate(layers)],
            annotations,
        )

    @classmethod
    def joined(cls, first: Manifest, rest: list[Manifest], image: str) -> Manifest:
        """``first`` with the layers of ``rest`` after its own (``image`` split into
        parts); each of ``rest`` must hold chunk layers only."""
        for i, m in enumerate(rest, 1):
            if any(t not in CHUNK_MEDIA_TYPES for t in m._media_types()):
                raise ImageError(f"manifest part {i} of {image} holds layers other than chunks")
        parts = [first, *rest]
        if all(m._layers is None for m in parts):
            return cls._checked(
                first.config, [d for m in parts for d in m._raw], dict(first.annotations)
            )
        return cls(first.config, [d for m in parts for d in m.layers], dict(first.annotations))

    def _media_types(self) -> list[str]:
        if self._layers is None:
            return [d["mediaType"] for d in self._raw]
        return [d.media_type for d in self._layers]

    def _only(self, media_type: str) -> list[Descriptor]:
        """The layers of one media type, made without making the others."""
        if self._layers is not None:
            return [d for d in self._layers if d.media_type == media_type]
        return [Descriptor.from_json(d, "layer") for d in self._raw if d["mediaType"] == media_type]

    @property
    def rootfs(self) -> Descriptor:
        """The metadata layer, found by media type (its position varies by writer)."""
        found = self._only(MEDIA_TYPE_ROOTFS)
        if len(found) != 1:
            raise ImageError(f"manifest has {len(found)} rootfs layers, expected exactly 1")
        return found[0]

    @property
    def times(self) -> Descriptor | None:
        """The times layer (a puzzlefs extension: puzzlefs.format.times), if any."""
        found = self._only(MEDIA_TYPE_TIMES)
        if len(found) > 1:
            raise ImageError(f"manifest has {len(found)} times layers, expected at most 1")
        return found[0] if found else None

    @property
    def chunk_layers(self) -> list[Descriptor]:
        return [d for d in self.layers if d.media_type in CHUNK_MEDIA_TYPES]

    def chunk_blobs(self) -> list[tuple[bytes, int, str]]:
        """``(raw sha256, size, media type)`` of each chunk layer, in order: made once
        (a mount asks for its stream, its compression and its size), not to be changed."""
        if self._chunk_blobs is None:
            if self._layers is not None:
                self._chunk_blobs = [
                    (d.digest.raw, d.size, d.media_type)
                    for d in self._layers
                    if d.media_type in CHUNK_MEDIA_TYPES
                ]
            else:
                self._chunk_blobs = [
                    (Digest.raw_of(d["digest"]), d["size"], t)
                    for d in self._raw
                    if (t := d["mediaType"]) in CHUNK_MEDIA_TYPES
                ]
        return self._chunk_blobs


_DESCRIPTOR_KEYS = frozenset(("mediaType", "digest", "size", "annotations", "platform", "data"))


def _plain_layers(layers: list[Any]) -> bool:
    """Whether :meth:`Descriptor.from_json` takes every one of ``layers`` as it is,
    checked a field at a time over the whole list (about 1 us a layer, not 6): JSON
    objects with a string media type, a digest :func:`~puzzlefs.digest.all_valid`
    accepts, a non-negative integer size, and annotations, platform and data absent
    or of their types. False sends the list through ``from_json``, which says why."""
    if not all([type(d) is dict and d.keys() <= _DESCRIPTOR_KEYS for d in layers]):
        return False
    if not all([type(d.get("mediaType")) is str for d in layers]):
        return False
    if not Digest.all_valid([d.get("digest") for d in layers]):
        return False
    if not all([type(s := d.get("size")) is int and s >= 0 for d in layers]):
        return False
    extra = [d for d in layers if len(d) > 3]
    return all(
        (
            (a := d.get("annotations")) is None
            or (type(a) is dict and all(type(v) is str for v in a.values()))
        )
        and ((p := d.get("platform")) is None or type(p) is dict)
        and ((x := d.get("data")) is None or type(x) is str)
        for d in extra
    )


def split_parts(index_bytes: bytes, where: str) -> list[Descriptor]:
    """The manifests of an image split under an index: the image's own first, then
    the parts that carry the remaining chunk layers. Anything else is refused (an
    index of platforms, say, is not one puzzlefs image)."""
    obj = load_json(index_bytes, where)
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


def is_platform_index(index: dict[str, Any]) -> bool:
    """An index of one image for each of several platforms (every entry says which),
    as docker and buildx push them; not a puzzlefs image split into parts."""
    entries = index.get("manifests")
    return (
        isinstance(entries, list)
        and bool(entries)
        and all(isinstance(e, dict) and isinstance(e.get("platform"), dict) for e in entries)
    )


def pick_platform(index: dict[str, Any], where: str) -> Descriptor:
    """The entry of an index of platforms for this machine (linux and its architecture),
    as skopeo and podman choose it."""
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ImageError(f"{where}: no manifests list")
    descs = [Descriptor.from_json(d, f"{where} manifest {i}") for i, d in enumerate(manifests)]
    arch = host_architecture()
    for d in descs:
        p = d.platform if isinstance(d.platform, dict) else {}
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return d
    found = ", ".join(_platform_of(d) for d in descs) or "none"
    raise ImageError(f"{where} has no image for linux/{arch} (it has: {found})")


def _platform_of(desc: Descriptor) -> str:
    p = desc.platform if isinstance(desc.platform, dict) else {}
    text = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return text + (f"/{p['variant']}" if p.get("variant") else "")


def load_json(data: bytes, where: str) -> dict[str, Any]:
    """A JSON object from untrusted bytes (ImageError for anything else)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ImageError(f"{where} is not valid JSON: {e}") from None
    except RecursionError:  # arrays nested thousands deep
        raise ImageError(f"{where} is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{where} is not a JSON object")
    return obj


# The OCI image layout's grammar for ref names (org.opencontainers.image.ref.name):
# components of letters and digits joined by one of - . _ @ + (or --), separated by /.
# (':' is allowed there too, but it separates OCI_DIR from TAG on our command line.)
_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._@+]|--)[A-Za-z0-9]+)*"
_TAG = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
MAX_TAG = 255


def check_tag(tag: str) -> str:
    """``tag`` if the OCI image layout's grammar allows it (``v1``, ``3.12-slim``,
    ``library/debian``), else a UsageError saying what a tag may be."""
    if len(tag) > MAX_TAG or not _TAG.fullmatch(tag):
        raise UsageError(
            f"invalid tag {tag!r}: a tag is letters and digits, joined by . _ - @ + and "
            f"separated by / (as in v1, 3.12-slim, library/debian), at most {MAX_TAG} long"
        )
    return tag


def parse_image_ref(text: str) -> tuple[Path, str]:
    """Split ``OCI_DIR:TAG`` at the last colon (the reference splits at the only one)."""
    path, sep, tag = text.rpartition(":")
    if not sep or not path or not tag:
        raise UsageError(f"expected OCI_DIR:TAG, got {text!r}")
    return Path(path), check_tag(tag)


class ImageLayout:
    """An OCI layout directory. ``create=True`` makes an empty one if needed."""

    def __init__(
        self, path: Path | str, *, create: bool = False, blobs: DiskBlobStore | None = None
    ) -> None:
        """``blobs``: the store to use instead of ``path/blobs/sha256`` itself (a
        store that injects faults, for tests); it must hold the same directory."""
        self.path = Path(path)
        layout_file = self.path / "oci-layout"
        if create and not os.path.lexists(layout_file):
            if self.path.exists() and not self.path.is_dir():
                raise UsageError(f"{self.path} exists and is not a directory")
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            atomic_write(layout_file, OCI_LAYOUT_CONTENT)
        if not self.path.is_dir():
            raise NotAnOCILayout(f"{self.path}: no such directory")
        try:
            data = read_regular(layout_file, str(layout_file), limit=MAX_LAYOUT_FILE)
        except FileNotFoundError:
            raise NotAnOCILayout(
                f"{self.path} is not an OCI image layout (no oci-layout)"
            ) from None
        layout = load_json(data, str(layout_file))
        if not isinstance(layout.get("imageLayoutVersion"), str):
            raise NotAnOCILayout(f"{layout_file}: no imageLayoutVersion")
        self.blobs = blobs if blobs is not None else DiskBlobStore(self.path / "blobs" / "sha256")

    # -- index.json ---------------------------------------------------------------
    def read_index(self) -> dict[str, Any]:
        index_file = self.path / "index.json"
        try:
            data = read_regular(index_file, str(index_file), limit=MAX_JSON_BLOB)
        except FileNotFoundError:
            return {"schemaVersion": 2, "manifests": []}
        obj = load_json(data, str(index_file))
        if not isinstance(obj.get("manifests", []), list):
            raise ImageError(f"{index_file}: manifests is not a list")
        return obj

    def tags(self) -> dict[str, Descriptor]:
        out: dict[str, Descriptor] = {}
        for i, d in enumerate(self.read_index().get("manifests", [])):
            desc = Descriptor.from_json(d, f"index.json manifest {i}")
            tag = desc.annotations.get(ANNOTATION_REF_NAME)
            if tag is not None and desc.media_type in MANIFEST_TYPES + INDEX_TYPES:
                out[tag] = desc
        return out

    def resolve(self, tag: str) -> Descriptor:
        tags = self.tags()
        if tag not in tags:
            known = ", ".join(sorted(tags)) or "none"
            raise TagNotFound(f"tag {tag!r} not found in {self.path} (tags: {known})")
        return tags[tag]

    def puzzlefs_tags(self) -> tuple[list[str], list[str]]:
        """The tags, sorted, split into those naming puzzlefs images and the others a
        layout may also hold (an image of tar layers, Docker's, an index of platforms),
        for commands that go over every tag. A tag whose manifest cannot be read counts
        as puzzlefs: the command then meets, and says, what is wrong with it."""
        ours: list[str] = []
        others: list[str] = []
        for tag, desc in sorted(self.tags().items()):
            (ours if self._is_puzzlefs(tag, desc) else others).append(tag)
        return ours, others

    def _is_puzzlefs(self, tag: str, desc: Descriptor) -> bool:
        if desc.media_type not in (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX):
            return False
        try:
            data = self._json_blob(desc, f"manifest of {tag!r}", "index.json")
            if desc.media_type == MEDIA_TYPE_INDEX:
                return not is_platform_index(load_json(data, "index"))
            return MEDIA_TYPE_ROOTFS in Manifest.from_bytes(data)._media_types()
        except ImageError:
            return True

    def read_manifest(self, tag: str) -> tuple[Descriptor, bytes, Manifest]:
        """The tag's descriptor, the bytes it names (the one digest the fs-verity chain
        starts from) and its manifest; for an index of parts, the first part's
        manifest with the chunk layers of every part, each part checked against the
        sha256 and size the index gives it."""
        desc = self.resolve(tag)
        if desc.media_type not in (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX):
            raise ImageError(f"{tag!r} names a {desc.media_type}: not a puzzlefs image")
        data = self._json_blob(desc, f"manifest of {tag!r}", "index.json")
        if desc.media_type == MEDIA_TYPE_INDEX:
            return desc, data, self._merged(data, tag)
        return desc, data, Manifest.from_bytes(data, f"manifest of {tag!r}")

    def _json_blob(self, desc: Descriptor, what: str, named_by: str) -> bytes:
        """A manifest or index blob, checked against its sha256 and the size
        ``named_by`` gives it."""
        if desc.size > MAX_JSON_BLOB:
            raise ImageError(f"{what} is implausibly large ({desc.size} bytes)")
        named = f"{what} (blob {desc.digest.hex})"
        try:
            return self.blobs.get(desc.digest, size=desc.size)
        except DigestMismatch as e:
            raise DigestMismatch(named, e.expected, e.actual) from None
        except BlobNotFound:
            raise BlobNotFound(f"{named} is missing") from None
        except ImageError as e:  # not a regular file, or not the size named_by says
            raise ImageError(f"{what}: {e}") from None

    def _merged(self, index_bytes: bytes, tag: str) -> Manifest:
        parts = split_parts(index_bytes, f"image index of {tag!r}")
        manifests = []
        for i, part in enumerate(parts):
            what = f"manifest part {i} of {tag!r}"
            data = self._json_blob(part, what, "its image index")
            manifests.append(Manifest.from_bytes(data, what))
        return Manifest.joined(manifests[0], manifests[1:], repr(tag))

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
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
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
        atomic_write(self.path / "index.json", canonical_json(index))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """index.json's lock: held while it is read, changed and replaced."""
        with flocked(self.path):
            yield
