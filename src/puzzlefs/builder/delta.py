"""Delta builds (FORMAT.md §6): a new metadata layer on top of a base image.

Paths that still exist keep their base inode numbers; new paths get numbers above
anything the base stores, in canonical walk order. The new layer holds only what
changed (changed inodes, and directories whose entries changed, which includes the
parents of anything added or removed) plus a ``wht`` inode for each base inode that is
no longer reachable; lookups fall through to the base's layers for the rest.

A layer costs its base's layers too (the rootfs blob holds every layer), so when most
of the tree's paths changed (another release, not an update), a delta is larger than a
fresh image: the builder then writes one flat layer, exactly as a plain build would,
and still shares every unchanged chunk through the store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from puzzlefs.builder.walk import Tree
from puzzlefs.format import Ino, Inode, Kind
from puzzlefs.reader import Image

__all__ = ["delta_layer", "renumber", "structural_change"]


def _paths(tree: Tree) -> dict[Ino, list[bytes]]:
    """Every path of every node (hard links have several), in walk order."""
    out: dict[Ino, list[bytes]] = {tree.nodes[0].ino: [b""]}
    for node in tree.nodes:  # ino order is walk order: a directory before its entries
        if node.entries:
            parent = out[node.ino][0]
            for name, ino in node.entries:
                out.setdefault(ino, []).append(parent + b"/" + name if parent else name)
    return out


def structural_change(tree: Tree, base: Image) -> float:
    """The share of paths added or removed between ``base`` and ``tree`` (0 to 1), from
    names alone: a cheap estimate of how much of the tree a delta layer re-renders."""
    paths = {p for ps in _paths(tree).values() for p in ps}
    base_paths = {path for path, _ in base.walk()}
    changed = len(paths ^ base_paths)
    return changed / max(1, len(paths | base_paths))


def renumber(tree: Tree, base: Image) -> Tree:
    """Give ``tree`` the base's inode numbers where the same path exists there."""
    base_paths = {path: inode.ino for path, inode in base.walk()}
    next_ino = base.rootfs.max_ino() + 1
    mapping: dict[Ino, Ino] = {}
    used: set[int] = set()
    paths = _paths(tree)
    for node in tree.nodes:
        for path in paths.get(node.ino, []):
            candidate = base_paths.get(path)
            if candidate is not None and candidate not in used:
                mapping[node.ino] = Ino(candidate)
                used.add(candidate)
                break
    for node in tree.nodes:
        if node.ino not in mapping:
            mapping[node.ino] = Ino(next_ino)
            next_ino += 1
    nodes = [
        replace(n, ino=mapping[n.ino], entries=[(name, mapping[ino]) for name, ino in n.entries])
        for n in tree.nodes
    ]
    nodes.sort(key=lambda n: n.ino)
    return Tree(nodes, Ino(next_ino - 1))


def delta_layer(inodes: Iterable[Inode], base: Image) -> list[Inode]:
    """The new layer: inodes that differ from what the base shows, plus whiteouts for
    base inodes the new tree no longer reaches. Sorted by ino."""
    inodes = list(inodes)
    base_max = base.rootfs.max_ino()
    present = {i.ino for i in inodes}
    # Numbers above the base's maximum are new; the others were taken from base paths.
    layer = [i for i in inodes if i.ino > base_max or base.find(i.ino) != i]
    for _, old in base.walk():
        if old.ino not in present:
            present.add(old.ino)
            layer.append(Inode(old.ino, Kind.WHT))
    layer.sort(key=lambda i: i.ino)
    return layer
