"""Read a PuzzleFS image: open a tag, resolve inodes through the layer stack, list
directories, read file ranges, walk the tree.

This is the filesystem behaviour; the FUSE adapter and extraction are thin users of
it. Every blob is checked against its sha256 before a byte of it is used (and, when a
:class:`~puzzlefs.reader.verify.ChunkVerifier` is given, against its fs-verity
digest); decoded inodes and blobs live in bounded LRU caches.
"""

from puzzlefs.reader._image import Image, InodeAttr, NotFound, is_valid_name, open_image

__all__ = ["Image", "InodeAttr", "NotFound", "is_valid_name", "open_image"]
