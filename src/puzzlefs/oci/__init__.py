"""The OCI image layout that holds puzzlefs images: a content-addressed blob store,
index.json with one descriptor per tag, and the image manifests."""

from puzzlefs.oci._json import canonical_json
from puzzlefs.oci.layout import (
    ANNOTATION_REF_NAME,
    ANNOTATION_VERITY_ROOT,
    ARTIFACT_CHUNKS,
    EMPTY_CONFIG,
    MANIFEST_LIMIT,
    MEDIA_TYPE_CHUNK,
    MEDIA_TYPE_CHUNK_ZSTD,
    MEDIA_TYPE_EMPTY,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_ROOTFS,
    MEDIA_TYPE_TIMES,
    Descriptor,
    ImageLayout,
    Manifest,
    parse_image_ref,
)
from puzzlefs.oci.store import BlobStore, DiskBlobStore, MemoryBlobStore

__all__ = [
    "ANNOTATION_REF_NAME",
    "ARTIFACT_CHUNKS",
    "MANIFEST_LIMIT",
    "MEDIA_TYPE_INDEX",
    "ANNOTATION_VERITY_ROOT",
    "EMPTY_CONFIG",
    "MEDIA_TYPE_CHUNK",
    "MEDIA_TYPE_CHUNK_ZSTD",
    "MEDIA_TYPE_EMPTY",
    "MEDIA_TYPE_MANIFEST",
    "MEDIA_TYPE_ROOTFS",
    "MEDIA_TYPE_TIMES",
    "BlobStore",
    "Descriptor",
    "DiskBlobStore",
    "ImageLayout",
    "Manifest",
    "MemoryBlobStore",
    "canonical_json",
    "parse_image_ref",
]
