"""``puzzlefs mount docker://HOST/REPO:TAG MOUNTPOINT``: the image's metadata is
fetched into the repository's cache layout, tagged there, and mounted through a
:class:`~puzzlefs.registry._lazy.LazyLayout`, which fetches each chunk on first use."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.errors import ImageError
from puzzlefs.oci import MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST, Descriptor, ImageLayout, Manifest
from puzzlefs.oci.layout import split_parts
from puzzlefs.oci.store import DiskBlobStore
from puzzlefs.registry._cache import cache_dir
from puzzlefs.registry._client import ClientOptions, Registry
from puzzlefs.registry._lazy import Fetcher, LazyLayout, read_list
from puzzlefs.registry._reference import RemoteRef

__all__ = ["MOUNT_THREADS", "Prepared", "mount_remote", "prepare"]

MOUNT_THREADS = 8  # serving threads: a slow fetch blocks only its own reader
PREFETCH_WORKERS = 8


@dataclass
class Prepared:
    layout: ImageLayout  # the cache layout, with the image's metadata and tag
    tag: str
    root: Descriptor
    manifest: Manifest


def _cache_tag(ref: RemoteRef) -> str:
    """The tag in the cache layout: the registry's, or for a digest ``sha256-HEX``."""
    return f"sha256-{ref.digest.hex}" if ref.digest is not None else ref.reference


def prepare(registry: Registry, ref: RemoteRef, cache: Path) -> Prepared:
    """Fetch the manifest(s), the rootfs and the times blob into the layout at
    ``cache`` (what it has is not fetched again) and tag them there, last."""
    layout = ImageLayout(cache, create=True)
    store = layout.blobs
    with store.writing():
        media, data, digest = registry.get_manifest(ref.repo, ref.reference)
        if media not in (MEDIA_TYPE_MANIFEST, MEDIA_TYPE_INDEX):
            raise ImageError(f"{ref} is a {media}, not a puzzlefs image")
        store.put_verified(digest, data)
        if media == MEDIA_TYPE_INDEX:
            for part in split_parts(data, f"image index {ref}"):
                if not store.has(part.digest):
                    _, part_bytes, _ = registry.get_manifest(ref.repo, str(part.digest))
                    store.put_verified(part.digest, part_bytes)
        tag = _cache_tag(ref)
        root = Descriptor(media, digest, len(data))
        manifest = _merged(layout, tag, root)
        metadata = [manifest.config, manifest.rootfs]
        if manifest.times is not None:
            metadata.append(manifest.times)
        missing = [d for d in metadata if not store.has(d.digest) and not _inline(store, d)]
        if missing:  # at once: each costs a round trip

            def fetch(desc: Descriptor) -> None:
                blob = registry.get_blob(ref.repo, desc.digest, limit=max(desc.size, 1 << 20))
                store.put_verified(desc.digest, blob)

            with ThreadPoolExecutor(len(missing)) as pool:
                for f in [pool.submit(fetch, d) for d in missing]:
                    f.result()
        layout.set_tag(tag, digest, len(data), media_type=media)
    return Prepared(layout, tag, root, manifest)


def _inline(store: DiskBlobStore, desc: Descriptor) -> bool:
    """A blob the descriptor carries itself (``data``, as the empty config does),
    stored if its sha256 holds."""
    if desc.data is None:
        return False
    try:
        data = base64.b64decode(desc.data, validate=True)
    except binascii.Error:
        return False
    if Digest.of(data) != desc.digest:
        return False
    store.put_verified(desc.digest, data)
    return True


def _merged(layout: ImageLayout, tag: str, root: Descriptor) -> Manifest:
    class Pinned(ImageLayout):
        def resolve(self, t: str) -> Descriptor:
            return root

    return Pinned(layout.path).read_manifest(tag)[2]


def mount_remote(
    ref: RemoteRef,
    mountpoint: str | os.PathLike[str],
    *,
    client: ClientOptions | None = None,
    cache: str | os.PathLike[str] | None = None,
    prefetch_all: bool = False,
    prefetch_list: str | os.PathLike[str] | None = None,
    record: str | os.PathLike[str] | None = None,
    verity_digest: str | None = None,
    options: Iterable[str] = (),
    foreground: bool = False,
    init_pipe: str | None = None,
    log_file: str | None = None,
    threads: int = MOUNT_THREADS,
    workers: int = PREFETCH_WORKERS,
) -> None:
    """Mount a registry's image: live once its metadata is here, its chunks fetched
    on first use (and in the background: ``prefetch_all``, ``prefetch_list`` first)
    into the repository's cache layout. ``record``: append each chunk's digest to this
    file the first time a reader uses it (a prefetch list for the next mount)."""
    from puzzlefs.mount import mount

    first: list[Digest] = read_list(prefetch_list) if prefetch_list is not None else []
    record_path = os.path.abspath(record) if record is not None else None
    if record_path is not None:  # fail now, on the terminal, if it cannot be written
        with open(record_path, "a"):
            pass
    # A reader waits for its chunk: shorter timeouts than a pull's, still retried.
    base = client or ClientOptions()
    registry = Registry(
        ref.host,
        dataclasses.replace(
            base, timeout=min(base.timeout, 10.0), max_elapsed=min(base.max_elapsed, 20.0)
        ),
    )
    try:
        # Absolute: the daemon serves from /, and its readahead helper opens blob paths.
        prepared = prepare(registry, ref, Path(os.path.abspath(cache_dir(ref, cache))))
    finally:
        registry.close()  # the daemon makes its own connections
    fetcher = Fetcher(
        registry, ref.repo, prepared.layout.blobs, prepared.manifest.chunk_blobs(),
        workers=workers,
    )  # fmt: skip
    lazy = LazyLayout(prepared.layout.path, prepared.tag, prepared.root, fetcher)

    held = []

    def started() -> None:
        # In the serving process: the store is held as a writer's for the mount's life
        # (gc of the cache waits), and the workers start.
        lock = lazy.blobs.writing()
        lock.__enter__()
        held.append(lock)  # released when the process ends
        fetcher.start(prefetch_all=prefetch_all, first=first, record=record_path)

    mount(
        prepared.layout.path,
        prepared.tag,
        mountpoint,
        verity_digest=verity_digest,
        options=[f"fsname={_escape(str(ref))}", *options],
        foreground=foreground,
        init_pipe=init_pipe,
        log_file=log_file,
        threads=threads,
        layout=lazy,
        on_live=started,
        serial_reads=False,
    )


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,")
