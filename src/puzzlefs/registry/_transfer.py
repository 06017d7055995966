"""Push and pull: an image's manifests and blobs between a local layout and a registry.

An image is the tag's manifest (or image index) and everything it leads to: child
manifests, configs, layers. Blobs move many at a time on the client's kept-alive
connections (threads: measured against httpx's asyncio client, they cost half the CPU
per request), each verified by sha256 before it is stored; manifests are moved after
the blobs they name, children before the index above them, the tag last.

Push asks first whether the registry has each blob (HEAD) and uploads only the ones it
lacks, mounting them from another repository of the same registry when told one
(``mount_from``). Pull keeps what it stores: every blob is put into the layout's store
as soon as it is complete and verified, so a pull that is interrupted and run again
fetches only what is missing; the tag is committed last (the store's rules,
:mod:`puzzlefs.oci.store`).
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from puzzlefs.digest import Digest
from puzzlefs.errors import ImageError, PuzzleFSError, UsageError
from puzzlefs.oci import Descriptor, ImageLayout
from puzzlefs.oci.layout import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_JSON_BLOB,
    is_platform_index,
    load_json,
    pick_platform,
)
from puzzlefs.oci.store import BlobStore
from puzzlefs.progress import Progress
from puzzlefs.registry._client import Registry
from puzzlefs.registry._reference import RemoteRef

__all__ = ["Image", "TransferReport", "copy_local", "local_image", "pull", "push"]

MAX_DEPTH = 4  # indexes inside indexes
IN_MEMORY = 8 << 20  # larger blobs are streamed to and from files


@dataclass
class Image:
    """Everything one tag leads to."""

    root: Descriptor
    manifests: list[tuple[Descriptor, bytes]]  # children first, the root last
    blobs: list[Descriptor]  # configs and layers, each once


@dataclass
class TransferReport:
    digest: Digest  # of what the tag names
    media_type: str
    blobs: int = 0  # the image's blobs (not manifests)
    bytes: int = 0  # their size
    moved: int = 0  # blobs sent or fetched
    moved_bytes: int = 0
    mounted: int = 0  # blobs mounted from another repository
    present: int = 0  # blobs the other side had
    manifests: int = 0
    requests: int = 0
    wire_bytes: int = 0  # body bytes over the network, both ways

    def summary(self, verb: str) -> str:
        parts = [f"{self.moved:,} of {self.blobs:,} blobs {verb} ({_mb(self.moved_bytes)})"]
        if self.mounted:
            parts.append(f"{self.mounted:,} mounted from another repository")
        parts.append(f"{self.present:,} already there")
        return f"{', '.join(parts)}; {self.media_type.rsplit('.', 2)[-2]} {self.digest}"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _children(data: bytes, desc: Descriptor, where: str) -> tuple[list[Descriptor], list[Any]]:
    """(child manifests, other blobs) named by a manifest or an index."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ImageError(f"{where} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ImageError(f"{where} is not a JSON object")
    raw: list[Any] = []
    manifests: list[Descriptor] = []
    if desc.media_type in INDEX_TYPES:
        entries = obj.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"{where}: an index without a manifests list")
        for i, e in enumerate(entries):
            manifests.append(Descriptor.from_json(e, f"{where} manifest {i}"))
        return manifests, raw
    if isinstance(obj.get("config"), dict):
        raw.append(obj["config"])
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise ImageError(f"{where}: a manifest without a layers list")
    raw += layers
    blobs = [Descriptor.from_json(d, f"{where} blob {i}") for i, d in enumerate(raw)]
    return [], blobs


def _walk(root: Descriptor, read: Callable[[Descriptor], bytes], where: str) -> Image:
    manifests: list[tuple[Descriptor, bytes]] = []
    blobs: dict[Digest, Descriptor] = {}
    seen: set[Digest] = set()

    def visit(desc: Descriptor, depth: int, what: str) -> None:
        if desc.digest in seen:
            return
        seen.add(desc.digest)
        if desc.media_type not in MANIFEST_TYPES + INDEX_TYPES:
            raise ImageError(f"{what}: {desc.media_type} is not a manifest or an index")
        if depth > MAX_DEPTH:
            raise ImageError(f"{what}: indexes nested deeper than {MAX_DEPTH}")
        if desc.size > MAX_JSON_BLOB:
            raise ImageError(f"{what} is implausibly large ({desc.size} bytes)")
        data = read(desc)
        if len(data) != desc.size:
            raise ImageError(f"{what}: {len(data)} bytes, its descriptor says {desc.size}")
        children, leaves = _children(data, desc, what)
        for i, child in enumerate(children):
            visit(child, depth + 1, f"{what} manifest {i} ({child.digest.hex[:12]})")
        for leaf in leaves:
            blobs.setdefault(leaf.digest, leaf)
        manifests.append((desc, data))

    visit(root, 0, where)
    return Image(root, manifests, list(blobs.values()))


def local_image(layout: ImageLayout, tag: str) -> Image:
    root = layout.resolve(tag)
    return _walk(root, lambda d: layout.blobs.get(d.digest), f"{layout.path}:{tag}")


def _pool(registry: Registry) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, registry.options.connections), "puzzlefs-transfer")


def _run_all(pool: ThreadPoolExecutor, tasks: Iterable[Callable[[], None]]) -> None:
    """Run every task; on the first failure cancel what has not started and raise it."""
    futures: list[Future[None]] = [pool.submit(t) for t in tasks]
    try:
        for f in futures:
            f.result()
    except BaseException:
        for f in futures:
            f.cancel()
        wait(futures)
        raise


def push(
    layout: ImageLayout,
    tag: str,
    registry: Registry,
    dest: RemoteRef,
    *,
    mount_from: str | None = None,
    progress: Progress | None = None,
) -> TransferReport:
    """Upload ``layout:tag`` to ``dest`` (its tag, or by digest)."""
    image = local_image(layout, tag)
    report = TransferReport(image.root.digest, image.root.media_type)
    report.blobs = len(image.blobs)
    report.bytes = sum(b.size for b in image.blobs)
    lock = threading.Lock()
    store = layout.blobs
    requests0 = registry.requests
    wire0 = registry.bytes_in + registry.bytes_out

    # Where the registry mounts a repository's own blobs into it (the distribution
    # server does), one POST both asks whether it has a blob and, if not, opens its
    # upload: a fifth less of the registry's work per blob than a HEAD and a POST.
    # Found out on the first blob, once the registry has it.
    ask_by_mount = False

    def send(desc: Descriptor) -> None:
        size = store.size(desc.digest)
        if ask_by_mount:
            how = registry.upload_blob(
                dest.repo, desc.digest, size, _reader(store, desc.digest, size),
                mount_from=dest.repo,
            )  # fmt: skip
        elif registry.blob_size(dest.repo, desc.digest) is not None:
            how = "present"
        else:
            how = registry.upload_blob(
                dest.repo, desc.digest, size, _reader(store, desc.digest, size),
                mount_from=mount_from,
            )  # fmt: skip
        with lock:
            if how == "present":
                report.present += 1
            elif how == "mounted":
                report.mounted += 1
            else:
                report.moved += 1
                report.moved_bytes += size
        _tick(progress, size if how == "uploaded" else 0)

    registry.base_url()  # one ping (scheme, authentication) before the crowd
    blobs = image.blobs
    if blobs:
        send(blobs[0])
        # With --mount-from, a HEAD in the repository and a mount from the other.
        ask_by_mount = mount_from is None and registry.mounts_own_blobs(dest.repo, blobs[0].digest)
    with _pool(registry) as pool:
        _run_all(pool, [functools.partial(send, d) for d in blobs[1:]])
    for desc, data in image.manifests[:-1]:  # children, by digest
        registry.put_manifest(dest.repo, str(desc.digest), desc.media_type, data)
        report.manifests += 1
    root, data = image.manifests[-1]
    registry.put_manifest(dest.repo, dest.reference, root.media_type, data)
    report.manifests += 1
    report.requests = registry.requests - requests0
    report.wire_bytes = registry.bytes_in + registry.bytes_out - wire0
    if progress:
        progress.done()
    return report


def _tick(progress: Progress | None, size: int) -> None:
    if progress is not None:
        progress.add("blobs")
        if size:
            progress.add("bytes", size)


def _reader(store: BlobStore, digest: Digest, size: int) -> Callable[[int, int], bytes]:
    """The blob's bytes by range: small blobs read (and checked) whole, large ones
    from the file (the registry checks the digest of what it assembled)."""
    path = store.path(digest)
    if size <= IN_MEMORY or path is None:
        data = store.get(digest)
        return lambda offset, length: data[offset : offset + length]

    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read


def pull(
    registry: Registry,
    src: RemoteRef,
    layout: ImageLayout,
    tag: str,
    *,
    progress: Progress | None = None,
    local: Iterable[BlobStore] = (),
    all_platforms: bool = False,
) -> TransferReport:
    """Fetch ``src`` into ``layout`` under ``tag``. Blobs the layout has are kept and
    not fetched; ``local`` stores (a mount's cache, say) are asked before the
    registry. An index of platforms gives this machine's image only (the tag names
    its manifest), as skopeo copies it, unless ``all_platforms``."""
    others = list(local)
    requests0 = registry.requests
    wire0 = registry.bytes_in + registry.bytes_out
    with layout.blobs.writing():
        media, data, digest = registry.get_manifest(src.repo, src.reference)
        if media not in MANIFEST_TYPES + INDEX_TYPES:
            raise UsageError(f"{src} is a {media}, not an image manifest or index")
        for _ in range(MAX_DEPTH):
            if all_platforms or media not in INDEX_TYPES:
                break
            index = load_json(data, f"image index {src}")
            if not is_platform_index(index):
                break
            chosen = pick_platform(index, f"image index {src}")
            # Asked for by digest: get_manifest checks the bytes against it.
            media, data, digest = registry.get_manifest(src.repo, str(chosen.digest))
            if media != chosen.media_type:
                raise ImageError(f"manifest {chosen.digest} of {src} is a {media}; its "
                                 f"index says {chosen.media_type}")  # fmt: skip
        root = Descriptor(media, digest, len(data))
        store = layout.blobs

        def read(desc: Descriptor) -> bytes:
            if desc.digest == digest:
                return data
            if store.has(desc.digest):
                return store.get(desc.digest)
            _, child, _ = registry.get_manifest(src.repo, str(desc.digest))
            return child

        image = _walk(root, read, str(src))
        report = TransferReport(digest, media)
        report.blobs = len(image.blobs)
        report.bytes = sum(b.size for b in image.blobs)
        lock = threading.Lock()

        def fetch(desc: Descriptor) -> None:
            if store.has(desc.digest):
                with lock:
                    report.present += 1
                _tick(progress, 0)
                return
            for other in others:
                if other.has(desc.digest):
                    try:
                        store.put_stream(desc.digest, [other.get(desc.digest, verify=False)])
                    except PuzzleFSError:
                        continue  # a bad copy there: the registry's then
                    with lock:
                        report.present += 1
                    _tick(progress, 0)
                    return
            if desc.size <= IN_MEMORY:
                blob = registry.get_blob(src.repo, desc.digest, limit=max(desc.size, IN_MEMORY))
                store.put_verified(desc.digest, blob)
                size = len(blob)
            else:
                registry.get_blob(
                    src.repo, desc.digest, lambda pieces: store.put_stream(desc.digest, pieces)
                )
                size = store.size(desc.digest)
            with lock:
                report.moved += 1
                report.moved_bytes += size
            _tick(progress, size)

        with _pool(registry) as pool:
            _run_all(pool, [functools.partial(fetch, d) for d in image.blobs])
        for desc, blob in image.manifests:
            store.put_verified(desc.digest, blob)  # verified when fetched
            report.manifests += 1
        layout.set_tag(tag, digest, len(data), media_type=media)
    report.requests = registry.requests - requests0
    report.wire_bytes = registry.bytes_in + registry.bytes_out - wire0
    if progress:
        progress.done()
    return report


def copy_local(src: ImageLayout, src_tag: str, dest: ImageLayout, dest_tag: str) -> TransferReport:
    """``oci:`` to ``oci:``: every blob copied through the destination's store (which
    verifies it), the tag last."""
    image = local_image(src, src_tag)
    report = TransferReport(image.root.digest, image.root.media_type)
    report.blobs = len(image.blobs)
    with dest.blobs.writing():
        for desc in image.blobs:
            report.bytes += desc.size
            if dest.blobs.has(desc.digest):
                report.present += 1
                continue
            dest.blobs.put_stream(desc.digest, _file_pieces(src.blobs, desc.digest))
            report.moved += 1
            report.moved_bytes += desc.size
        for desc, data in image.manifests:
            dest.blobs.put_verified(desc.digest, data)
            report.manifests += 1
        dest.set_tag(dest_tag, image.root.digest, image.root.size, media_type=image.root.media_type)
    return report


def _file_pieces(store: BlobStore, digest: Digest) -> Iterator[bytes]:
    path = store.path(digest)
    if path is None:
        yield store.get(digest)
        return
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            yield piece
