"""Registries: push, pull and copy images over the OCI distribution API, and the
lazy blob store a mount from a registry reads through.

Layers: ``_reference`` (names) and ``_auth`` (credentials, challenges) under
``_client`` (one registry: requests, retries, authentication flows, blobs and
manifests), under ``_transfer`` (whole images between a layout and a registry) and
``_lazy`` (a blob store that fetches what it lacks). Errors are
:class:`~puzzlefs.errors.RegistryError` and its kinds.
"""

from __future__ import annotations

from puzzlefs.errors import UsageError
from puzzlefs.oci import ImageLayout
from puzzlefs.progress import Progress
from puzzlefs.registry._cache import cache_dir, cache_root
from puzzlefs.registry._client import ClientOptions, Registry
from puzzlefs.registry._reference import LocalRef, RemoteRef, parse_ref, parse_remote
from puzzlefs.registry._transfer import TransferReport, copy_local, pull, push

__all__ = [
    "ClientOptions",
    "LocalRef",
    "Registry",
    "RemoteRef",
    "TransferReport",
    "cache_dir",
    "cache_root",
    "copy_image",
    "parse_ref",
    "parse_remote",
    "pull",
    "push",
]


def copy_image(
    src: LocalRef | RemoteRef,
    dest: LocalRef | RemoteRef,
    options: ClientOptions | None = None,
    *,
    mount_from: str | None = None,
    progress: Progress | None = None,
    all_platforms: bool = False,
) -> TransferReport:
    """Copy an image between layouts and registries, in any direction. Registry to
    registry goes through the source's local cache layout (blobs already there are
    not fetched again), and mounts blobs across repositories of one registry. From a
    registry, an index of platforms gives this machine's image only, unless
    ``all_platforms``."""
    options = options or ClientOptions()
    if isinstance(src, LocalRef) and isinstance(dest, LocalRef):
        layout = ImageLayout(dest.path, create=True)
        return copy_local(ImageLayout(src.path), src.tag, layout, dest.tag)
    if isinstance(src, LocalRef) and isinstance(dest, RemoteRef):
        with Registry(dest.host, options) as reg:
            return push(
                ImageLayout(src.path), src.tag, reg, dest, mount_from=mount_from, progress=progress
            )
    if isinstance(src, RemoteRef) and isinstance(dest, LocalRef):
        layout = ImageLayout(dest.path, create=True)
        cached = cache_dir(src)
        local = [ImageLayout(cached).blobs] if (cached / "oci-layout").exists() else []
        with Registry(src.host, options) as reg:
            return pull(
                reg, src, layout, dest.tag, progress=progress, local=local,
                all_platforms=all_platforms,
            )  # fmt: skip
    assert isinstance(src, RemoteRef) and isinstance(dest, RemoteRef)
    if src.digest is None and src.tag is None:
        raise UsageError(f"{src}: name a tag or a digest")
    staging = ImageLayout(cache_dir(src), create=True)
    tag = src.tag or f"sha256-{src.digest.hex if src.digest else ''}"
    with Registry(src.host, options) as reg:
        pull(reg, src, staging, tag, progress=progress, all_platforms=all_platforms)
    same = src.host == dest.host
    with Registry(dest.host, options) as reg:
        return push(
            staging, tag, reg, dest, mount_from=mount_from or (src.repo if same else None),
            progress=progress,
        )  # fmt: skip
