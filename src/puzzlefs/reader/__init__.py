"""Read a PuzzleFS image: open a tag, resolve inodes through the layer stack, list
directories, read file ranges, walk the tree.

This is the filesystem behaviour; the FUSE adapter and extraction are thin users of
it. Every blob is checked against its sha256 before a byte of it is used (and, with
the manifest's fs-verity digest, against the fs-verity chain); decoded inodes and
blobs live in bounded LRU caches. The mount serves from compact tables
(:mod:`puzzlefs.reader._tables`, kept by :mod:`puzzlefs.reader.index`) instead of
Python objects per inode.

The names below are imported on first use: the mount needs none of pycapnp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["Image", "InodeAttr", "NotFound", "is_valid_name", "open_image"]

if TYPE_CHECKING:
    from puzzlefs.reader._image import Image, InodeAttr, NotFound, is_valid_name, open_image


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'puzzlefs.reader' has no attribute {name!r}")
    value = getattr(importlib.import_module("puzzlefs.reader._image"), name)
    globals()[name] = value
    return value
