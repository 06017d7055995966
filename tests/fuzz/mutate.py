"""Mutations of an image's files: byte-level, JSON-aware, schema-aware, seek-table-aware,
and of the kind of file each one is.

Every function takes the case's layout and a ``random.Random`` and returns a short
description of what it did (for the findings list). Everything is drawn from the rng,
so a (seed, case number) pair always makes the same case.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from puzzlefs.format import BlobRef, DirEntry, FileChunk, Ino, Inode, Kind, Rootfs, encode_rootfs

from .layout import CaseLayout, read_file, replace_file

INTERESTING_8 = [0x00, 0x01, 0x7F, 0x80, 0xFF]
INTERESTING_32 = [0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 4096, 1 << 20, 1 << 30]
INTERESTING_64 = [0, 1, 2, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 1 << 40]


# -- bytes ------------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One to four havoc steps, as AFL stacks them."""
    out = bytearray(data)
    steps = []
    for _ in range(rng.choice([1, 1, 1, 2, 4])):
        op = rng.choice(
            ["flip", "byte", "word32", "word64", "truncate", "extend", "delete", "insert", "dup"]
        )
        steps.append(op)
        n = len(out)
        if op == "flip" and n:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(n)
                out[i] ^= 1 << rng.randrange(8)
        elif op == "byte" and n:
            out[rng.randrange(n)] = rng.choice(INTERESTING_8)
        elif op == "word32" and n >= 4:
            i = rng.randrange(n - 3)
            out[i : i + 4] = struct.pack("<I", rng.choice(INTERESTING_32))
        elif op == "word64" and n >= 8:
            i = (
                rng.randrange(0, n - 7, 8)
                if n >= 16 and rng.random() < 0.7
                else rng.randrange(n - 7)
            )
            out[i : i + 8] = struct.pack("<Q", rng.choice(INTERESTING_64))
        elif op == "truncate":
            del out[rng.randrange(n + 1) if n else 0 :]
        elif op == "extend":
            out += rng.choice([bytes(rng.randint(1, 64)), rng.randbytes(rng.randint(1, 64))])
        elif op == "delete" and n:
            i = rng.randrange(n)
            del out[i : i + rng.randint(1, 64)]
        elif op == "insert":
            i = rng.randrange(n + 1)
            out[i:i] = rng.randbytes(rng.randint(1, 32))
        elif op == "dup" and n:
            i = rng.randrange(n)
            piece = out[i : i + rng.randint(1, 256)]
            j = rng.randrange(n + 1)
            out[j:j] = piece
    return bytes(out), "bytes: " + "+".join(steps)


def mutate_words(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Cap'n Proto is made of 64-bit words (pointers are words): change whole words."""
    out = bytearray(data)
    n = len(out) // 8
    if n == 0:
        return mutate_bytes(data, rng)
    picks = []
    for _ in range(rng.randint(1, 3)):
        w = rng.randrange(n)
        value = rng.choice(
            INTERESTING_64
            + [
                rng.getrandbits(64),
                int.from_bytes(out[w * 8 : w * 8 + 8], "little") ^ (1 << rng.randrange(64)),
            ]
        )
        out[w * 8 : w * 8 + 8] = struct.pack("<Q", value)
        picks.append(w)
    return bytes(out), f"words {picks}"


# -- JSON -------------------------------------------------------------------------------

_RAW = "\0raw\0"  # a placeholder replaced by raw JSON text after dumping


def _hostile_values(rng: random.Random) -> list[tuple[Any, str | None]]:
    """(value, raw text or None): what a field may be replaced with."""
    return [
        (None, None),
        (True, None),
        (-1, None),
        (0, None),
        (1 << 64, None),
        (2**63, None),
        (1.5, None),
        ("", None),
        ("x" * 100_000, None),
        ("sha256:" + "0" * 64, None),
        ("sha256:../../../etc/passwd", None),
        ([], None),
        ({}, None),
        ([1, "a", None], None),
        ({"nested": {"deeper": [1]}}, None),
        (_RAW, "[" * 50_000 + "]" * 50_000),
        (_RAW, "1e999"),
        (_RAW, "-0"),
        (_RAW, "NaN"),
        (_RAW, "9" * 5000),
        (_RAW, '"\\ud800"'),
        (_RAW, '"\\u0000"'),
        (rng.randint(-(2**70), 2**70), None),
    ]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate_json(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    obj = json.loads(data)
    paths = _paths(obj)
    path = rng.choice(paths[1:] or paths)
    parent = _get(obj, path[:-1]) if path else None
    key = path[-1] if path else None
    op = rng.choice(["replace", "replace", "replace", "delete", "add", "dup", "wrap", "annot"])
    raw: str | None = None
    if op == "annot":  # annotations, where the readers look things up
        target = _get(obj, path) if isinstance(_get(obj, path), dict) else obj
        value, raw = rng.choice(_hostile_values(rng))
        target["annotations"] = rng.choice(
            [
                {"org.opencontainers.image.ref.name": value},
                {"io.puzzlefsoci.puzzlefs.puzzlefs_verity_root_hash": value},
                value,
            ]
        )
    elif parent is None:
        value, raw = rng.choice(_hostile_values(rng))
        obj = value
    elif op == "replace":
        value, raw = rng.choice(_hostile_values(rng))
        parent[key] = value
    elif op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra", "mediaType", "size", "digest", "platform", "data"])] = (
            rng.choice(_hostile_values(rng))[0]
        )
    elif op == "dup" and isinstance(parent, list):
        parent.insert(rng.randrange(len(parent) + 1), parent[key])
    else:
        parent[key] = [parent[key]]
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    if raw is not None:
        text = text.replace(json.dumps(_RAW), raw)
    return text.encode("utf-8", "surrogatepass"), f"json {op} at {list(path)[:6]}"


# -- the rootfs, through the schema -----------------------------------------------------


def _hostile_name(rng: random.Random) -> bytes:
    return rng.choice(
        [b"", b".", b"..", b"a/b", b"/", b"x\0y", b"n" * 256, b"\xff\xfe", b"../../canary", b"ok"]
    )


def _mutate_inode(inode: Inode, rootfs: Rootfs, rng: random.Random, canary: Path) -> str:
    inos = [i.ino for layer in rootfs.layers for i in layer]
    chunk_refs = [c for layer in rootfs.layers for i in layer for c in i.chunks]
    field = rng.choice(
        ["ino", "kind", "owner", "perm", "entries", "chunks", "dev", "xattrs", "target", "below"]
    )
    if field == "ino":
        inode.ino = Ino(rng.choice([0, 1, (1 << 64) - 1, rng.choice(inos), max(inos) + 1]))
    elif field == "kind":
        inode.kind = rng.choice(list(Kind))
    elif field == "owner":
        inode.uid = rng.choice([0, 65534, (1 << 32) - 1])
        inode.gid = rng.choice([0, (1 << 32) - 1])
    elif field == "perm":
        inode.permissions = rng.choice([0, 0o7777, 0o17777, 0xFFFF, 0o4777])
    elif field == "entries":
        if inode.kind is not Kind.DIR:
            inode.kind = Kind.DIR
        op = rng.choice(["name", "target", "dup", "loop", "many", "clear"])
        if op == "name" or not inode.entries:
            inode.entries = [*inode.entries, DirEntry(Ino(rng.choice(inos)), _hostile_name(rng))]
        elif op == "target":
            e = rng.choice(inode.entries)
            e_new = DirEntry(Ino(rng.choice([0, 1, inode.ino, (1 << 64) - 1, *inos])), e.name)
            inode.entries = [e_new if x is e else x for x in inode.entries]
        elif op == "dup":
            inode.entries = [*inode.entries, rng.choice(inode.entries)]
        elif op == "loop":
            inode.entries = [*inode.entries, DirEntry(Ino(1), b"up")]
        elif op == "many":
            inode.entries = [DirEntry(Ino(rng.choice(inos)), b"e%d" % i) for i in range(2000)]
        else:
            inode.entries = []
        return f"inode {inode.ino}: entries {op}"
    elif field == "chunks":
        if inode.kind is not Kind.FILE:
            inode.kind = Kind.FILE
        op = rng.choice(["digest", "offset", "len", "compressed", "repeat", "other", "clear"])
        chunks = list(inode.chunks)
        if not chunks:
            chunks = [
                rng.choice(chunk_refs) if chunk_refs else FileChunk(BlobRef(bytes(32), 0, False), 1)
            ]
        i = rng.randrange(len(chunks))
        c = chunks[i]
        b = c.blob
        if op == "digest":
            b = BlobRef(
                rng.choice([bytes(32), rng.randbytes(32), b.digest[:31], b""]),
                b.offset,
                b.compressed,
            )
        elif op == "offset":
            b = BlobRef(b.digest, rng.choice(INTERESTING_64 + [b.offset + c.len + 1]), b.compressed)
        elif op == "len":
            c = FileChunk(b, rng.choice(INTERESTING_64 + [c.len + 1]))
        elif op == "compressed":
            b = BlobRef(b.digest, b.offset, not b.compressed)
        elif op == "repeat":
            chunks = chunks * rng.choice([2, 100, 5000])
        elif op == "other" and chunk_refs:
            c = rng.choice(chunk_refs)
            b = c.blob
        elif op == "clear":
            chunks = []
        if chunks and op not in ("repeat", "clear"):
            chunks[i] = FileChunk(b, c.len)
        inode.chunks = chunks
        return f"inode {inode.ino}: chunks {op}"
    elif field == "dev":
        inode.kind = rng.choice([Kind.CHR, Kind.BLK])
        inode.major = rng.choice(INTERESTING_64 + [4095, 4096])
        inode.minor = rng.choice(INTERESTING_64 + [(1 << 20) - 1, 1 << 20])
    elif field == "xattrs":
        inode.xattrs = [
            *inode.xattrs,
            (
                rng.choice([b"", b"user.a\0b", b"user." + b"k" * 300, b"noname", b"user.ok"]),
                rng.choice([b"", b"v", bytes(70_000)]),
            ),
        ]
    elif field == "target":
        inode.kind = Kind.LNK
        inode.symlink_target = rng.choice(
            [b"", b"a\0b", b"t" * 5000, os.fsencode(canary), b"../../canary", b"/"]
        )
    else:
        inode.look_below = True
    return f"inode {inode.ino}: {field}"


def mutate_rootfs(rootfs: Rootfs, rng: random.Random, canary: Path) -> str:
    op = rng.random()
    if op < 0.75:
        layer = rng.choice(rootfs.layers)
        if not layer:
            return "empty layer"
        return _mutate_inode(rng.choice(layer), rootfs, rng, canary)
    layer = rng.choice(rootfs.layers)
    choice = rng.choice(["drop", "dup", "unsort", "add-layer", "swap", "verity", "version", "wht"])
    if choice == "drop" and layer:
        layer.pop(rng.randrange(len(layer)))
    elif choice == "dup" and layer:
        i = rng.randrange(len(layer))
        layer.insert(i, layer[i])
    elif choice == "unsort":
        rng.shuffle(layer)
    elif choice == "add-layer":
        rootfs.layers.insert(rng.randrange(len(rootfs.layers) + 1), rng.choice([[], list(layer)]))
    elif choice == "swap":
        rootfs.layers.reverse()
    elif choice == "verity":
        keys = list(rootfs.verity)
        if keys and rng.random() < 0.5:
            del rootfs.verity[rng.choice(keys)]
        else:
            rootfs.verity[rng.randbytes(rng.choice([31, 32]))] = rng.randbytes(rng.choice([0, 32]))
    elif choice == "version":
        rootfs.manifest_version = rng.choice([0, 2, 4, (1 << 64) - 1])
    elif choice == "wht" and layer:
        rng.choice(layer).kind = Kind.WHT
    return f"rootfs {choice}"


# -- compressed chunks: the seek table --------------------------------------------------

_FOOTER = struct.Struct("<IBI")


def mutate_seek_table(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = len(data)
    if n < 17 or struct.unpack_from("<I", data, n - 4)[0] != 0x8F92EAB1:
        return mutate_bytes(data, rng)
    nframes, descriptor, magic = _FOOTER.unpack_from(data, n - 9)
    table_start = n - 9 - nframes * 8
    out = bytearray(data)
    op = rng.choice(["decompressed", "compressed", "frames", "descriptor", "gigabyte", "magic"])
    if op == "decompressed" and nframes:
        i = rng.randrange(nframes)
        struct.pack_into("<I", out, table_start + i * 8 + 4, rng.choice(INTERESTING_32))
    elif op == "compressed" and nframes:
        i = rng.randrange(nframes)
        struct.pack_into("<I", out, table_start + i * 8, rng.choice(INTERESTING_32))
    elif op == "frames":
        struct.pack_into("<I", out, n - 9, rng.choice([0, nframes - 1, nframes + 1, 0xFFFFFFFF]))
    elif op == "descriptor":
        out[n - 5] = rng.choice([0x80, 0x7C, 0x01, 0xFF])
    elif op == "gigabyte" and nframes:
        # every frame declares 1 GiB / nframes: the 34 KB chunk of 1 GiB
        each = min((1 << 30) // nframes, 0xFFFFFFFF)
        for i in range(nframes):
            struct.pack_into("<I", out, table_start + i * 8 + 4, each)
    else:
        struct.pack_into("<I", out, n - 4, magic ^ 1)
    return bytes(out), f"seek table {op}"


# -- the kind of file -------------------------------------------------------------------

FILE_KINDS = ["fifo", "dev-zero-link", "sparse-3g", "directory", "empty", "missing", "device"]


def make_kind(path: Path, kind: str) -> str:
    """Replace ``path`` with something that is not the file it was."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero-link":
        os.symlink("/dev/zero", path)
    elif kind == "sparse-3g":
        with open(path, "wb") as f:
            f.truncate(3 << 30)
    elif kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "device":
        if os.geteuid() == 0:
            os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero's numbers
        else:
            os.symlink("/dev/zero", path)
    return f"{path.name[:12]} is a {kind}"


# -- the targets ------------------------------------------------------------------------

Mutation = Callable[[CaseLayout, random.Random, Path], str]


def _fixed(rng: random.Random) -> bool:
    return rng.random() < 0.7  # most cases must reach the parsers


def m_index(case: CaseLayout, rng: random.Random, canary: Path) -> str:
    data = read_file(case.path / "index.json")
    new, what = mutate_json(data, rng) if rng.random() < 0.6 else mutate_bytes(data, rng)
    case.set_index(new)
    return f"index.json {what}"


def m_oci_layout(case: CaseLayout, rng: random.Random, canary: Path) -> str:
    path = case.path / "oci-layout"
    if rng.random() < 0.5:
        return "oci-layout " + make_kind(path, rng.choice(FILE_KINDS))
    new, what = mutate_json(read_file(path), rng)
    replace_file(path, new)
    return f"oci-layout {what}"


def m_manifest(case: CaseLayout, rng: random.Random, canary: Path) -> str:
    hexd = case.manifest_hex()
    data = case.read(hexd)
    new, what = mutate_json(data, rng) if rng.random() < 0.7 else mutate_bytes(data, rng)
    if _fixed(rng):
        case.set_manifest(new)
        return f"manifest {what}, fixed"
    case.unfixed(hexd, new)
    return f"manifest {what}, unfixed"


def m_config(case: CaseLayout, rng: random.Random, canary: Path) -> str:
    hexd = case.config_hex()
    data = case.read(hexd)
    new, what = mutate_json(data, rng) if rng.random() < 0.5 else mutate_bytes(data, rng)
    if _fixed(rng):
        case.set_config(new)
        return f"config {what}, fixed"
    case.unfixed(hexd, new)
    return f"config {what}, unfixed"


def m_rootfs(case: CaseLayout, rng: random.Random, canary: Path) -> str:
    hexd = case.rootfs_hex()
    if rng.random() < 0.6:  # through the schema
        fixed = _fixed(rng)
        for _ in range(20):
            rootfs = case.rootfs()
            what = mutate_rootfs(rootfs, rng, canary)
            try:
                data = encode_rootfs(rootfs)
            except Exception:  # a value the schema's types cannot hold: draw again
                continue
            if fixed:
                case.set_rootfs(data)
            else:
                case.unfixed(hexd, data)
            return f"rootfs schema: {what}, {'fixed' if fixed else 'unfixed'}"
        return "rootfs schema: nothing encodable"
    data = case.read(hexd)
    new, what = mutate_words(data, rng) if rng.random() < 0.5 else mutate_bytes(data, rng)
    if _fixed(rng):
        case.set_rootfs(new)
        return f"rootfs {what}, fixed"
    case.unfixed(hexd, new)
    return f"rootfs {what}, unfixed"


def m_chunk(case: CaseLayout, rng: random.Random, canary: Path) -> str:
    hexes = case.chunk_hexes()
    hexd = rng.choice(hexes)
    data = case.read(hexd)
    compressed = data[-4:] == struct.pack("<I", 0x8F92EAB1)
    r = rng.random()
    if compressed and r < 0.4:
        new, what = mutate_seek_table(data, rng)
    elif r < 0.5:
        new, what = rng.choice(
            [(bytes(20 << 20), "20 MiB of zeros"), (b"", "empty"), (data * 3, "tripled")]
        )
    else:
        new, what = mutate_bytes(data, rng)
    if _fixed(rng):
        case.set_chunk(hexd, new)
        return f"chunk {what}, fixed"
    case.unfixed(hexd, new)
    return f"chunk {what}, unfixed"


def m_file_kind(case: CaseLayout, rng: random.Random, canary: Path) -> str:
    which = rng.choice(["index.json", "manifest", "rootfs", "config", "chunk", "blobs-dir"])
    kind = rng.choice(FILE_KINDS)
    if which == "index.json":
        path = case.path / "index.json"
    elif which == "manifest":
        path = case.blobs / case.manifest_hex()
    elif which == "rootfs":
        path = case.blobs / case.rootfs_hex()
    elif which == "config":
        path = case.blobs / case.config_hex()
    elif which == "chunk":
        path = case.blobs / rng.choice(case.chunk_hexes())
    else:
        path = case.blobs
        kind = rng.choice(["dev-zero-link", "empty", "missing", "directory"])
        if kind == "directory":  # an empty store
            path.rename(case.path / "blobs" / "old")
            path.mkdir()
            return "blobs/sha256 is empty"
    return f"{which}: " + make_kind(path, kind)


TARGETS: dict[str, tuple[int, Mutation]] = {
    "rootfs": (30, m_rootfs),
    "chunk": (20, m_chunk),
    "manifest": (14, m_manifest),
    "index.json": (13, m_index),
    "config": (6, m_config),
    "oci-layout": (4, m_oci_layout),
    "file kinds": (13, m_file_kind),
}


def pick_target(rng: random.Random) -> str:
    names = list(TARGETS)
    return rng.choices(names, weights=[TARGETS[n][0] for n in names])[0]
