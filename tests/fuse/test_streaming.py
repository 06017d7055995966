"""Sequential readers on a mount: the loaders that fetch, check and decompress the next
blobs of the stream ahead of the reader must give exactly the bytes the on-demand path
gives, leave a damaged blob to the file that needs it, and never serve a blob checked
under one flag as the other."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest
from fusehelp import MountFn, build

from puzzlefs.reader import open_image


def _files(root: Path, count: int = 160, seed: int = 3) -> dict[str, bytes]:
    """Files of 20-300 KiB, part random and part repetitive (so zstd has work), in a
    few directories: a walk over them crosses blob and directory boundaries."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(count):
        rel = f"d{i % 5}/f{i:03d}"
        size = rng.randrange(20_000, 300_000)
        words = b"".join(rng.choice([b"alpha ", b"beta ", b"gamma\n"]) for _ in range(64))
        body = (rng.randbytes(size // 3) + words * (size // len(words) + 1))[:size]
        files[rel] = body
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    base = tmp_path_factory.mktemp("stream")
    files = _files(base / "tree")
    build(base / "tree", base / "oci", "plain")
    build(base / "tree", base / "oci", "zstd", "-c")
    return base / "oci", files


@pytest.mark.parametrize("tag", ["plain", "zstd"])
def test_a_walk_reads_every_file_exactly(
    images: tuple[Path, dict[str, bytes]], mount: MountFn, tag: str
) -> None:
    oci, files = images
    with mount(f"{oci}:{tag}") as m:
        for rel in sorted(files):  # the stream's order, as tar walks it
            assert (m.path / rel).read_bytes() == files[rel], rel
        # A second pass is served from the kernel's cache and the blob cache.
        got = {rel: hashlib.sha256((m.path / rel).read_bytes()).digest() for rel in files}
        assert got == {rel: hashlib.sha256(b).digest() for rel, b in files.items()}


@pytest.mark.parametrize("tag", ["plain", "zstd"])
def test_random_reads_then_a_walk_agree(
    images: tuple[Path, dict[str, bytes]], mount: MountFn, tag: str
) -> None:
    """Random reads load blobs frame by frame; the walk after them finds some blobs
    cached that way and has the rest decompressed whole: every byte must agree."""
    oci, files = images
    rng = random.Random(11)
    with mount(f"{oci}:{tag}") as m:
        names = sorted(files)
        for _ in range(300):
            rel = rng.choice(names)
            body = files[rel]
            off = rng.randrange(len(body))
            size = rng.choice([1, 100, 4096, 70_000])
            fd = os.open(m.path / rel, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                assert os.pread(fd, size, off) == body[off : off + size], (rel, off, size)
            finally:
                os.close(fd)
        for rel in names:
            assert (m.path / rel).read_bytes() == files[rel], rel


def _own_blob_of(oci: Path, tag: str, name: str) -> Path:
    """A blob in the middle of ``name`` that no other file uses."""
    image = open_image(oci, tag)
    users: dict[bytes, set[bytes]] = {}
    for path, inode in image.walk():
        for c in inode.chunks:
            users.setdefault(c.blob.digest, set()).add(path)
    own = [
        c.blob.digest
        for c in image.resolve_path(name).chunks
        if users[c.blob.digest] == {name.encode()}
    ]
    assert own, f"{name} has no chunk of its own"
    return oci / "blobs" / "sha256" / own[len(own) // 2].hex()


@pytest.mark.parametrize("tag", ["plain", "zstd"])
def test_a_damaged_blob_ahead_fails_only_its_file(
    images: tuple[Path, dict[str, bytes]], mount: MountFn, tmp_path: Path, tag: str
) -> None:
    """The loaders meet the damaged blob before the reader does; the file that needs it
    still gets EIO (every time), the files around it read exactly."""
    oci, files = images
    work = tmp_path / "oci"
    shutil.copytree(oci, work)  # a copy: the module's images stay sound
    victim = max(sorted(files)[20:-20], key=lambda rel: len(files[rel]))  # inside the walk
    blob = _own_blob_of(work, tag, victim)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x10
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    with mount(f"{work}:{tag}") as m:
        for rel in sorted(files):
            if rel == victim:
                with pytest.raises(OSError) as e:
                    (m.path / rel).read_bytes()
                assert e.value.errno == errno.EIO
            else:
                assert (m.path / rel).read_bytes() == files[rel], rel
        with pytest.raises(OSError):
            (m.path / victim).read_bytes()
        assert blob.name in m.log_text()
