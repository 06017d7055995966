"""Bad input: one line on stderr naming the problem, a non-zero exit, no traceback, and
nothing already stored is damaged."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from stores import FaultyBlobStore

from puzzlefs import build
from puzzlefs.format import Inode, Kind, Rootfs, encode_rootfs


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "puzzlefs", *args], capture_output=True, text=True, timeout=120
    )


def assert_clean_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ") or lines[0].startswith("usage:") or "error:" in lines[0]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def assert_store_kept(before: dict[str, str], after: dict[str, str]) -> None:
    """A failed build changed nothing already stored (index.json included); what it
    added are whole blobs, named by their content, left for gc (the store's rules)."""
    assert {k: after.get(k) for k in before} == before
    for name in set(after) - set(before):
        assert name.startswith("blobs/sha256/"), name
        assert after[name] == name.rsplit("/", 1)[1], name


def snapshot(path: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(os.urandom(300_000))
    (src / "small").write_bytes(b"small")
    build(src, tmp_path / "oci", "good")
    return tmp_path / "oci"


def test_missing_rootfs(tmp_path: Path) -> None:
    proc = run("build", str(tmp_path / "nope"), f"{tmp_path}/oci:t")
    assert_clean_error(proc, "nope")
    assert not (tmp_path / "oci").exists()


def test_rootfs_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    assert_clean_error(run("build", str(tmp_path / "f"), f"{tmp_path}/oci:t"), "not a directory")


@pytest.mark.parametrize("ref", ["no-colon", ":tag", "dir:", "dir:a/b"])
def test_malformed_image_ref(tmp_path: Path, ref: str) -> None:
    assert_clean_error(run("extract", ref, str(tmp_path / "out")), "")


def test_unknown_tag(image: Path, tmp_path: Path) -> None:
    proc = run("extract", f"{image}:missing", str(tmp_path / "out"))
    assert_clean_error(proc, "missing", "not found")


def test_not_an_oci_layout(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    assert_clean_error(run("extract", f"{tmp_path}/plain:t", str(tmp_path / "o")), "OCI")


def test_corrupt_index(image: Path, tmp_path: Path) -> None:
    (image / "index.json").write_text("{not json")
    assert_clean_error(run("extract", f"{image}:good", str(tmp_path / "o")), "index.json")


def _manifest_path(image: Path) -> Path:
    index = json.loads((image / "index.json").read_text())
    return image / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]


def test_corrupt_manifest(image: Path, tmp_path: Path) -> None:
    m = _manifest_path(image)
    m.chmod(0o644)
    data = m.read_bytes()
    m.write_bytes(data[:-1] + b"!")
    assert_clean_error(run("extract", f"{image}:good", str(tmp_path / "o")), "digest")


def test_truncated_chunk(image: Path, tmp_path: Path) -> None:
    blobs = image / "blobs/sha256"
    big = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:1000])
    assert_clean_error(run("extract", f"{image}:good", str(tmp_path / "o")), big.name)


def test_wrong_digest_chunk(image: Path, tmp_path: Path) -> None:
    blobs = image / "blobs/sha256"
    big = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    data[1234] ^= 0xFF
    big.write_bytes(bytes(data))
    assert_clean_error(run("extract", f"{image}:good", str(tmp_path / "o")), big.name)


def _replace_rootfs(image: Path, data: bytes) -> None:
    """Point the tag at a manifest whose rootfs layer is ``data`` (digests consistent)."""
    from puzzlefs.oci import ImageLayout, Manifest
    from puzzlefs.oci.layout import Descriptor

    layout = ImageLayout(image)
    _, _, manifest = layout.read_manifest("good")
    digest = layout.blobs.put(data)
    layers = [
        Descriptor(d.media_type, digest, len(data), d.annotations) if d is manifest.rootfs else d
        for d in manifest.layers
    ]
    mbytes = Manifest(manifest.config, layers).to_bytes()
    layout.set_tag("good", layout.blobs.put(mbytes), len(mbytes))


def test_unsupported_manifest_version(image: Path, tmp_path: Path) -> None:
    _replace_rootfs(image, encode_rootfs(Rootfs([[Inode(1, Kind.DIR)]], {}, 2)))  # type: ignore[arg-type]
    proc = run("extract", f"{image}:good", str(tmp_path / "o"))
    assert_clean_error(proc, "version", "2", "3")


def test_rootfs_not_capnp(image: Path, tmp_path: Path) -> None:
    _replace_rootfs(image, b"this is not cap'n proto at all")
    assert_clean_error(run("extract", f"{image}:good", str(tmp_path / "o")), "Cap'n Proto")


def test_hostile_names_refused(image: Path, tmp_path: Path) -> None:
    for bad in (b"..", b".", b"a/b", b"", b"x\0y"):
        from puzzlefs.format import DirEntry

        root = Inode(1, Kind.DIR, permissions=0o755)  # type: ignore[arg-type]
        root.entries = [DirEntry(2, bad)]  # type: ignore[arg-type]
        evil = Inode(2, Kind.FILE, permissions=0o644)  # type: ignore[arg-type]
        _replace_rootfs(image, encode_rootfs(Rootfs([[root, evil]], {})))
        out = tmp_path / f"o{len(bad)}{bad[:1].hex()}"
        assert_clean_error(run("extract", f"{image}:good", str(out)), "invalid")
        assert not (tmp_path / "b").exists()


def test_directory_loop_refused(image: Path, tmp_path: Path) -> None:
    from puzzlefs.format import DirEntry

    root = Inode(1, Kind.DIR, permissions=0o755)  # type: ignore[arg-type]
    root.entries = [DirEntry(2, b"sub")]  # type: ignore[arg-type]
    sub = Inode(2, Kind.DIR, permissions=0o755)  # type: ignore[arg-type]
    sub.entries = [DirEntry(1, b"up")]  # type: ignore[arg-type]
    _replace_rootfs(image, encode_rootfs(Rootfs([[root, sub]], {})))
    assert_clean_error(run("extract", f"{image}:good", str(tmp_path / "o")), "loop")


def test_huge_chunk_length_refused(image: Path, tmp_path: Path) -> None:
    from puzzlefs.format import BlobRef, DirEntry, FileChunk

    blob = max((image / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    root = Inode(1, Kind.DIR, permissions=0o755)  # type: ignore[arg-type]
    root.entries = [DirEntry(2, b"f")]  # type: ignore[arg-type]
    f = Inode(2, Kind.FILE, permissions=0o644)  # type: ignore[arg-type]
    f.chunks = [FileChunk(BlobRef(bytes.fromhex(blob.name), 0, False), 2**62)]
    _replace_rootfs(image, encode_rootfs(Rootfs([[root, f]], {})))
    assert_clean_error(run("extract", f"{image}:good", str(tmp_path / "o")), "outside")


# 1 MB is stored inline; 24 MB is past PARALLEL_MIN_BYTES: worker processes store it.
@pytest.mark.parametrize("file_size", [500_000, 12 << 20], ids=["inline", "workers"])
def test_full_disk_fails_the_build_and_keeps_every_tag_and_blob(
    image: Path, tmp_path: Path, file_size: int
) -> None:
    before = snapshot(image)
    src = tmp_path / "src2"
    src.mkdir()
    (src / "new-data").write_bytes(os.urandom(file_size))
    (src / "more-data").write_bytes(os.urandom(file_size))
    # The disk fills up after some chunks were stored.
    store = FaultyBlobStore(image / "blobs" / "sha256", fail_put_after=3)
    with pytest.raises(OSError) as info:
        build(src, image, "good", store=store)
    assert info.value.errno == errno.ENOSPC
    assert store.puts == 3
    assert_store_kept(before, snapshot(image))


def test_failed_flush_fails_the_build_and_keeps_the_store(image: Path, tmp_path: Path) -> None:
    """The store is flushed (syncfs) in a thread while the metadata is written: an
    error there still fails the build, before the tag is written."""
    before = snapshot(image)
    src = tmp_path / "src2"
    src.mkdir()
    (src / "new-data").write_bytes(os.urandom(300_000))
    store = FaultyBlobStore(image / "blobs" / "sha256", fail_sync=errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        build(src, image, "good", store=store)
    assert_store_kept(before, snapshot(image))


def test_extract_refuses_non_empty_dest(image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "existing").write_bytes(b"")
    assert_clean_error(run("extract", f"{image}:good", str(dest)), "not empty")


def test_unwritable_store_build_fails_cleanly(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    (tmp_path / "file").write_bytes(b"")
    assert_clean_error(run("build", str(src), f"{tmp_path}/file:t"), "")
    assert (tmp_path / "file").read_bytes() == b""


def test_copy_of_layout_still_fine(image: Path, tmp_path: Path) -> None:
    shutil.copytree(image, tmp_path / "copy")
    assert run("extract", f"{tmp_path}/copy:good", str(tmp_path / "o")).returncode == 0


@pytest.mark.parametrize("tag", ["my tag", "-x", "a" * 256, "v1/", "/v1", "a..b", "é"])
def test_tags_outside_the_oci_grammar_are_refused(tmp_path: Path, tag: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    assert_clean_error(run("build", str(src), f"{tmp_path}/oci:{tag}"), "invalid tag")
    assert not (tmp_path / "oci").exists()


@pytest.mark.parametrize("tag", ["v1", "3.12-slim", "library/debian", "a_b", "x--y", "v1+rc.2"])
def test_tags_of_the_oci_grammar_are_taken(tmp_path: Path, tag: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    assert run("build", str(src), f"{tmp_path}/oci:{tag}").returncode == 0
    assert run("tags", str(tmp_path / "oci")).stdout.split() == [tag]
    assert run("extract", f"{tmp_path}/oci:{tag}", str(tmp_path / "x")).returncode == 0


def test_the_legacy_form_only_when_it_cannot_be_a_mistake(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    oops = run("build", str(src), f"{tmp_path}/o:v1", "extra-arg")
    assert_clean_error(oops, "one argument too many")
    assert not (tmp_path / "o:v1").exists() and not (tmp_path / "o").exists()
    assert run("build", str(src), str(tmp_path / "oci"), "v1").returncode == 0
    assert run("tags", str(tmp_path / "oci")).stdout.split() == ["v1"]
