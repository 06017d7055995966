"""Real FUSE mounts: built images, and a fixture that yields a mounted path.

Every mount goes through the ``puzzlefs`` command line in a subprocess (as a user
would), with a timeout, and is unmounted in the fixture's teardown even when the test
failed; a daemon that does not go away is killed.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from fusehelp import (
    TAG,
    DataTree,
    Mounted,
    MountFn,
    assert_clean,
    build,
    cli,
    force_clean,
    mount_entry,
)


def _fuse_available() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


_SKIP = _fuse_available()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _SKIP is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=_SKIP))


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[MountFn]:
    """``with mount(IMAGE_REF, *flags) as m:`` mounts with the CLI (in the background,
    logging to a file) and unmounts at the end; teardown cleans up after failures."""
    used: list[Path] = []

    @contextlib.contextmanager
    def do(image: str, *flags: str, mountpoint: Path | None = None) -> Iterator[Mounted]:
        mnt = mountpoint or tmp_path / f"mnt{len(used)}"
        mnt.mkdir(exist_ok=True)
        used.append(mnt)
        log = tmp_path / f"mount{len(used)}.log"
        done = cli("mount", "--log-file", log, *flags, image, mnt)
        assert done.returncode == 0, done.stderr
        assert mount_entry(mnt) is not None
        try:
            yield Mounted(mnt, log)
        finally:
            if mount_entry(mnt) is not None:
                res = cli("umount", mnt)
                assert res.returncode == 0, res.stderr
            assert_clean(mnt)

    try:
        yield do
    finally:
        for mnt in used:
            force_clean(mnt)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty directory for tests that mount by hand; cleaned up whatever happens."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        yield mnt
    finally:
        force_clean(mnt)


@pytest.fixture(scope="session")
def all_types_images(
    all_types_tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """The all-types tree built plain and with -c: ``{"plain": "OCI:TAG", ...}``."""
    oci = tmp_path_factory.mktemp("all-types-oci")
    build(all_types_tree, oci / "plain")
    build(all_types_tree, oci / "zstd", TAG, "-c")
    return {"plain": f"{oci / 'plain'}:{TAG}", "zstd": f"{oci / 'zstd'}:{TAG}"}


@pytest.fixture(scope="session")
def data_tree(tmp_path_factory: pytest.TempPathFactory) -> DataTree:
    """Random multi-chunk files (1-5 MB) and small ones, on disk and in memory."""
    root = tmp_path_factory.mktemp("data") / "rootfs"
    rng = random.Random(3)
    files: dict[str, bytes] = {}
    for i in range(10):
        files[f"big{i}"] = rng.randbytes(rng.randrange(1 << 20, 5 << 20))
    for i in range(40):
        files[f"small/{i:02d}"] = rng.randbytes(rng.randrange(0, 70000))
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return DataTree(root, files)


@pytest.fixture(scope="session")
def data_images(data_tree: DataTree, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    oci = tmp_path_factory.mktemp("data-oci")
    build(data_tree.root, oci / "plain")
    build(data_tree.root, oci / "zstd", TAG, "-c")
    return {"plain": f"{oci / 'plain'}:{TAG}", "zstd": f"{oci / 'zstd'}:{TAG}"}
