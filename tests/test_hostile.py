"""Issue 11, items 4 to 6, one test per finding: hostile stores and hostile metadata
give one clean line and exit 1 from verify, extract and export, promptly and in
bounded memory; nothing is read before its size is known to be right.

Images are changed with the fuzz suite's helpers (tests/fuzz/layout.py): a changed blob
is stored under its new digest and every reference to it updated up to index.json, so
the change reaches the parsers.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzz.layout import CaseLayout, copy_layout
from fuzz.mutate import make_kind
from fuzz.runner import ACCEPTED, CLEAN, classify, run_cli
from fuzz.seeds import Seed, build_seeds

from puzzlefs.format import Kind

COMMANDS = ["verify", "extract", "export"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Seed]:
    return build_seeds(tmp_path_factory.mktemp("seeds"))


def _case(seeds: dict[str, Seed], kind: str, tmp: Path) -> CaseLayout:
    copy_layout(seeds[kind].oci, tmp / "oci")
    return CaseLayout(tmp / "oci", seeds[kind].tag)


def _run(command: str, case: CaseLayout, tmp: Path) -> tuple[str, str]:
    ref = f"{case.path}:{case.tag}"
    argv = {
        "verify": ["verify", ref],
        "extract": ["extract", ref, str(tmp / "out")],
        "export": ["export", ref, str(tmp / "out.tar")],
    }[command]
    start = time.monotonic()
    code, out, err, exc = run_cli(argv)
    assert time.monotonic() - start < 20, f"{command} took too long"
    return classify(command, code, out, err, exc)


def _assert_refused(case: CaseLayout, tmp: Path, *words: str) -> None:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for command in COMMANDS:
        outcome, message = _run(command, case, tmp)
        assert outcome == CLEAN, (command, outcome, message)
        if command != "verify" or message.startswith("Error: "):
            for w in words:
                assert w.lower() in message.lower(), (command, w, message)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss
    assert grown < 200 * 1024, f"memory grew by {grown} KiB"


# -- item 4: decompression bounded by the format's limits --------------------------------


def _declare_a_gigabyte(data: bytes) -> bytes:
    """The issue's chunk: its seek table says its frames hold 1 GiB in all."""
    n = len(data)
    nframes = struct.unpack_from("<I", data, n - 9)[0]
    out = bytearray(data)
    start = n - 9 - nframes * 8
    for i in range(nframes):
        struct.pack_into("<I", out, start + i * 8 + 4, (1 << 30) // nframes)
    return bytes(out)


def _compressed_chunk(case: CaseLayout) -> str:
    for hexd in case.chunk_hexes():
        if case.read(hexd).endswith(struct.pack("<I", 0x8F92EAB1)):
            return hexd
    raise AssertionError("no compressed chunk in the -c seed")


def test_seek_table_declaring_a_gigabyte(seeds: dict[str, Seed], tmp_path: Path) -> None:
    case = _case(seeds, "zstd", tmp_path)
    hexd = _compressed_chunk(case)
    case.set_chunk(hexd, _declare_a_gigabyte(case.read(hexd)))
    _assert_refused(case, tmp_path, "seek table declares", "more than a chunk can be")


def test_seek_table_declaring_a_gigabyte_under_a_memory_cap(
    seeds: dict[str, Seed], tmp_path: Path
) -> None:
    """The same through the command line, capped at 1 GiB of address space: before,
    extract grew to 2.1 GB; now it refuses the chunk without allocating it."""
    case = _case(seeds, "zstd", tmp_path)
    hexd = _compressed_chunk(case)
    case.set_chunk(hexd, _declare_a_gigabyte(case.read(hexd)))

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = subprocess.run(
        [sys.executable, "-m", "puzzlefs", "extract", f"{case.path}:t", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=cap,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: ") and "seek table declares" in proc.stderr


# -- item 5: files of the store that are not what they claim ----------------------------

KINDS = ["fifo", "dev-zero-link", "sparse-3g", "device", "directory"]
TARGETS: dict[str, Callable[[CaseLayout], Path]] = {
    "index.json": lambda c: c.path / "index.json",
    "oci-layout": lambda c: c.path / "oci-layout",
    "manifest": lambda c: c.blobs / c.manifest_hex(),
    "rootfs": lambda c: c.blobs / c.rootfs_hex(),
    "config": lambda c: c.blobs / c.config_hex(),
    "chunk": lambda c: c.blobs / c.chunk_hexes()[0],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", list(TARGETS))
def test_store_file_that_is_not_a_regular_file(
    seeds: dict[str, Seed], tmp_path: Path, target: str, kind: str
) -> None:
    """A FIFO must not hang verify or extract, /dev/zero or a 3 GB sparse file must
    not be read into memory: each is refused at once."""
    if kind == "device" and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    case = _case(seeds, "plain", tmp_path)
    path = TARGETS[target](case)
    if target == "chunk":  # a chunk every command needs: the first file's
        path = case.blobs / _first_chunk(case)
    make_kind(path, kind)
    if target == "config":  # only verify reads the config (readers have no use for it)
        assert _run("verify", case, tmp_path)[0] == CLEAN
        assert _run("extract", case, tmp_path)[0] == ACCEPTED
        return
    _assert_refused(case, tmp_path)
    if kind == "sparse-3g" and target not in ("index.json", "oci-layout"):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)  # what the failed one left
        _, message = _run("extract", case, tmp_path)
        assert "its descriptor says" in message or "more than it can be" in message, message


def _first_chunk(case: CaseLayout) -> str:
    for layer in case.rootfs().layers:
        for inode in layer:
            if inode.kind is Kind.FILE and inode.chunks:
                return inode.chunks[0].blob.digest.hex()
    raise AssertionError("no file with data")


def test_chunk_blob_larger_than_any_chunk(seeds: dict[str, Seed], tmp_path: Path) -> None:
    case = _case(seeds, "plain", tmp_path)
    case.set_chunk(_first_chunk(case), bytes((16 << 20) + 1))
    _assert_refused(case, tmp_path, "more than")


# -- item 6: fields out of range ---------------------------------------------------------


def _edit_inode(case: CaseLayout, pick: Callable[[Kind], bool], edit: Callable[..., None]) -> int:
    rootfs = case.rootfs()
    for inode in (i for layer in rootfs.layers for i in layer):
        if pick(inode.kind):
            edit(inode)
            case.set_rootfs_obj(rootfs)
            return inode.ino
    raise AssertionError("no such inode in the seed")


def _device_major(i: object) -> None:
    i.kind, i.major, i.minor = Kind.CHR, 1 << 32, 0  # type: ignore[attr-defined]


EDITS: dict[str, tuple[Callable[[Kind], bool], Callable[..., None], str]] = {
    "device major 2^32": (lambda k: k is Kind.FILE, _device_major, "device number"),
    "device minor 2^64-1": (
        lambda k: k is Kind.FILE,
        lambda i: (setattr(i, "kind", Kind.BLK), setattr(i, "minor", (1 << 64) - 1)),
        "device number",
    ),
    "NUL in a symlink target": (
        lambda k: k is Kind.LNK,
        lambda i: setattr(i, "symlink_target", b"a\0b"),
        "NUL",
    ),
    "NUL in an xattr name": (
        lambda k: k is Kind.FILE,
        lambda i: setattr(i, "xattrs", [(b"user.a\0b", b"v")]),
        "xattr name",
    ),
    "empty xattr name": (
        lambda k: k is Kind.FILE,
        lambda i: setattr(i, "xattrs", [(b"", b"v")]),
        "xattr name",
    ),
    "file size above 2^63-1": (
        lambda k: k is Kind.FILE,
        lambda i: setattr(i, "chunks", [i.chunks[0], type(i.chunks[0])(i.chunks[0].blob, 1 << 63)]),
        "file size",
    ),
    "permissions above 0o7777": (
        lambda k: k is Kind.FILE,
        lambda i: setattr(i, "permissions", 0o17777),
        "permissions",
    ),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("kind", ["plain", "delta"])
def test_inode_fields_out_of_range(
    seeds: dict[str, Seed], tmp_path: Path, edit: str, kind: str
) -> None:
    case = _case(seeds, kind, tmp_path)
    pick, change, word = EDITS[edit]
    ino = _edit_inode(case, pick, change)
    _assert_refused(case, tmp_path, f"inode {ino}", word)


@pytest.mark.parametrize(
    "where", ["index.json ref.name", "index.json other", "manifest", "rootfs verity"]
)
@pytest.mark.parametrize("value", [1, None, ["x"], {"a": "b"}, True])
def test_annotations_that_are_not_strings(
    seeds: dict[str, Seed], tmp_path: Path, where: str, value: object
) -> None:
    case = _case(seeds, "plain", tmp_path)
    if where.startswith("index.json"):
        index = case.index()
        key = "org.opencontainers.image.ref.name" if where.endswith("ref.name") else "x"
        for m in index["manifests"]:
            m["annotations"] = {**m["annotations"], key: value}
        case.set_index(json.dumps(index).encode())
    else:
        manifest = case.manifest()
        if where == "manifest":
            manifest["annotations"] = {"io.puzzlefs.chunk-sizes": value}
        else:
            for d in manifest["layers"]:
                if d["mediaType"].endswith("rootfs.v1"):
                    d["annotations"] = {"io.puzzlefsoci.puzzlefs.puzzlefs_verity_root_hash": value}
        case.set_manifest(json.dumps(manifest).encode())
    for command in COMMANDS:
        outcome, message = _run(command, case, tmp_path)
        assert outcome == CLEAN, (command, outcome, message)
        assert "not a string" in message, message


def test_a_valid_case_is_accepted(seeds: dict[str, Seed], tmp_path: Path) -> None:
    """The helpers themselves change nothing that matters: a fixed copy still reads."""
    case = _case(seeds, "zstd", tmp_path)
    case.set_rootfs_obj(case.rootfs())
    for command in COMMANDS:
        assert _run(command, case, tmp_path)[0] == ACCEPTED


def test_messages_stay_on_one_line(seeds: dict[str, Seed], tmp_path: Path) -> None:
    """A hostile name (here an xattr name with a newline, which extract cannot set)
    is escaped in the one error line."""
    case = _case(seeds, "plain", tmp_path)
    ino = _edit_inode(
        case,
        lambda k: k is Kind.FILE,
        lambda i: setattr(i, "xattrs", [(b"bogus\nname\x1b[31m", b"v")]),
    )
    outcome, message = _run("extract", case, tmp_path)
    assert outcome == CLEAN, message
    assert "\n" not in message and "\x1b" not in message
    assert "bogus\\nname\\x1b[31m" in message, (ino, message)
