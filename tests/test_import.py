"""`puzzlefs import`: OCI v1 images of tar layers -> puzzlefs, as unpacking them would.

The images are made here (tarfile + an OCI layout written by hand, and one by umoci
where it is installed); the expected tree comes from an independent reference, the
layers applied to a real directory with plain os calls, and from `umoci unpack`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zstandard
from treeutil import assert_same_tree, describe, set_mtimes

from puzzlefs import build, extract, open_image
from puzzlefs.compression import ZstdOptions
from puzzlefs.importer import import_image
from puzzlefs.oci.layout import host_architecture

# -- OCI images of tar layers, written by hand ---------------------------------------

LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
DOCKER_LAYER_TYPES = {
    "none": "application/vnd.docker.image.rootfs.diff.tar",
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class E:
    """One tar member. ``kind``: file dir sym hard chr blk fifo."""

    name: str | bytes
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    link: str | bytes = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    mtime: str = ""  # a pax mtime record ("seconds.fraction"); empty: mtime 0


def wh(name: str) -> E:
    """A whiteout: an empty regular file named ``.wh.<base>`` beside ``name``."""
    head, _, base = name.rpartition("/")
    return E(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(directory: str) -> E:
    return E(f"{directory}/.wh..wh..opq")


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "sym": tarfile.SYMTYPE,
    "hard": tarfile.LNKTYPE,
    "chr": tarfile.CHRTYPE,
    "blk": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def _s(x: str | bytes) -> str:
    return x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else x


def make_tar(entries: list[E]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for e in entries:
            info = tarfile.TarInfo(_s(e.name))
            info.type = _TYPES[e.kind]
            info.mode = e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
            info.uid, info.gid = e.uid, e.gid
            info.mtime = 0
            info.linkname = _s(e.link)
            info.devmajor, info.devminor = e.dev
            info.pax_headers = {
                "SCHILY.xattr." + _s(k): v.decode("utf-8", "surrogateescape")
                for k, v in e.xattrs.items()
            }
            if e.mtime:
                info.pax_headers["mtime"] = e.mtime
            if e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, 6, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    return raw


class Layout:
    """Writes an OCI image layout by hand: blobs, manifests, index.json."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict[str, object]] = []

    def put(self, data: bytes) -> tuple[str, int]:
        hexd = hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / hexd).write_bytes(data)
        return f"sha256:{hexd}", len(data)

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def manifest(
        self,
        layers: list[tuple[bytes, str]],
        *,
        docker: bool = False,
        arch: str | None = None,
        diff_ids: list[str] | None = None,
        sizes: dict[int, int] | None = None,
    ) -> dict[str, object]:
        """Store the layers (raw tar, compression), a config and a manifest; return the
        manifest's descriptor. ``sizes`` overrides layer sizes (index -> size)."""
        descs = []
        ids = []
        for i, (raw, how) in enumerate(layers):
            digest, size = self.put(compress(raw, how))
            media = (DOCKER_LAYER_TYPES if docker else LAYER_TYPES)[how]
            descs.append({"digest": digest, "mediaType": media, "size": (sizes or {}).get(i, size)})
            ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        config = {
            "architecture": arch or host_architecture(),
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids if diff_ids is not None else ids},
        }
        cdigest, csize = self.put(json.dumps(config).encode())
        media = DOCKER_MANIFEST if docker else OCI_MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": media,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json"
                if docker
                else "application/vnd.oci.image.config.v1+json",
                "digest": cdigest,
                "size": csize,
            },
            "layers": descs,
        }
        digest, size = self.put(json.dumps(manifest).encode())
        return {
            "mediaType": media,
            "digest": digest,
            "size": size,
            "platform": {"architecture": arch or host_architecture(), "os": "linux"},
        }

    def tag(self, tag: str, desc: dict[str, object]) -> None:
        desc = dict(desc, annotations={"org.opencontainers.image.ref.name": tag})
        self.index = [d for d in self.index if d.get("annotations") != desc["annotations"]]
        self.index.append(desc)
        (self.path / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.index})
        )

    def image_index(self, manifests: list[dict[str, object]]) -> dict[str, object]:
        digest, size = self.put(
            json.dumps(
                {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
            ).encode()
        )
        return {"mediaType": OCI_INDEX, "digest": digest, "size": size}


def write_image(path: Path, tag: str, layers: list[tuple[bytes, str]], **kw: object) -> Layout:
    layout = Layout(path)
    layout.tag(tag, layout.manifest(layers, **kw))  # type: ignore[arg-type]
    return layout


# -- the reference: apply the layers to a directory with os calls ------------------


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    assert ".." not in parts and not name.startswith("/")
    return "/".join(parts)


def apply_layers(layers: list[bytes], root: Path) -> None:
    """Unpack tar layers into ``root`` as the OCI image spec says, with the kernel doing
    the path work (relative symlinks in parent directories are followed by the OS)."""
    root.mkdir()
    os.chown(root, 0, 0)
    os.chmod(root, 0o755)
    for raw in layers:
        with tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8", errors="surrogateescape") as t:
            members = t.getmembers()
            for m in members:  # whiteouts first: they apply to the lower layers only
                name = _clean(m.name)
                head, _, base = name.rpartition("/")
                where = root / head if head else root
                if base == ".wh..wh..opq":
                    if where.is_dir():
                        for child in list(where.iterdir()):
                            _remove(child)
                elif base.startswith(".wh."):
                    _remove(where / base[4:])
            for m in members:
                name = _clean(m.name)
                if name.rpartition("/")[2].startswith(".wh."):
                    continue
                path = root / name if name else root
                _implied_parents(root, path)
                if m.isdir():
                    if not (path.is_dir() and not path.is_symlink()):
                        _remove(path)
                        path.mkdir()
                else:
                    _remove(path)
                    if m.isreg():
                        src = t.extractfile(m)
                        assert src is not None
                        path.write_bytes(src.read())
                    elif m.issym():
                        os.symlink(m.linkname, path)
                    elif m.islnk():
                        os.link(root / _clean(m.linkname), path, follow_symlinks=False)
                        continue  # a hard link is the target's inode, attributes and all
                    elif m.ischr() or m.isblk():
                        kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                        os.mknod(path, kind | 0o600, os.makedev(m.devmajor, m.devminor))
                    elif m.isfifo():
                        os.mkfifo(path)
                os.lchown(path, m.uid, m.gid)  # before chmod: chown clears setuid
                if not m.issym():
                    os.chmod(path, m.mode & 0o7777)
                for k in os.listxattr(path, follow_symlinks=False):
                    os.removexattr(path, k, follow_symlinks=False)
                for k, v in m.pax_headers.items():
                    # an empty pax value deletes the record (POSIX; as Go's tar reader)
                    if k.startswith("SCHILY.xattr.") and v:
                        os.setxattr(
                            path,
                            k[len("SCHILY.xattr.") :].encode("utf-8", "surrogateescape"),
                            v.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False,
                        )


def _implied_parents(root: Path, path: Path) -> None:
    missing = []
    p = path.parent
    while p != root and not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir()
        os.chown(p, 0, 0)
        os.chmod(p, 0o755)


# -- the tests ----------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="devices and owners need root")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "puzzlefs", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def layers_of_everything() -> list[tuple[bytes, str]]:
    """Three layers (gzip, zstd, plain) with every rule of the OCI layer format."""
    big = random.Random(6).randbytes(700_000)
    one = [
        E(".", "dir", mode=0o755),
        E("etc", "dir"),
        E("etc/passwd", data=b"root:x:0:0\n"),
        E("etc/keep", data=b"keep me"),
        E("bin", "dir"),
        E("bin/su", data=b"#!/bin/su\n", mode=0o4755),
        E("bin/sgid", data=b"#!/bin/sgid\n", mode=0o2711, gid=42),
        E("data", "dir", mode=0o750, xattrs={b"user.dir": b"lower"}),
        E("data/old1", data=b"old1"),
        E("data/old2", data=b"old2"),
        E("data/sub", "dir"),
        E("data/sub/deep", data=b"deep"),
        E("opq", "dir", mode=0o711),
        E("opq/a", data=b"a"),
        E("opq/sub", "dir"),
        E("opq/sub/x", data=b"x"),
        E("gone", data=b"gone"),
        E("gonedir", "dir"),
        E("gonedir/f", data=b"f"),
        E("willbedir", data=b"a file for now"),
        E("willbefile", "dir"),
        E("willbefile/child", data=b"child"),
        E("hl", "dir"),
        E("hl/orig", data=b"hard " * 1000, mode=0o640, uid=7, gid=8),
        E("hl/link", "hard", link="hl/orig"),
        E("dev", "dir"),
        E("dev/null", "chr", mode=0o666, dev=(1, 3)),
        E("dev/loop0", "blk", mode=0o660, dev=(7, 0)),
        E("dev/fifo", "fifo", mode=0o620, uid=42, gid=43),
        E("lnk", "sym", link="etc/passwd"),
        E("abs", "sym", link="/etc/keep"),
        E("ldir", "sym", link="data/sub"),
        E(
            "xattrs",
            data=b"x",
            xattrs={b"user.text": b"value", b"user.binary": bytes(range(256)), b"user.empty": b""},
        ),
        E("owned", data=b"owned", mode=0o600, uid=1234, gid=5678),
        E("implied/a/b/file", data=b"implied parents"),
        E(b"name-\xff\xfe", data=b"a name that is not UTF-8"),
        E("big", data=big),
        E("empty", data=b""),
    ]
    two = [
        wh("gone"),
        wh("gonedir"),
        opaque("opq"),
        E("opq/new", data=b"new"),
        E("willbedir", "dir", mode=0o700),
        E("willbedir/inside", data=b"inside"),
        E("willbefile", data=b"was a directory"),
        E("data/old2", data=b"old2 again, in the layer of its whiteout"),
        wh("data/old2"),  # after the entry: same-layer entries are never hidden
        wh("data/old1"),
        E("hl/link2", "hard", link="hl/orig"),  # the target is in a lower layer
        E("etc/passwd", data=b"root:x:0:0:new\n"),
        E("ldir/viasym", data=b"through a symlinked parent"),  # lands in data/sub
        E("bin/su", data=b"#!/bin/su v2\n", mode=0o4750),
        E("big2", data=big[:300_000] + b"changed" + big[300_000:]),
    ]
    three = [
        E("data", "dir", mode=0o700, uid=5, gid=6, xattrs={b"user.dir": b"upper"}),
        E("etc/keep", "sym", link="passwd"),
        E("hl/orig", data=b"replaced: the links keep the old inode"),
        E("newdir/deeper/file", data=b"implied again"),
        E("trusted", data=b"t", xattrs={b"trusted.x": b"root only"}),
    ]
    return [(make_tar(one), "gzip"), (make_tar(two), "zstd"), (make_tar(three), "none")]


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source layout, the reference tree). Tag "t" has gzip, zstd and plain layers;
    "g" the same tars as gzip, gzip, plain (umoci 0.4 does not read zstd layers)."""
    if os.geteuid() != 0:
        pytest.skip("devices and owners need root")
    tmp = tmp_path_factory.mktemp("everything")
    layers = layers_of_everything()
    layout = write_image(tmp / "src", "t", layers)
    gzip_only = [(raw, "gzip" if how == "zstd" else how) for raw, how in layers]
    layout.tag("g", layout.manifest(gzip_only))
    apply_layers([raw for raw, _ in layers], tmp / "reference")
    set_mtimes(tmp / "reference", 0)  # as unpacking gives it: every member's mtime is 0
    return tmp / "src", tmp / "reference"


def test_reference_applier_sanity(everything: tuple[Path, Path]) -> None:
    """The reference itself shows the rules the importer must follow."""
    _, ref = everything
    d = describe(ref)
    for gone in (b"gone", b"gonedir", b"data/old1", b"opq/a", b"opq/sub"):
        assert gone not in d
    assert d[b"data/old2"]["size"] == len(b"old2 again, in the layer of its whiteout")
    assert d[b"willbedir"]["type"] == stat.S_IFDIR and d[b"willbefile"]["type"] == stat.S_IFREG
    assert d[b"data/sub/viasym"]["type"] == stat.S_IFREG
    assert d[b"hl/link"]["nlink"] == 2 and d[b"hl/orig"]["nlink"] == 1
    assert d[b"implied"]["mode"] == 0o755 and d[b"data"]["mode"] == 0o700
    assert not any(b".wh." in p for p in d)
    assert [k for k, _ in d[b"xattrs"]["xattrs"]] == ["user.binary", "user.text"]  # type: ignore[union-attr]


def test_import_equals_reference_and_build(everything: tuple[Path, Path], tmp_path: Path) -> None:
    src, ref = everything
    tmpdir = tmp_path / "spool"
    tmpdir.mkdir()
    result = import_image(src, "t", tmp_path / "oci", "imported", tmp_dir=tmpdir)
    assert list(tmpdir.iterdir()) == []  # the spool is gone
    extract(open_image(tmp_path / "oci", "imported"), tmp_path / "x")
    assert_same_tree(tmp_path / "x", ref)
    built = build(tmp_path / "x", tmp_path / "oci2", "built")
    assert built.manifest.digest == result.manifest.digest
    assert built.manifest_verity == result.manifest_verity
    again = import_image(src, "g", tmp_path / "oci", "from-gzip-layers")
    assert again.manifest.digest == result.manifest.digest


@pytest.mark.parametrize(
    ("flags", "zstd"),
    [([], True), (["--zstd-frame-size", "64K", "--zstd-level", "12"], ZstdOptions(65536, 12))],
    ids=["reference", "64K-level-12"],
)
def test_import_cli_compressed(
    everything: tuple[Path, Path], tmp_path: Path, flags: list[str], zstd: bool | ZstdOptions
) -> None:
    src, ref = everything
    proc = run("import", "-c", *flags, f"{src}:t", f"{tmp_path}/oci:c")
    assert proc.returncode == 0, proc.stderr
    built = build(ref, tmp_path / "oci2", "c", compress=zstd)
    assert proc.stdout.strip() == f"puzzlefs image manifest digest: {built.manifest_verity}"
    assert run("verify", f"{tmp_path}/oci:c").returncode == 0


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
def test_umoci_unpack_agrees(everything: tuple[Path, Path], tmp_path: Path) -> None:
    src, ref = everything
    subprocess.run(
        ["umoci", "unpack", "--image", f"{src}:g", str(tmp_path / "bundle")],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert_same_tree(tmp_path / "bundle" / "rootfs", ref)


@needs_root
@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
def test_image_made_by_umoci(all_types_tree: Path, tmp_path: Path) -> None:
    """umoci's own layers (and its whiteouts, from deletions in a repacked bundle)."""
    oci, bundle = f"{tmp_path}/umoci", tmp_path / "bundle"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=300)

    umoci("init", "--layout", oci)
    umoci("new", "--image", f"{oci}:t")
    umoci("unpack", "--image", f"{oci}:t", str(bundle))
    rootfs = bundle / "rootfs"
    shutil.rmtree(rootfs)
    subprocess.run(["cp", "-a", str(all_types_tree), str(rootfs)], check=True)
    (rootfs / "dev" / "socket").unlink()  # tar cannot carry sockets
    umoci("repack", "--image", f"{oci}:t", str(bundle))
    shutil.rmtree(rootfs / "deep" / "d0" / "d1")
    (rootfs / "text").unlink()
    (rootfs / "one").unlink()
    (rootfs / "one").mkdir()
    (rootfs / "names" / "added").write_bytes(b"added in layer 2")
    umoci("repack", "--image", f"{oci}:t", str(bundle))
    shutil.rmtree(bundle)
    umoci("unpack", "--image", f"{oci}:t", str(bundle))

    result = import_image(oci, "t", tmp_path / "oci", "t")
    extract(open_image(tmp_path / "oci", "t"), tmp_path / "x")
    assert_same_tree(tmp_path / "x", rootfs)
    assert b"text" not in describe(tmp_path / "x")
    assert build(rootfs, tmp_path / "oci2", "t").manifest.digest == result.manifest.digest


def test_root_and_parents_implied(tmp_path: Path) -> None:
    """No `./` entry and no directory entries: all 0755 root:root (FORMAT.md §7)."""
    write_image(tmp_path / "src", "t", [(make_tar([E("a/b/c", data=b"c", uid=0)]), "gzip")])
    import_image(tmp_path / "src", "t", tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    for inode in (image.root, image.lookup(image.root, b"a")):
        assert inode is not None
        assert (inode.permissions, inode.uid, inode.gid) == (0o755, 0, 0)


def test_index_picks_this_machine_and_docker_types(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "src")
    other = "arm64" if host_architecture() != "arm64" else "amd64"
    mine = layout.manifest([(make_tar([E("mine", data=b"this machine")]), "gzip")], docker=True)
    theirs = layout.manifest([(make_tar([E("theirs", data=b"other")]), "gzip")], arch=other)
    layout.tag("multi", layout.image_index([theirs, mine]))
    layout.tag("foreign", layout.image_index([theirs]))
    import_image(tmp_path / "src", "multi", tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    assert [name for name, _ in image.listdir(image.root)] == [b"mine"]
    proc = run("import", f"{tmp_path}/src:foreign", f"{tmp_path}/oci:f")
    assert_clean_error(proc, f"linux/{host_architecture()}", f"linux/{other}")


def test_libarchive_xattrs(tmp_path: Path) -> None:
    """bsdtar's LIBARCHIVE.xattr.* records (URL-encoded name, base64 value) count where
    no SCHILY.xattr.* record names the same key; an empty pax value deletes a record."""
    info = tarfile.TarInfo("f")
    info.pax_headers = {
        "LIBARCHIVE.xattr.user.only%20lib": "dmFs",
        "LIBARCHIVE.xattr.user.both": "bGli",
        "SCHILY.xattr.user.both": "schily",
        "SCHILY.xattr.user.deleted": "",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    write_image(tmp_path / "src", "t", [(buf.getvalue(), "gzip")])
    import_image(tmp_path / "src", "t", tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    inode = image.lookup(image.root, b"f")
    assert inode is not None
    assert inode.xattrs == [(b"user.both", b"schily"), (b"user.only lib", b"val")]


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_gnu_tar_layers(fmt: str, tmp_path: Path) -> None:
    """Layers written by GNU tar: sparse files, long names and links, xattrs."""
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    with open(src / "sparse", "wb") as f:
        f.write(b"start")
        f.seek(5 << 20)
        f.write(b"end of a sparse file")
    long = src / ("l" * 120) / ("m" * 150)
    long.mkdir(parents=True)
    (long / "file").write_bytes(b"long path")
    os.symlink("x" * 200, src / "sub" / "long-target")
    (src / "sub" / "h1").write_bytes(b"hard linked")
    os.link(src / "sub" / "h1", long / "h2")
    (src / "sub" / "xattr").write_bytes(b"x")
    os.setxattr(src / "sub" / "xattr", "user.k", b"v\xff\x00binary")
    os.chmod(src, 0o755)
    raw = subprocess.run(
        ["tar", f"--format={fmt}", "--sparse", "--xattrs", "--xattrs-include=*"]
        + ["--numeric-owner", "-C", str(src), "-cf", "-", "."],
        check=True,
        capture_output=True,
    ).stdout
    write_image(tmp_path / "src", "t", [(raw, "zstd")])
    result = import_image(tmp_path / "src", "t", tmp_path / "oci", "t")
    extract(open_image(tmp_path / "oci", "t"), tmp_path / "x")
    assert_same_tree(tmp_path / "x", src)
    assert build(src, tmp_path / "oci2", "t").manifest.digest == result.manifest.digest


# -- bad input: one line, non-zero exit, nothing written, no spool left ---------------


def assert_clean_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(path.rglob("*"))
    }


def _simple(tmp: Path, entries: list[E], how: str = "gzip", **kw: object) -> Layout:
    return write_image(tmp / "src", "t", [(make_tar(entries), how)], **kw)


def _pax_member(tmp: Path, kind: bytes, pax: dict[str, str]) -> None:
    info = tarfile.TarInfo("member")
    info.type = kind
    info.pax_headers = pax
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    write_image(tmp / "src", "t", [(buf.getvalue(), "gzip")])


def _not_a_tar(tmp: Path) -> None:
    write_image(tmp / "src", "t", [(random.Random(1).randbytes(5000), "none")])


def _not_gzip(tmp: Path) -> None:
    layout = Layout(tmp / "src")
    digest, size = layout.put(make_tar([E("a", data=b"a")]))
    _hand_manifest(layout, [(digest, size, LAYER_TYPES["gzip"])])


def _truncated_gzip(tmp: Path) -> None:
    raw = make_tar([E("a", data=random.Random(2).randbytes(100_000))])
    layout = Layout(tmp / "src")
    digest, size = layout.put(gzip.compress(raw)[:-100])
    _hand_manifest(layout, [(digest, size, LAYER_TYPES["gzip"])])


def _hand_manifest(layout: Layout, layers: list[tuple[str, int, str]]) -> None:
    config = layout.put(json.dumps({"os": "linux", "rootfs": {"type": "layers"}}).encode())
    manifest = {
        "schemaVersion": 2,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config[0],
            "size": config[1],
        },
        "layers": [{"mediaType": m, "digest": d, "size": s} for d, s, m in layers],
    }
    digest, size = layout.put(json.dumps(manifest).encode())
    layout.tag("t", {"mediaType": OCI_MANIFEST, "digest": digest, "size": size})


def _missing_blob(tmp: Path) -> None:
    layout = _simple(tmp, [E("a", data=b"a")])
    manifest = _manifest(layout)
    layout.blob_path(manifest["layers"][0]["digest"]).unlink()


def _manifest(layout: Layout) -> Any:
    index = json.loads((layout.path / "index.json").read_text())
    return json.loads(layout.blob_path(index["manifests"][0]["digest"]).read_text())


def _altered_blob(tmp: Path) -> None:
    layout = _simple(tmp, [E("a", data=b"a" * 1000)], "none")
    path = layout.blob_path(_manifest(layout)["layers"][0]["digest"])
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))


def _wrong_size(tmp: Path) -> None:
    _simple(tmp, [E("a", data=b"a")], "gzip", sizes={0: 10})


def _wrong_diff_id(tmp: Path) -> None:
    _simple(tmp, [E("a", data=b"a")], "zstd", diff_ids=["sha256:" + "0" * 64])


def _garbage_after_members(tmp: Path) -> None:
    raw = make_tar([E("a", data=b"a")])
    raw = raw[:1024] + b"this is not a tar header".ljust(512, b"!") + raw[1024:]
    write_image(tmp / "src", "t", [(raw, "gzip")])


BAD = {
    "not a tar": (_not_a_tar, ["not a tar"]),
    "not gzip": (_not_gzip, ["gzip"]),
    "truncated gzip": (_truncated_gzip, ["truncated"]),
    "dotdot": (lambda t: _simple(t, [E("a/../../etc/passwd", data=b"x")]), [".."]),
    "dotdot only": (lambda t: _simple(t, [E("../x", data=b"x")]), [".."]),
    "absolute": (lambda t: _simple(t, [E("/etc/passwd", data=b"x")]), ["absolute"]),
    "hard link outside": (
        lambda t: _simple(t, [E("a", "hard", link="../../etc/passwd")]),
        ["hard link", ".."],
    ),
    "hard link absolute": (
        lambda t: _simple(t, [E("a", "hard", link="/etc/passwd")]),
        ["absolute"],
    ),
    "hard link to nothing": (
        lambda t: _simple(t, [E("a", "hard", link="nothing")]),
        ["missing", "nothing"],
    ),
    "hard link to a directory": (
        lambda t: _simple(t, [E("d", "dir"), E("a", "hard", link="d")]),
        ["directory"],
    ),
    "missing blob": (_missing_blob, ["missing"]),
    "altered blob": (_altered_blob, ["digest mismatch"]),
    "wrong size": (_wrong_size, ["size"]),
    "wrong diff_id": (_wrong_diff_id, ["diff_ids"]),
    "wrong diff_id, plain layer": (
        lambda t: _simple(t, [E("a", data=b"a")], "none", diff_ids=["sha256:" + "1" * 64]),
        ["diff_ids"],
    ),
    "garbage after members": (_garbage_after_members, ["invalid tar header"]),
    "parent is a file": (
        lambda t: _simple(t, [E("f", data=b"f"), E("f/g", data=b"g")]),
        ["not a directory"],
    ),
    # What extract would refuse (issue 11, item 7): refused here, before anything is
    # stored.
    "name over 255 bytes": (
        lambda t: _simple(t, [E("d/" + "n" * 256, data=b"x")]),
        ["longer than 255"],
    ),
    "path over PATH_MAX": (
        lambda t: _simple(t, [E("/".join(["p" * 200] * 21), data=b"x")]),
        ["longer than 4095"],
    ),
    "path over PATH_MAX through a symlink": (
        lambda t: _simple(
            t,
            [
                E("/".join(["p" * 250] * 16), "dir"),
                E("s", "sym", link="/".join(["p" * 250] * 16)),
                E("s/" + "q" * 200, data=b"x"),
            ],
        ),
        ["longer than 4095"],
    ),
    "symlink target over PATH_MAX": (
        lambda t: _simple(t, [E("s", "sym", link="t" * 4096)]),
        ["target longer than 4095"],
    ),
    # (a NUL can only come in a pax record: the header's own fields end at one)
    "symlink target with NUL": (
        lambda t: _pax_member(t, tarfile.SYMTYPE, {"linkpath": "a\0b"}),
        ["NUL"],
    ),
    "name with NUL": (lambda t: _pax_member(t, tarfile.REGTYPE, {"path": "a\0b"}), ["NUL"]),
    "device major out of range": (
        lambda t: _simple(t, [E("dev", "chr", dev=(4096, 0))]),
        ["4096:0", "out of range"],
    ),
    "device minor out of range": (
        lambda t: _simple(t, [E("dev", "blk", dev=(8, 1 << 20))]),
        ["8:1048576", "out of range"],
    ),
    "xattr outside the namespaces": (
        lambda t: _simple(t, [E("f", data=b"x", xattrs={b"nonamespace": b"v"})]),
        ["xattr", "nonamespace"],
    ),
    "xattr name over 255 bytes": (
        lambda t: _simple(t, [E("f", data=b"x", xattrs={b"user." + b"k" * 251: b"v"})]),
        ["longer than 255"],
    ),
    "xattr value over 64 KiB": (
        lambda t: _simple(t, [E("f", data=b"x", xattrs={b"user.big": b"v" * 65537})]),
        ["larger than 65536"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case: str, tmp_path: Path) -> None:
    make, words = BAD[case]
    make(tmp_path)
    existing = tmp_path / "existing"
    good = tmp_path / "good"
    good.mkdir()
    (good / "file").write_bytes(b"already here")
    build(good, existing, "old")
    before = snapshot(existing)
    spool = tmp_path / "spool"
    spool.mkdir()
    env = dict(os.environ, TMPDIR=str(spool))
    proc = run("import", f"{tmp_path}/src:t", f"{existing}:new", env=env)
    assert_clean_error(proc, *words)
    assert snapshot(existing) == before
    proc = run("import", f"{tmp_path}/src:t", f"{tmp_path}/fresh:new", env=env)
    assert_clean_error(proc, *words)
    assert not (tmp_path / "fresh").exists()
    assert list(spool.iterdir()) == []


def test_bad_source_refs(tmp_path: Path) -> None:
    _simple(tmp_path, [E("a")])
    assert_clean_error(run("import", f"{tmp_path}/src:nope", f"{tmp_path}/o:t"), "nope")
    assert_clean_error(run("import", f"{tmp_path}/none:t", f"{tmp_path}/o:t"), "none")
    build(tmp_path / "src" / "blobs", tmp_path / "pfs", "p")
    proc = run("import", f"{tmp_path}/pfs:p", f"{tmp_path}/o:t")
    assert_clean_error(proc, "already a puzzlefs image")
    assert not (tmp_path / "o").exists()


def test_member_times_are_kept_to_the_nanosecond(tmp_path: Path) -> None:
    layer = make_tar(
        [
            E("d", "dir", mtime="1700000000.5"),
            E("d/f", data=b"f", mtime="1234567890.123456789"),
            E("d/old", data=b"o", mtime="-1.25"),
            E("plain", data=b"p"),
        ]
    )
    write_image(tmp_path / "src", "t", [(layer, "gzip")])
    import_image(tmp_path / "src", "t", tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    got = {p: image.attr(image.resolve_path(p)).mtime_ns for p in ("d", "d/f", "d/old", "plain")}
    assert got == {
        "d": 1_700_000_000_500_000_000,
        "d/f": 1_234_567_890_123_456_789,
        "d/old": -1_250_000_000,
        "plain": 0,
    }


def _sparse_member(name: str, realsize: int, runs: list[tuple[int, bytes]]) -> bytes:
    """A tar with one GNU sparse member (PAX format 1.0, what GNU tar --sparse writes):
    the map in the first data block, then the data runs."""
    sparse_map = f"{len(runs)}\n" + "".join(f"{off}\n{len(d)}\n" for off, d in runs)
    block = sparse_map.encode().ljust(-(-len(sparse_map) // 512) * 512, b"\0")
    data = block + b"".join(d for _, d in runs)
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(data)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": name,
        "GNU.sparse.realsize": str(realsize),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_gnu_sparse_member_keeps_its_holes(tmp_path: Path) -> None:
    """A sparse member is spooled with its holes as holes: 256 MiB declared, a few
    KiB of disk; the file reads back whole."""
    size = 256 << 20
    runs = [(0, b"head"), (100 << 20, b"middle" * 100), (size - 3, b"end")]
    write_image(tmp_path / "src", "t", [(_sparse_member("big", size, runs), "gzip")])
    spool = tmp_path / "spool"
    spool.mkdir()
    import_image(tmp_path / "src", "t", tmp_path / "oci", "t", tmp_dir=spool)
    image = open_image(tmp_path / "oci", "t")
    inode = image.lookup(image.root, b"big")
    assert inode.size == size
    assert image.read(inode, 0, 4) == b"head"
    assert image.read(inode, 100 << 20, 600) == b"middle" * 100
    assert image.read(inode, 50 << 20, 10) == bytes(10)
    assert image.read(inode, size - 3, 10) == b"end"
    assert list(spool.iterdir()) == []


def test_gnu_sparse_member_declaring_10_gib_is_capped(tmp_path: Path) -> None:
    raw = _sparse_member("huge", 10 << 30, [(5 << 30, b"data")])
    write_image(tmp_path / "src", "t", [(raw, "gzip")])
    proc = run("import", "--max-layer-size", "1G", f"{tmp_path}/src:t", f"{tmp_path}/oci:t")
    assert_clean_error(proc, "huge", "more than 1.0 GiB", "--max-layer-size")
    assert not (tmp_path / "oci").exists()


@pytest.mark.parametrize(
    "bad_map",
    [[(100, b"x"), (50, b"y")], [(0, b"x" * 10), (5, b"y")], [(1 << 40, b"beyond")]],
    ids=["unsorted", "overlapping", "past-the-end"],
)
def test_gnu_sparse_member_with_a_corrupt_map(
    tmp_path: Path, bad_map: list[tuple[int, bytes]]
) -> None:
    write_image(tmp_path / "src", "t", [(_sparse_member("f", 1 << 20, bad_map), "none")])
    proc = run("import", f"{tmp_path}/src:t", f"{tmp_path}/oci:t")
    assert_clean_error(proc, "sparse map")


def test_gzip_bomb_is_capped(tmp_path: Path) -> None:
    """200 MiB of zeros in 200 KB of gzip: refused at the cap, quickly, spool removed."""
    zeros = make_tar([E("bomb", data=bytes(200 << 20))])
    write_image(tmp_path / "src", "t", [(zeros, "gzip")])
    del zeros
    spool = tmp_path / "spool"
    spool.mkdir()
    env = dict(os.environ, TMPDIR=str(spool))
    proc = run(
        "import", "--max-layer-size", "16M", f"{tmp_path}/src:t", f"{tmp_path}/oci:t", env=env
    )
    assert_clean_error(proc, "layer 1", "more than 16.0 MiB uncompressed", "--max-layer-size")
    assert list(spool.iterdir()) == []
    assert not (tmp_path / "oci").exists()


@pytest.fixture()
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: the spool's filesystem, nearly too small."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    spool = tmp_path / "small"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(spool)], check=True)
    try:
        yield spool
    finally:
        subprocess.run(["umount", str(spool)], check=True)


def test_spool_is_bounded_by_free_space(tmp_path: Path, small_spool: Path) -> None:
    """Without --max-layer-size, a layer (or a sparse member) that would not fit in the
    spool's filesystem (less a reserve) is refused before the disk is full."""
    write_image(tmp_path / "src", "t", [(make_tar([E("big", data=bytes(100 << 20))]), "zstd")])
    write_image(tmp_path / "src2", "t", [(_sparse_member("holes", 1 << 30, [(0, b"x")]), "none")])
    for src in ("src", "src2"):
        proc = run(
            "import", "--tmpdir", str(small_spool), f"{tmp_path}/{src}:t", f"{tmp_path}/oci:t"
        )
        assert_clean_error(proc, "more than", "can spool", "--tmpdir")
        assert list(small_spool.iterdir()) == []
    assert not (tmp_path / "oci").exists()


@pytest.mark.parametrize("root_name", ["./", "/", "."])
def test_root_entry_applies_to_the_root(tmp_path: Path, root_name: str) -> None:
    """umoci, buildah and docker write a `/` or `./` entry for the root: its owner,
    mode and xattrs become the root's, as tar applies them (issue 13)."""
    layers = [
        (make_tar([E(root_name, "dir", mode=0o750, uid=7, gid=8), E("a", data=b"a")]), "gzip"),
        (make_tar([E(root_name, "dir", mode=0o700, xattrs={b"user.root": b"r"})]), "none"),
    ]
    write_image(tmp_path / "src", "t", layers)
    import_image(tmp_path / "src", "t", tmp_path / "oci", "t")
    image = open_image(tmp_path / "oci", "t")
    root = image.root
    assert (root.permissions, root.uid, root.gid) == (0o700, 0, 0)  # the upper layer's
    assert root.xattrs == [(b"user.root", b"r")]
    assert [name for name, _ in image.listdir(root)] == [b"a"]
    reference = tmp_path / "ref"
    apply_layers([raw for raw, _ in layers], reference)
    extract(image, tmp_path / "x")
    assert_same_tree(tmp_path / "x", reference)
