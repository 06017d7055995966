"""The canonical walk of a source tree (FORMAT.md §2).

Directories are visited depth-first, pre-order; when a directory is visited, all of its
entries, sorted by raw name bytes, take the next inode numbers. The order the OS lists
directories in, the tree's path and its timestamps never matter, which is what makes
builds reproducible. The walk neither follows symlinks nor crosses filesystems.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from puzzlefs.errors import BuildError
from puzzlefs.format import ROOT_INO, Ino


class Stat(Protocol):
    """The part of ``os.stat_result`` a build uses (tar imports make their own)."""

    @property
    def st_mode(self) -> int: ...
    @property
    def st_uid(self) -> int: ...
    @property
    def st_gid(self) -> int: ...
    @property
    def st_rdev(self) -> int: ...
    @property
    def st_size(self) -> int: ...
    @property
    def st_mtime_ns(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Region:
    """File contents stored inside another file (a member of an uncompressed tar)."""

    path: bytes
    offset: int
    length: int


@dataclass(slots=True)
class Node:
    """One host inode of the source tree.

    For a directory walk, ``st`` is what lstat saw and contents, xattrs and link targets
    are read from ``path``; other sources (tar layers) fill ``content``, ``xattrs`` and
    ``symlink_target`` themselves.
    """

    ino: Ino
    path: bytes
    st: Stat
    # Directories: (name, ino) in name order. Hard links point at the first number.
    entries: list[tuple[bytes, Ino]] = field(default_factory=list)
    content: Region | None = None
    xattrs: list[tuple[bytes, bytes]] | None = None
    symlink_target: bytes | None = None


@dataclass
class Tree:
    nodes: list[Node]  # in ino order, each host inode once
    max_ino: Ino


def walk(root: bytes | str) -> Tree:
    root_b = os.fsencode(root)
    try:
        st = os.lstat(root_b)
    except OSError as e:
        raise BuildError(f"cannot read {os.fsdecode(root_b)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BuildError(f"{os.fsdecode(root_b)} is not a directory")
    root_dev = st.st_dev
    root_node = Node(ROOT_INO, root_b, st)
    nodes = [root_node]
    devices = {ROOT_INO: st.st_dev}
    by_host: dict[tuple[int, int], Ino] = {}
    next_ino = ROOT_INO + 1
    stack = [root_node]
    while stack:
        parent = stack.pop()
        if devices[parent.ino] != root_dev:
            continue  # a mount point: stored as an empty directory
        subdirs: list[Node] = []
        for name in _sorted_names(parent.path):
            path = os.path.join(parent.path, name)
            try:
                est = os.lstat(path)
            except OSError as e:
                raise BuildError(f"cannot stat {os.fsdecode(path)}: {e.strerror}") from None
            ino = Ino(next_ino)
            next_ino += 1
            if not stat.S_ISDIR(est.st_mode) and est.st_nlink > 1:
                key = (est.st_dev, est.st_ino)
                first = by_host.get(key)
                if first is not None:
                    parent.entries.append((name, first))
                    continue
                by_host[key] = ino
            node = Node(ino, path, est)
            nodes.append(node)
            parent.entries.append((name, ino))
            if stat.S_ISDIR(est.st_mode):
                subdirs.append(node)
                devices[ino] = est.st_dev
        stack.extend(reversed(subdirs))
    nodes.sort(key=lambda n: n.ino)
    return Tree(nodes, Ino(next_ino - 1))


def _sorted_names(path: bytes) -> list[bytes]:
    try:
        names = os.listdir(path)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            return []
        raise BuildError(f"cannot list {os.fsdecode(path)}: {e.strerror}") from None
    names.sort()
    return names


def iter_regular(tree: Tree) -> Iterator[Node]:
    """Regular files in ino order: the order their contents enter the chunk stream."""
    for node in tree.nodes:
        if stat.S_ISREG(node.st.st_mode):
            yield node
