"""The compatibility suite: the reference implementation itself against ours, both ways.

The reference binary is named by ``PUZZLEFS_REFERENCE`` (``scripts/install-reference.sh``
builds it and prints its path). Without it, or without root or FUSE, these tests skip
and say why; under CI (``CI=true``) they fail instead, so that a CI run that lost the
reference cannot pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refutil import (  # noqa: E402
    Built,
    Jail,
    build_ours,
    make_reference_extractable,
    reference_build,
    run_reference,
)
from treeutil import make_all_types_tree  # noqa: E402

from puzzlefs import build  # noqa: E402

REFERENCE_VERSION = "puzzlefs 0.2.0"


def _reference() -> tuple[Path | None, str]:
    """The reference binary, or None and why it cannot be used."""
    name = os.environ.get("PUZZLEFS_REFERENCE")
    if not name:
        return None, "PUZZLEFS_REFERENCE is not set (scripts/install-reference.sh builds it)"
    binary = Path(name)
    if not os.access(binary, os.X_OK):
        return None, f"PUZZLEFS_REFERENCE={name} is not an executable"
    if os.geteuid() != 0:
        return None, "the compatibility tests need root (devices, owners, chroot, FUSE)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return None, "the compatibility tests need /dev/fuse and fusermount3"
    version = run_reference(binary, "--version").stdout.strip()
    if version != REFERENCE_VERSION:
        return None, f"{name} is {version!r}, expected {REFERENCE_VERSION!r}"
    return binary, ""


@pytest.fixture(scope="session")
def reference() -> Path:
    binary, why = _reference()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the compatibility tests: {why}", pytrace=False)
        pytest.skip(why)
    return binary


@pytest.fixture(autouse=True)
def _needs_reference(reference: Path) -> None:
    """Every test here runs against the reference, or skips (fails under CI)."""


@pytest.fixture(scope="session")
def jail(reference: Path, tmp_path_factory: pytest.TempPathFactory) -> Jail:
    return Jail(tmp_path_factory.mktemp("jail") / "root", reference)


@pytest.fixture(scope="session")
def extractable_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The all-types tree less what the reference's extract cannot get through (see
    make_reference_extractable), checked to be exactly the entries expected."""
    root = tmp_path_factory.mktemp("extractable") / "rootfs"
    make_all_types_tree(root)
    removed = make_reference_extractable(root)
    assert sorted(removed) == [b"dev/socket", b"links/abs-dangling", b"links/rel"]
    return root


def _stdlib() -> Path:
    debian = Path("/usr/lib/python3.11")
    return debian if debian.is_dir() else Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the Python standard library (1,500 entries, about 30 MB without its
    static libraries): real files, names, symlinks and sizes."""
    root = tmp_path_factory.mktemp("real") / "rootfs"
    subprocess.run(["cp", "-a", str(_stdlib()), str(root)], check=True, timeout=300)
    for static in root.rglob("*.a"):
        static.unlink()
    return root


@pytest.fixture(scope="session")
def real_extractable_tree(real_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("real-extractable") / "rootfs"
    subprocess.run(["cp", "-a", str(real_tree), str(root)], check=True, timeout=300)
    make_reference_extractable(root)
    return root


def _make_v2(v1: Path, v2: Path) -> None:
    """``v1`` with changed contents and metadata, additions (a hard link to a kept
    inode among them), deletions (files, a subtree, a fifo) and type changes. (The
    deletion of one link of a hard-link group has tests of its own.)"""
    subprocess.run(["cp", "-a", str(v1), str(v2)], check=True, timeout=300)
    (v2 / "text").write_bytes(b"text, version two\n" * 2000)
    with open(v2 / "random-5M", "r+b") as f:
        f.seek(2_000_000)
        f.write(bytes(100))
    os.chmod(v2 / "owned", 0o640)
    os.chown(v2 / "owned", 99, 98)
    os.setxattr(v2 / "xattrs", "user.text", b"value two")
    os.removexattr(v2 / "xattrs", "user.empty")
    for gone in ("dup-b", "dev/fifo"):
        os.unlink(v2 / gone)
    shutil.rmtree(v2 / "deep" / "/".join(f"d{i}" for i in range(58)))  # d57/d58/d59/bottom
    (v2 / "new" / "sub").mkdir(parents=True)
    (v2 / "new" / "sub" / "file").write_bytes(b"added in v2\n" * 100)
    os.symlink("../dup-a", v2 / "new" / "rel")
    os.link(v2 / "links" / "second", v2 / "hard" / "again")
    os.unlink(v2 / "one")
    (v2 / "one").mkdir()
    (v2 / "one" / "inside").write_bytes(b"a file became a directory")
    os.unlink(v2 / "empty")
    os.symlink("dup-a", v2 / "empty")


@pytest.fixture(scope="session")
def delta_trees(extractable_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two versions of a tree for ``-b`` chains. Both stay within what the reference's
    extract can get through, so one chain serves both directions."""
    root = tmp_path_factory.mktemp("delta")
    v1, v2 = root / "v1", root / "v2"
    subprocess.run(["cp", "-a", str(extractable_tree), str(v1)], check=True, timeout=300)
    _make_v2(v1, v2)
    assert make_reference_extractable(v2) == []
    return [v1, v2]


@pytest.fixture(scope="session")
def reference_images(
    reference: Path,
    all_types_tree: Path,
    real_tree: Path,
    delta_trees: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Built]:
    """The reference's builds: the full trees plain and ``-c``; ``-b`` chains plain and
    ``-c`` on its own base, and on a base we built."""
    out = tmp_path_factory.mktemp("reference-images")
    built: dict[str, Built] = {}
    for name, tree in (("all-types", all_types_tree), ("real", real_tree)):
        for suffix, compress in (("", False), ("-c", True)):
            oci = out / (name + suffix)
            digest = reference_build(reference, tree, oci, "t", compress=compress)
            built[name + suffix] = Built(oci, "t", tree, digest)
    v1, v2 = delta_trees
    for name, compress, our_base in [
        ("delta", False, False),
        ("delta-c", True, False),
        ("delta-on-our-base", False, True),
    ]:
        oci = out / name
        if our_base:
            build(v1, oci, "v1")
        else:
            reference_build(reference, v1, oci, "v1", compress=compress)
        digest = reference_build(reference, v2, oci, "v2", compress=compress, base="v1")
        built[name] = Built(oci, "v2", v2, digest)
    return built


@pytest.fixture(scope="session")
def our_images(
    reference: Path,
    all_types_tree: Path,
    real_tree: Path,
    delta_trees: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Built]:
    """Our builds of the full trees (for the reference's mount, and to compare bytes)."""
    into = tmp_path_factory.mktemp("our-images")
    trees = {"all-types": all_types_tree, "real": real_tree}
    return build_ours(trees, into, reference, *delta_trees)
