"""Shared fixtures: the reference vectors and a tree with every inode type."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from treeutil import make_all_types_tree, shared_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_index_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Mount indexes go to a directory of this run, not the user's cache (children
    started by the tests inherit it)."""
    os.environ["PUZZLEFS_INDEX_DIR"] = str(tmp_path_factory.mktemp("index"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("shared/ not found beside the checkout (set PUZZLEFS_SHARED)")
    return path


@pytest.fixture(scope="session")
def vectors(shared: Path) -> Path:
    return shared / "vectors"


@pytest.fixture(scope="session")
def all_types_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the all-types tree needs root (devices, owners)")
    root = tmp_path_factory.mktemp("all-types") / "rootfs"
    make_all_types_tree(root)
    return root
