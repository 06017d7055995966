"""Mounts straight from a registry (docker-registry on 127.0.0.1): live at once, each
chunk fetched on first use into the cache layout, ``--digest``, ``--prefetch all``,
recorded access lists and prefetching from them, an image split beyond the manifest
limit, and a registry killed and restarted under a mount (EIO, never a hang, then
reads recover). Reads go through subprocesses with timeouts, so nothing can hang.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fusehelp import MountFn, cli, wait_until
from registryutil import REGISTRY, RegistryServer, run_registry

from puzzlefs import build, open_image
from puzzlefs.oci import ImageLayout

pytestmark = pytest.mark.skipif(REGISTRY is None, reason="docker-registry is not installed")
READ_TIMEOUT = 120  # a read of a chunk whose fetch fails ends well before this


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    yield from run_registry(tmp_path)


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The registry cache of this test (the mount daemons inherit it)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PUZZLEFS_REGISTRY_CACHE", str(path))
    return path


def make_tree(root: Path) -> dict[str, bytes]:
    rnd = random.Random(7)
    files = {
        "a/first": rnd.randbytes(100_000),
        "m/middle": rnd.randbytes(6 << 20),
        "m/text": b"hello, registry\n" * 3000,
        "z/last": rnd.randbytes(300_000),
        "z/empty": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.symlink("../m/text", root / "a" / "link")
    return files


def push(registry: RegistryServer, oci: Path, tag: str, repo: str = "lazy") -> str:
    ref = f"docker://{registry.host}/{repo}:{tag}"
    done = cli("push", f"{oci}:{tag}", ref)
    assert done.returncode == 0, done.stderr
    return ref


def read(path: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["cat", str(path)], capture_output=True, timeout=READ_TIMEOUT, check=False
    )


def cached(cache: Path, repo: str = "lazy") -> set[str]:
    blobs = [p for p in cache.glob(f"*/{repo}/blobs/sha256")]
    return {n for b in blobs for n in os.listdir(b) if not n.startswith(".")}


def chunk_hexes(oci: Path, tag: str, path: str) -> set[str]:
    image = open_image(oci, tag)
    return {c.blob.digest.hex() for c in image.resolve_path(path).chunks}


def test_mount_from_a_registry(
    registry: RegistryServer, cache: Path, tmp_path: Path, mount: MountFn
) -> None:
    src, oci = tmp_path / "src", tmp_path / "oci"
    files = make_tree(src)
    result = build(src, oci, "v1", compress=True)
    ref = push(registry, oci, "v1")
    chunks = {d.digest.hex for d in open_image(oci, "v1").manifest.chunk_layers}
    record = tmp_path / "record.txt"

    with mount(ref, "--record", record, "--digest", result.manifest_verity) as m:
        assert not cached(cache) & chunks - chunk_hexes(oci, "v1", "a/first")  # lazy
        first = read(m.path / "a" / "first")
        assert first.returncode == 0 and first.stdout == files["a/first"]
        assert chunk_hexes(oci, "v1", "a/first") <= cached(cache)
        assert os.readlink(m.path / "a" / "link") == "../m/text"
        for name, data in files.items():
            done = read(m.path / name)
            assert done.returncode == 0 and done.stdout == data, name
    recorded = [line.removeprefix("sha256:") for line in record.read_text().split()]
    assert len(recorded) == len(set(recorded))
    assert set(recorded) == chunks  # every chunk was read, each recorded once
    assert recorded[0] in chunk_hexes(oci, "v1", "a/first")  # in first-use order

    # Mounted again with --prefetch all: everything arrives without a read, and the
    # cache layout then holds the whole image, readable with the registry gone.
    layout_dir = next(cache.glob("*/lazy"))
    with mount(ref, "--prefetch", "all"):
        assert wait_until(lambda: chunks <= cached(cache), timeout=60)
    registry.stop()
    done = cli("extract", f"{layout_dir}:v1", tmp_path / "x", "--digest", result.manifest_verity)
    assert done.returncode == 0, done.stderr
    for name, data in files.items():
        assert (tmp_path / "x" / name).read_bytes() == data
    assert "v1" in ImageLayout(layout_dir).tags()


def test_wrong_digest_refused(registry: RegistryServer, cache: Path, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    build(tmp_path / "src", tmp_path / "oci", "v1")
    ref = push(registry, tmp_path / "oci", "v1")
    (tmp_path / "mnt").mkdir()
    done = cli("mount", "--digest", "0" * 64, ref, tmp_path / "mnt")
    assert done.returncode != 0
    assert done.stderr.startswith("Error: ") and "digest mismatch" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not os.path.ismount(tmp_path / "mnt")


def test_registry_killed_and_restarted(
    registry: RegistryServer, cache: Path, tmp_path: Path, mount: MountFn
) -> None:
    src, oci = tmp_path / "src", tmp_path / "oci"
    files = make_tree(src)
    build(src, oci, "v1")
    ref = push(registry, oci, "v1")
    last = chunk_hexes(oci, "v1", "z/last")
    with mount(ref) as m:
        done = read(m.path / "a" / "first")
        assert done.returncode == 0 and done.stdout == files["a/first"]
        assert not last & cached(cache), "readahead reached the far end: test invalid"
        registry.stop(kill=True)
        # Metadata is local: listing and stat work with the registry gone.
        assert sorted(os.listdir(m.path / "z")) == ["empty", "last"]
        assert (m.path / "z" / "last").stat().st_size == len(files["z/last"])
        done = read(m.path / "z" / "last")
        assert done.returncode != 0 and b"Input/output error" in done.stderr
        assert "z/last" not in m.log_text()  # (the log names chunks, not paths)
        assert "gave up after" in m.log_text()
        registry.start()  # the same port and storage
        done = read(m.path / "z" / "last")
        assert done.returncode == 0 and done.stdout == files["z/last"]
        done = read(m.path / "m" / "middle")
        assert done.returncode == 0 and done.stdout == files["m/middle"]


def test_split_image_from_a_registry(
    registry: RegistryServer, cache: Path, tmp_path: Path, mount: MountFn
) -> None:
    src, oci = tmp_path / "src", tmp_path / "oci"
    files = make_tree(src)
    result = build(src, oci, "v1", manifest_limit=2_000)
    assert result.manifest.media_type.endswith("index.v1+json")
    ref = push(registry, oci, "v1", repo="split")
    with mount(ref, "--digest", result.manifest_verity) as m:
        for name, data in files.items():
            done = read(m.path / name)
            assert done.returncode == 0 and done.stdout == data, name


def test_prefetch_list_first(
    registry: RegistryServer, cache: Path, tmp_path: Path, mount: MountFn
) -> None:
    src, oci = tmp_path / "src", tmp_path / "oci"
    files = make_tree(src)
    build(src, oci, "v1")
    ref = push(registry, oci, "v1")
    record = tmp_path / "record.txt"
    with mount(ref, "--record", record) as m:
        for name in ("z/last", "a/first"):
            assert read(m.path / name).stdout == files[name]
    listed = {line.removeprefix("sha256:") for line in record.read_text().split()}
    assert listed == chunk_hexes(oci, "v1", "z/last") | chunk_hexes(oci, "v1", "a/first")
    other = tmp_path / "other-cache"
    with mount(ref, "--prefetch-list", record, "--cache-dir", other):
        # Nothing is read: the listed chunks arrive in the background.
        assert wait_until(lambda: listed <= cached(other), timeout=60)
    bad = tmp_path / "bad.txt"
    bad.write_text("not a digest\n")
    (tmp_path / "mnt-bad").mkdir()
    done = cli("mount", "--prefetch-list", bad, ref, tmp_path / "mnt-bad")
    assert done.returncode == 2 and "not a sha256 digest" in done.stderr
