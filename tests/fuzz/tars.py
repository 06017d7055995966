"""Hostile OCI v1 images of tar layers, for ``puzzlefs import``.

The seed image is described member by member (:class:`Member`), so structure-aware
mutations change one member (its name, type, link, device, owner, pax records, sparse
map...) and write the tar again; then the layer's digests are fixed all the way up
(blob digest, config diff_id, manifest, index.json), or left stale. Byte-level
mutations hit the tar, or the compressed blob; JSON ones the manifest, config and
index.json; and a few cases are plain bombs (a small gzip of 300 MiB of zeros).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from .mutate import FILE_KINDS, make_kind, mutate_bytes, mutate_json

TAG = "t"

LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "sym": tarfile.SYMTYPE,
    "hard": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "cont": tarfile.CONTTYPE,
    "unknown": b"X",
}


@dataclass
class Member:
    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)
    sparse: tuple[int, list[tuple[int, bytes]]] | None = None  # realsize, data runs


def seed_layers() -> list[tuple[list[Member], str]]:
    rng = random.Random(3)
    return [
        (
            [
                Member("./", "dir", mode=0o755),
                Member("etc", "dir", mode=0o755),
                Member("etc/hostname", data=b"fuzz\n"),
                Member("etc/oldfile", data=b"removed by layer 2"),
                Member("usr/bin", "dir", mode=0o755),
                Member("usr/bin/tool", data=rng.randbytes(30_000), mode=0o755),
                Member("usr/bin/alias", "hard", link="usr/bin/tool"),
                Member("usr/lib", "sym", link="../lib"),
                Member("lib", "dir"),
                Member("lib/libx.so", data=rng.randbytes(5000)),
                Member("dev/null", "chr", mode=0o666, dev=(1, 3)),
                Member("dev/fifo", "fifo"),
                Member("x" * 200, data=b"long name"),
                Member("xattrs", data=b"x", pax={"SCHILY.xattr.user.k": "v"}),
                Member("owned", data=b"o", uid=1000, gid=100),
                Member("sparse", sparse=(1 << 20, [(0, b"head"), ((1 << 20) - 4, b"tail")])),
            ],
            "gzip",
        ),
        (
            [
                Member("etc/.wh.oldfile"),
                Member("lib/.wh..wh..opq"),
                Member("lib/libnew.so", data=rng.randbytes(3000)),
                Member("etc/hostname", data=b"changed\n"),
                Member("usr/bin/tool/", "dir"),
            ],
            "zstd",
        ),
        ([Member("top", data=b"top layer"), Member("usr/lib/viasymlink", data=b"v")], "none"),
    ]


def _sparse_info(m: Member) -> tuple[tarfile.TarInfo, bytes]:
    assert m.sparse is not None
    realsize, runs = m.sparse
    sparse_map = f"{len(runs)}\n" + "".join(f"{off}\n{len(d)}\n" for off, d in runs)
    block = sparse_map.encode().ljust(-(-len(sparse_map) // 512) * 512, b"\0")
    data = block + b"".join(d for _, d in runs)
    info = tarfile.TarInfo(f"GNUSparseFile.0/{m.name}")
    info.size = len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": m.name,
        "GNU.sparse.realsize": str(realsize),
        **m.pax,
    }
    return info, data


def make_tar(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for m in members:
            if m.sparse is not None:
                info, data = _sparse_info(m)
                tar.addfile(info, io.BytesIO(data))
                continue
            info = tarfile.TarInfo(m.name)
            info.type = _TYPES[m.kind]
            info.mode = m.mode
            info.uid, info.gid = m.uid, m.gid
            info.mtime = 0
            info.linkname = m.link
            info.devmajor, info.devminor = m.dev
            info.pax_headers = dict(m.pax)
            if m.kind in ("file", "cont", "unknown"):
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, 1, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(raw)
    return raw


class Source:
    """An OCI layout of tar layers, written by hand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(self, data: bytes) -> str:
        hexd = hashlib.sha256(data).hexdigest()
        p = self.blobs / hexd
        if not p.exists():
            p.write_bytes(data)
        return hexd

    def write(
        self,
        layers: list[tuple[bytes, str]],
        *,
        raw_layers: list[bytes] | None = None,
        stale: set[int] | None = None,
        seed_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """``layers``: (stored blob, compression); ``raw_layers`` their tars (for the
        diff_ids). ``stale``: layers whose diff_id stays ``seed_ids``'s."""
        from puzzlefs.oci.layout import host_architecture

        descs, ids = [], []
        for i, (blob, how) in enumerate(layers):
            hexd = self.put(blob)
            descs.append(
                {"digest": f"sha256:{hexd}", "mediaType": LAYER_TYPES[how], "size": len(blob)}
            )
            raw = raw_layers[i] if raw_layers else blob
            ids.append(
                seed_ids[i]
                if stale and i in stale and seed_ids
                else "sha256:" + hashlib.sha256(raw).hexdigest()
            )
        config = {
            "architecture": host_architecture(),
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ids},
        }
        cdata = json.dumps(config).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": f"sha256:{self.put(cdata)}",
                "size": len(cdata),
            },
            "layers": descs,
        }
        return manifest

    def tag(self, manifest: dict[str, Any] | bytes) -> None:
        data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": f"sha256:{self.put(data)}",
                    "size": len(data),
                    "annotations": {"org.opencontainers.image.ref.name": TAG},
                }
            ],
        }
        (self.path / "index.json").write_text(json.dumps(index))


def write_seed(path: Path, layers: list[tuple[list[Member], str]]) -> list[str]:
    """The seed image; returns its diff_ids."""
    src = Source(path)
    raws = [make_tar(ms) for ms, _ in layers]
    manifest = src.write(
        [(compress(r, how), how) for r, (_, how) in zip(raws, layers, strict=True)],
        raw_layers=raws,
    )
    src.tag(manifest)
    return [f"sha256:{hashlib.sha256(r).hexdigest()}" for r in raws]


# -- mutations ------------------------------------------------------------------------

_HOSTILE_NAMES = [
    "n" * 256,
    "/".join(["p" * 250] * 17),
    "../escape",
    "a/../../escape",
    "/absolute",
    "/",
    "./",
    "",
    ".wh.",
    ".wh..wh..opq",
    "a/.wh.b/c",
    ".wh..wh.plnk/1",
    "dir/./././x",
    "\udcff\udcfe-not-utf8",
    "usr/lib/../../escape",
    "usr/lib/through-symlink",
    "lib",
    "etc/hostname/below-a-file",
]


def mutate_member(layers: list[tuple[list[Member], str]], rng: random.Random) -> tuple[int, str]:
    li = rng.randrange(len(layers))
    members = layers[li][0]
    if not members or rng.random() < 0.25:
        members.append(Member(f"new{rng.randrange(100)}", data=b"new"))
    m = rng.choice(members)
    what = rng.choice(
        ["name", "kind", "link", "dev", "owner", "mode", "pax", "xattr", "sparse", "dup", "deep"]
    )
    if what == "name":
        m.name = rng.choice(_HOSTILE_NAMES)
    elif what == "kind":
        m.kind = rng.choice(list(_TYPES))
        m.link = m.link or rng.choice(["usr/bin/tool", "nothing", "etc"])
    elif what == "link":
        m.kind = rng.choice(["hard", "sym"])
        m.link = rng.choice(
            ["", "nothing", m.name, "etc", "/etc/passwd", "../../x", "t" * 5000, "usr/lib/libx.so"]
        )
    elif what == "dev":
        m.kind = rng.choice(["chr", "blk"])
        m.dev = (
            rng.choice([0, 4095, 4096, 2**21 - 1]),
            rng.choice([0, 2**20 - 1, 2**20, 2**21 - 1]),
        )
    elif what == "owner":
        m.pax["uid"] = str(rng.choice([2**32, 2**32 - 1, 2**63, -1]))
        m.pax["gid"] = str(rng.choice([0, 2**40]))
    elif what == "mode":
        m.mode = rng.choice([0o7777, 0o177777, 0])
    elif what == "pax":
        key = rng.choice(["path", "linkpath", "size", "uid", "mtime", "GNU.sparse.size", "x"])
        m.pax[key] = rng.choice(["a\0b", "9" * 30, "-5", "", "not a number", "1e9", "../up"])
    elif what == "xattr":
        key = rng.choice(["user.a\0b", "nonamespace", "user." + "k" * 300, "", "trusted.ok"])
        m.pax[f"SCHILY.xattr.{key}"] = rng.choice(["v", "x" * 70_000])
        if rng.random() < 0.3:
            m.pax["LIBARCHIVE.xattr.user.b64"] = rng.choice(["!!notbase64", "dmFs"])
    elif what == "sparse":
        realsize = rng.choice([10 << 30, 1 << 20, 0, 100])
        runs = rng.choice(
            [[(5 << 30, b"data")], [(100, b"x"), (50, b"y")], [(0, b"x" * 10), (5, b"y")], []]
        )
        m.sparse = (realsize, runs)
    elif what == "dup":
        members.append(copy.deepcopy(m))
    else:
        m.name = "/".join(f"d{i}" for i in range(rng.choice([300, 1000]))) + "/deep"
    return li, f"layer {li + 1}: member {what}"


def _bomb() -> bytes:
    """A gzip of a tar holding 300 MiB of zeros (about 300 KB), made once."""
    global _BOMB
    if _BOMB is None:
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
            info = tarfile.TarInfo("bomb")
            info.size = 300 << 20
            gz.write(info.tobuf(tarfile.PAX_FORMAT))
            zero = bytes(1 << 20)
            for _ in range(300):
                gz.write(zero)
            gz.write(bytes(1024))
        _BOMB = buf.getvalue()
    return _BOMB


_BOMB: bytes | None = None


def make_case(path: Path, rng: random.Random) -> str:
    """Write one hostile source image at ``path``; return what was done."""
    layers = seed_layers()
    seed_ids = [f"sha256:{hashlib.sha256(make_tar(ms)).hexdigest()}" for ms, _ in layers]
    src = Source(path)
    op = rng.choices(
        ["member", "tar-bytes", "blob-bytes", "bomb", "json", "file-kind", "media"],
        weights=[45, 15, 10, 3, 15, 7, 5],
    )[0]
    fixed = rng.random() < 0.8
    what = op
    raws = [make_tar(ms) for ms, _ in layers]
    blobs = [compress(r, how) for r, (_, how) in zip(raws, layers, strict=True)]
    hows = [how for _, how in layers]
    stale: set[int] = set()
    if op == "member":
        changed: dict[int, str] = {}
        for _ in range(rng.choice([1, 1, 2])):
            i, what = mutate_member(layers, rng)
            changed[i] = what
        what = "; ".join(changed.values())
        for i in changed:
            try:
                raws[i] = make_tar(layers[i][0])
            except (ValueError, OverflowError, tarfile.TarError, UnicodeError) as e:
                what += f" (tarfile cannot write it: {type(e).__name__}; bytes instead)"
                raws[i], _ = mutate_bytes(raws[i], rng)
            blobs[i] = compress(raws[i], hows[i])
            if not fixed:
                stale.add(i)
    elif op == "tar-bytes":
        i = rng.randrange(len(raws))
        raws[i], what = mutate_bytes(raws[i], rng)
        blobs[i] = compress(raws[i], hows[i])
        what = f"layer {i + 1} tar {what}"
        if not fixed:
            stale.add(i)
    elif op == "blob-bytes":
        i = rng.randrange(len(raws))
        blobs[i], what = mutate_bytes(blobs[i], rng)
        what = f"layer {i + 1} blob {what}"
        stale.add(i)  # the uncompressed tar is not known
    elif op == "bomb":
        i = rng.randrange(len(raws))
        blobs[i], hows[i] = _bomb(), "gzip"
        stale.add(i)
        what = f"layer {i + 1}: a gzip bomb"
    manifest = src.write(
        list(zip(blobs, hows, strict=True)), raw_layers=raws, stale=stale, seed_ids=seed_ids
    )
    if op == "media":
        d = rng.choice(manifest["layers"] + [manifest["config"]])
        d["mediaType"] = rng.choice(
            [
                "application/vnd.puzzlefs.image.rootfs.v1",
                OCI_INDEX,
                "text/plain",
                "application/vnd.oci.image.layer.v1.tar+bzip2",
                LAYER_TYPES[rng.choice(list(LAYER_TYPES))],
            ]
        )
        what = "media type"
    if op == "json":
        part = rng.choice(["manifest", "config", "index"])
        if part == "config":
            cdesc = manifest["config"]
            cpath = src.blobs / cdesc["digest"].removeprefix("sha256:")
            new, what = mutate_json(cpath.read_bytes(), rng)
            hexd = src.put(new)
            cdesc["digest"], cdesc["size"] = f"sha256:{hexd}", len(new)
        if part == "manifest":
            new, what = mutate_json(json.dumps(manifest).encode(), rng)
            src.tag(new)
            return f"json: manifest {what}"
        src.tag(manifest)
        if part == "index":
            new, what = mutate_json((path / "index.json").read_bytes(), rng)
            (path / "index.json").unlink()
            (path / "index.json").write_bytes(new)
        return f"json: {part} {what}"
    src.tag(manifest)
    if op == "file-kind":
        d = rng.choice(manifest["layers"])
        return "file-kind: layer blob " + make_kind(
            src.blobs / d["digest"].removeprefix("sha256:"), rng.choice(FILE_KINDS)
        )
    return f"{op}: {what}, {'fixed' if fixed else 'stale diff_id'}"
