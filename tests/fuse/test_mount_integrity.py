"""``mount --digest``: the fs-verity chain checked at mount, and every chunk before its
bytes are served; a tampered chunk gives EIO for its file only, and a log line."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest
from fusehelp import TAG, MountFn, assert_clean, build, cli
from treeutil import point_tag_at_other_manifest

from puzzlefs.reader import open_image


@pytest.fixture
def victim_image(tmp_path: Path) -> tuple[Path, str, dict[str, bytes]]:
    """Three random files; returns (oci, manifest digest, contents)."""
    rng = random.Random(7)
    files = {name: rng.randbytes(2 << 20) for name in ("a", "victim", "z")}
    files["small"] = b"small file"
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    oci = tmp_path / "oci"
    return oci, build(src, oci), files


def _tamper_a_chunk_of(oci: Path, name: str, how: str = "flip") -> str:
    """Damage a chunk that only ``name`` uses; returns the blob's hex digest. ``how``:
    flip one byte, truncate it, or replace it with another valid blob of the store."""
    image = open_image(oci, TAG)
    users: dict[bytes, set[bytes]] = {}
    for path, inode in image.walk():
        for c in inode.chunks:
            users.setdefault(c.blob.digest, set()).add(path)
    own = [
        d
        for d in (c.blob.digest for c in image.resolve_path(name).chunks)
        if users[d] == {name.encode()}
    ]
    assert own, "the victim has no chunk of its own"
    blob = oci / "blobs" / "sha256" / own[len(own) // 2].hex()
    data = bytearray(blob.read_bytes())
    if how == "flip":
        data[len(data) // 3] ^= 0x40
    elif how == "truncate":
        del data[len(data) // 2 :]
    else:  # a blob that is valid under its own name, but not this one
        assert len(own) > 1
        data = bytearray((oci / "blobs" / "sha256" / own[0].hex()).read_bytes())
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    return blob.name


def test_right_digest_mounts(
    victim_image: tuple[Path, str, dict[str, bytes]], mount: MountFn
) -> None:
    oci, digest, files = victim_image
    with mount(f"{oci}:{TAG}", "--digest", digest) as m:
        for name, data in files.items():
            assert (m.path / name).read_bytes() == data


def test_wrong_digest_refuses_to_mount(
    victim_image: tuple[Path, str, dict[str, bytes]], mountpoint: Path
) -> None:
    oci, digest, _ = victim_image
    wrong = format(int(digest, 16) ^ 1, "064x")
    done = cli("mount", "--digest", wrong, f"{oci}:{TAG}", mountpoint)
    assert done.returncode != 0
    assert done.stderr.startswith("Error: ") and "manifest" in done.stderr, done.stderr
    assert wrong in done.stderr
    assert_clean(mountpoint)


@pytest.mark.parametrize(
    ("with_digest", "how"),
    [
        (True, "flip"),
        (True, "truncate"),
        (True, "replace"),
        (False, "flip"),
    ],
    ids=["digest-flip", "digest-truncate", "digest-replace", "sha256-only-flip"],
)
def test_tampered_chunk_gives_eio_for_its_file_only(
    victim_image: tuple[Path, str, dict[str, bytes]], mount: MountFn, with_digest: bool, how: str
) -> None:
    oci, digest, files = victim_image
    blob = _tamper_a_chunk_of(oci, "victim", how)
    flags = ("--digest", digest) if with_digest else ()
    with mount(f"{oci}:{TAG}", *flags) as m:
        with pytest.raises(OSError) as e:
            (m.path / "victim").read_bytes()
        assert e.value.errno == errno.EIO
        # the file's other bytes, and every other file, still read
        with open(m.path / "victim", "rb") as f:
            assert f.read(4096) == files["victim"][:4096]
        for name in ("a", "z", "small"):
            assert (m.path / name).read_bytes() == files[name]
        # and again: a failure is not cached as success
        with pytest.raises(OSError):
            (m.path / "victim").read_bytes()
        log = m.log_text()
        assert blob in log, log
        assert "ERROR" in log


def test_tampered_rootfs_refuses_with_digest(
    victim_image: tuple[Path, str, dict[str, bytes]], mountpoint: Path
) -> None:
    oci, digest, _ = victim_image
    rootfs = open_image(oci, TAG).rootfs_descriptor.digest.hex
    path = oci / "blobs" / "sha256" / rootfs
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    done = cli("mount", "--digest", digest, f"{oci}:{TAG}", mountpoint)
    assert done.returncode != 0 and rootfs in done.stderr, done.stderr
    assert_clean(mountpoint)


@pytest.mark.parametrize("how", ["flip", "swap"])
def test_tampered_manifest_refuses_to_mount(
    victim_image: tuple[Path, str, dict[str, bytes]], tmp_path: Path, mountpoint: Path, how: str
) -> None:
    """A byte flipped in the manifest, or the tag pointed at another tag's manifest
    (every sha256 still consistent: only the fs-verity digest can tell)."""
    oci, digest, _ = victim_image
    if how == "flip":
        manifest = open_image(oci, TAG).manifest_descriptor.digest.hex
        path = oci / "blobs" / "sha256" / manifest
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        os.chmod(path, 0o644)
        path.write_bytes(bytes(data))
    else:
        other = tmp_path / "other-src"
        other.mkdir()
        (other / "f").write_bytes(b"another image")
        build(other, oci, "other")
        point_tag_at_other_manifest(oci, TAG, "other")
        assert cli("mount", f"{oci}:{TAG}", mountpoint).returncode == 0  # fine without
        assert cli("umount", mountpoint).returncode == 0
        assert_clean(mountpoint)
    done = cli("mount", "--digest", digest, f"{oci}:{TAG}", mountpoint)
    assert done.returncode != 0
    assert done.stderr.startswith("Error: ") and len(done.stderr.splitlines()) == 1, done.stderr
    assert "manifest" in done.stderr, done.stderr
    assert_clean(mountpoint)
