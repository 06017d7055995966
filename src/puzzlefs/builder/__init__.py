"""Build a PuzzleFS image from a directory tree.

Pipeline: walk (canonical order) -> one FastCDC stream over all file contents -> each
chunk hashed, optionally compressed, fs-verity-digested and stored, by worker processes
on large builds (:mod:`puzzlefs.builder.pipeline` says why not threads) -> Cap'n Proto
metadata -> OCI manifest -> tag. Results are consumed in chunk order, so the output
never depends on the number of workers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from puzzlefs.builder.delta import delta_layer, delta_pays, renumber
from puzzlefs.builder.pipeline import StoredChunk, run, worker_count
from puzzlefs.builder.pipeline import store_chunk as _store_chunk
from puzzlefs.builder.stream import ChunkMapper, FileStream
from puzzlefs.builder.walk import Node, Tree, iter_regular, walk
from puzzlefs.chunking import DEFAULT_PARAMS, ChunkParams
from puzzlefs.compression import REFERENCE_ZSTD, ZstdOptions
from puzzlefs.digest import Digest
from puzzlefs.errors import BuildError
from puzzlefs.format import (
    BlobRef,
    DirEntry,
    FileChunk,
    Ino,
    Inode,
    Kind,
    Rootfs,
    encode_rootfs,
)
from puzzlefs.format.times import encode_times
from puzzlefs.oci import (
    ANNOTATION_VERITY_ROOT,
    EMPTY_CONFIG,
    MANIFEST_LIMIT,
    MEDIA_TYPE_CHUNK,
    MEDIA_TYPE_CHUNK_ZSTD,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_ROOTFS,
    MEDIA_TYPE_TIMES,
    BlobStore,
    Descriptor,
    DiskBlobStore,
    ImageLayout,
    Manifest,
    canonical_json,
)
from puzzlefs.oci.layout import EMPTY_CONFIG_BYTES, chunk_part_bytes, split_index_bytes
from puzzlefs.progress import Progress
from puzzlefs.reader import Image
from puzzlefs.verity import fsverity_digest

__all__ = ["BuildResult", "StoredChunk", "build", "build_rootfs", "build_tree"]


@dataclass(frozen=True)
class BuildResult:
    manifest: Descriptor
    manifest_verity: str  # hex: what `mount --digest` takes
    rootfs: Descriptor
    chunks: int
    new_chunks: int
    data_bytes: int


def build_rootfs(
    tree: Tree,
    store: BlobStore,
    *,
    zstd: ZstdOptions | None = None,
    params: ChunkParams = DEFAULT_PARAMS,
    workers: int | None = None,
    progress: Progress | None = None,
) -> tuple[list[Inode], list[StoredChunk]]:
    """Chunk and store all file data of ``tree``, zstd-compressed with ``zstd`` if given;
    return its inodes (one layer, in ino order) and the chunks in stream order."""
    files: dict[Ino, list[FileChunk]] = {}
    chunks: list[StoredChunk] = []
    regular = [(n.ino, n.content or n.path, n.st.st_size) for n in iter_regular(tree)]
    if progress:
        progress.expect("files", len(regular))
        progress.expect("bytes", sum(size for _, _, size in regular))
    stream = FileStream(
        ((ino, source) for ino, source, _ in regular),
        on_file=(lambda n: progress.add("files")) if progress else None,
    )
    mapper = ChunkMapper(stream.spans)

    def on_chunk(length: int) -> list[tuple[Ino, int, int]]:
        if progress:
            progress.add("bytes", length)
        return mapper.map(length)

    def on_stored(sc: StoredChunk, pieces: list[tuple[Ino, int, int]]) -> None:
        chunks.append(sc)
        ref_offsets = BlobRef(sc.digest, 0, sc.compressed)
        for ino, offset, length in pieces:
            ref = ref_offsets if offset == 0 else BlobRef(sc.digest, offset, sc.compressed)
            files.setdefault(ino, []).append(FileChunk(ref, length))
        if progress:
            progress.add("chunks")

    n_workers = worker_count(workers, store, sum(size for _, _, size in regular))
    try:
        run(stream, params, store, zstd, n_workers, _store_chunk, on_chunk, on_stored)
    finally:
        stream.close()
    return [_inode(node, files) for node in tree.nodes], chunks


def _inode(node: Node, files: dict[Ino, list[FileChunk]]) -> Inode:
    st = node.st
    mode = st.st_mode
    inode = Inode(node.ino, _kind(mode), st.st_uid, st.st_gid, stat.S_IMODE(mode))
    kind = inode.kind
    if kind is Kind.DIR:
        inode.entries = [DirEntry(ino, name) for name, ino in node.entries]
    elif kind is Kind.FILE:
        inode.chunks = files.get(node.ino, [])
    elif kind in (Kind.CHR, Kind.BLK):
        inode.major, inode.minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif kind is Kind.LNK:
        if node.symlink_target is not None:
            inode.symlink_target = node.symlink_target
        else:
            try:
                inode.symlink_target = os.readlink(node.path)
            except OSError as e:
                path = os.fsdecode(node.path)
                raise BuildError(f"cannot read link {path}: {e.strerror}") from None
    inode.xattrs = sorted(node.xattrs) if node.xattrs is not None else _xattrs(node.path)
    return inode


_KINDS = {
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFREG: Kind.FILE,
    stat.S_IFLNK: Kind.LNK,
    stat.S_IFCHR: Kind.CHR,
    stat.S_IFBLK: Kind.BLK,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCK,
}


def _kind(mode: int) -> Kind:
    return _KINDS.get(stat.S_IFMT(mode), Kind.UNKNOWN)


def _xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    """Sorted by key bytes: the kernel's listing order differs between filesystems."""
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise BuildError(f"cannot list xattrs of {os.fsdecode(path)}: {e.strerror}") from None
    out = []
    for key in keys:
        try:
            value = os.getxattr(path, key, follow_symlinks=False)
        except OSError as e:
            raise BuildError(
                f"cannot read xattr {key} of {os.fsdecode(path)}: {e.strerror}"
            ) from None
        out.append((os.fsencode(key), value))
    out.sort()
    return out


# FastCDC sizes the image was cut with, so builds on it cut the same way.
ANNOTATION_CHUNK_SIZES = "io.puzzlefs.chunk-sizes"


def build(
    rootfs_dir: str | os.PathLike[str],
    oci_dir: str | os.PathLike[str],
    tag: str,
    *,
    compress: bool | ZstdOptions = False,
    params: ChunkParams | None = None,
    base_tag: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    mtimes: bool = True,
    store: DiskBlobStore | None = None,
    manifest_limit: int = MANIFEST_LIMIT,
) -> BuildResult:
    """Build ``rootfs_dir`` into ``oci_dir`` under ``tag``, on top of ``base_tag`` if
    given (a delta layer, FORMAT.md §6).

    ``manifest_limit``: the largest manifest to write (registries refuse more than
    4 MiB, about 26,000 chunks); an image whose manifest would be larger is tagged
    as an image index of several manifests (:mod:`puzzlefs.oci.layout`).

    ``mtimes``: keep every inode's modification time, in a times blob of the image
    (:mod:`puzzlefs.format.times`); without, times read as 0, as the reference has
    them, and the image does not depend on them.

    ``compress``: True stores chunks zstd-compressed as the reference does; a
    :class:`~puzzlefs.compression.ZstdOptions` chooses another frame size or level.

    ``params`` defaults to the base's chunk sizes (recorded in its manifest), else the
    reference's. On any failure every tag stays as it was (index.json is only replaced
    at the very end); chunks already stored stay for ``gc``, as another build may
    rely on them; a layout directory this build created is removed again when no
    other build is using it. ``store``: a store of ``oci_dir/blobs/sha256`` to use
    (one that injects faults, for tests).
    """
    tree = walk(os.fsencode(Path(rootfs_dir)))  # before touching the destination
    return build_tree(
        tree,
        oci_dir,
        tag,
        compress=compress,
        params=params,
        base_tag=base_tag,
        workers=workers,
        progress=progress,
        mtimes=mtimes,
        store=store,
        manifest_limit=manifest_limit,
    )


def build_tree(
    tree: Tree,
    oci_dir: str | os.PathLike[str],
    tag: str,
    *,
    compress: bool | ZstdOptions = False,
    params: ChunkParams | None = None,
    base_tag: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    mtimes: bool = True,
    store: DiskBlobStore | None = None,
    manifest_limit: int = MANIFEST_LIMIT,
) -> BuildResult:
    """Build an already numbered tree (from :func:`walk`, or a tar import)."""
    zstd = _zstd_options(compress)
    oci_path = Path(oci_dir)
    created = not oci_path.exists()
    if base_tag is not None and created:
        raise BuildError(f"{oci_path} does not exist, so it has no base tag {base_tag!r}")
    try:
        layout = ImageLayout(oci_path, create=True, blobs=store)
    except OSError as e:
        raise BuildError(f"cannot create {oci_path}: {e.strerror}") from None
    try:
        # The store's rules (puzzlefs.oci.store): a writer never removes a blob, and
        # holds the store from its first existence check until its tag is committed.
        with layout.blobs.writing():
            base = Image(layout, base_tag) if base_tag is not None else None
            if params is None:
                params = _base_params(base) if base else DEFAULT_PARAMS
            if base is not None and not delta_pays(tree, base):
                base = None  # a flat image is smaller than a delta here
            if base is not None:
                tree = renumber(tree, base)
            return _build_in_store(
                tree,
                layout,
                tag,
                zstd,
                params,
                workers,
                progress,
                base,
                mtimes,
                manifest_limit,
            )
    except BaseException:
        if created:
            _remove_unused_layout(layout)
        raise


def _remove_unused_layout(layout: ImageLayout) -> None:
    """After a failed build into a layout it created: remove the layout, unless another
    writer is at work in it or a tag was committed there meanwhile."""
    with contextlib.suppress(OSError), layout.blobs.collecting(wait=False) as alone:
        if alone:
            with layout.locked():
                if not layout.tags():
                    shutil.rmtree(layout.path, ignore_errors=True)


def _zstd_options(compress: bool | ZstdOptions) -> ZstdOptions | None:
    if isinstance(compress, ZstdOptions):
        return compress
    return REFERENCE_ZSTD if compress else None


def _base_params(base: Image) -> ChunkParams:
    text = base.manifest.annotations.get(ANNOTATION_CHUNK_SIZES)
    return ChunkParams.parse(text) if text else DEFAULT_PARAMS


def _build_in_store(
    tree: Tree,
    layout: ImageLayout,
    tag: str,
    zstd: ZstdOptions | None,
    params: ChunkParams,
    workers: int | None,
    progress: Progress | None,
    base: Image | None,
    mtimes: bool,
    manifest_limit: int = MANIFEST_LIMIT,
) -> BuildResult:
    store = layout.blobs
    times = encode_times((n.ino, n.st.st_mtime_ns) for n in tree.nodes) if mtimes else None
    inodes, chunks = build_rootfs(
        tree, store, zstd=zstd, params=params, workers=workers, progress=progress
    )
    if progress:
        progress.done()
    # The chunks are most of what must be on disk before the tag may point at them:
    # flush them while the metadata is made, so that set_tag's sync has little left.
    with _flushing(store):
        manifest, manifest_bytes, rootfs_desc, chunks = _write_metadata(
            layout, inodes, chunks, zstd, params, store.put, base, times, manifest_limit
        )
    layout.set_tag(tag, manifest.digest, manifest.size, media_type=manifest.media_type)
    return BuildResult(
        manifest,
        fsverity_digest(manifest_bytes).hex(),
        rootfs_desc,
        len(chunks),
        sum(c.new for c in chunks),
        sum(i.size for i in inodes if i.kind is Kind.FILE),
    )


@contextlib.contextmanager
def _flushing(store: BlobStore) -> Iterator[None]:
    """Run ``store.sync()`` in a thread for the duration of the block (the worker
    processes are gone by now: no fork happens while it runs)."""
    failure: list[BaseException] = []

    def flush() -> None:
        try:
            store.sync()
        except BaseException as e:  # raised in the builder's thread below
            failure.append(e)

    thread = threading.Thread(target=flush, name="puzzlefs-flush")
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if failure:
        raise failure[0]


def _write_metadata(
    layout: ImageLayout,
    inodes: list[Inode],
    chunks: list[StoredChunk],
    zstd: ZstdOptions | None,
    params: ChunkParams,
    put: Callable[[bytes], Digest],
    base: Image | None,
    times: bytes | None,
    manifest_limit: int = MANIFEST_LIMIT,
) -> tuple[Descriptor, bytes, Descriptor, list[StoredChunk]]:
    """Store the rootfs, config, times and manifest blobs; return the descriptor and
    bytes of what the tag names (the manifest, or beyond ``manifest_limit`` bytes an
    image index of manifest parts), the rootfs descriptor and the chunks the image
    uses."""
    store = layout.blobs
    chunk_type = MEDIA_TYPE_CHUNK_ZSTD if zstd else MEDIA_TYPE_CHUNK
    chunk_layers: dict[bytes, Descriptor] = {}
    if base is None:
        layers = [inodes]
        verity = {c.digest: c.verity for c in chunks}
    else:
        new_layer = delta_layer(inodes, base)
        layers = [new_layer] + [list(base.rootfs.layer(i)) for i in range(base.rootfs.layer_count)]
        used = {c.blob.digest for layer in layers for i in layer for c in i.chunks}
        verity = {d: v for d, v in base.verity_data.items() if d in used}
        verity.update((c.digest, c.verity) for c in chunks if c.digest in used)
        # Chunks written for files that turned out unchanged stay for gc: another
        # writer may have found them present meanwhile.
        chunks = [c for c in chunks if c.digest in used]
        for d in base.manifest.chunk_layers:
            if d.digest.raw in used:
                chunk_layers.setdefault(d.digest.raw, d)
        for raw in sorted(used - set(chunk_layers) - {c.digest for c in chunks}):
            # a base that does not list its chunks (the reference's delta tags)
            digest = Digest.from_raw(raw)
            chunk_layers[raw] = Descriptor(chunk_type, digest, store.size(digest))
    rootfs_bytes = encode_rootfs(Rootfs(layers, verity))
    rootfs_desc = Descriptor(
        MEDIA_TYPE_ROOTFS,
        put(rootfs_bytes),
        len(rootfs_bytes),
        {ANNOTATION_VERITY_ROOT: fsverity_digest(rootfs_bytes).hex()},
    )
    descriptors = [rootfs_desc]
    if times is not None:
        descriptors.append(Descriptor(MEDIA_TYPE_TIMES, put(times), len(times)))
    seen: set[bytes] = set()
    for c in chunks:
        if c.digest not in seen:
            seen.add(c.digest)
            descriptors.append(Descriptor(chunk_type, Digest.from_raw(c.digest), c.size))
    descriptors += [d for raw, d in chunk_layers.items() if raw not in seen]
    put(EMPTY_CONFIG_BYTES)
    annotations = {ANNOTATION_CHUNK_SIZES: str(params)}
    manifest_bytes = Manifest(EMPTY_CONFIG, descriptors, annotations).to_bytes()
    if len(manifest_bytes) <= manifest_limit:
        return Descriptor(MEDIA_TYPE_MANIFEST, put(manifest_bytes), len(manifest_bytes)), (
            manifest_bytes
        ), rootfs_desc, chunks  # fmt: skip
    fixed = 2 if times is not None else 1  # the rootfs and times layers
    index_bytes = _split_manifest(
        descriptors[:fixed], descriptors[fixed:], annotations, manifest_limit, put
    )
    index = Descriptor(MEDIA_TYPE_INDEX, put(index_bytes), len(index_bytes))
    return index, index_bytes, rootfs_desc, chunks


def _split_manifest(
    fixed: list[Descriptor],
    chunk_layers: list[Descriptor],
    annotations: dict[str, str],
    limit: int,
    put: Callable[[bytes], Digest],
) -> bytes:
    """An image whose manifest would exceed ``limit`` bytes: its manifest with the
    metadata layers and the chunk layers that fit, then manifests of the rest (in
    stream order), each within ``limit``, under one image index (oci/layout.py)."""
    sizes = [len(canonical_json(d.to_json())) + 1 for d in chunk_layers]  # with a comma
    groups: list[list[Descriptor]] = []
    start = 0
    room = limit - len(Manifest(EMPTY_CONFIG, fixed, annotations).to_bytes())
    while start < len(chunk_layers) or not groups:
        used, end = 0, start
        while end < len(chunk_layers) and used + sizes[end] <= room:
            used += sizes[end]
            end += 1
        if end == start and start < len(chunk_layers) and (groups or room < 0):
            raise BuildError(f"a manifest limit of {limit} bytes cannot hold one chunk layer")
        groups.append(chunk_layers[start:end])
        start = end
        room = limit - len(chunk_part_bytes([]))
    first = Manifest(EMPTY_CONFIG, fixed + groups[0], annotations).to_bytes()
    blobs = [first] + [chunk_part_bytes(g) for g in groups[1:]]
    assert all(len(b) <= limit for b in blobs)
    parts = [Descriptor(MEDIA_TYPE_MANIFEST, put(b), len(b)) for b in blobs]
    return split_index_bytes(parts)
