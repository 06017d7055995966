"""Delta builds (FORMAT.md §6): a new metadata layer on top of a base image.

Paths that still exist keep their base inode numbers; new paths get numbers above
anything the base stores, in canonical walk order. The new layer holds only what
changed (changed inodes, and directories whose entries changed, which includes the
parents of anything added or removed) plus a ``wht`` inode for each base inode that is
no longer reachable; lookups fall through to the base's layers for the rest.

A layer costs its base's layers too (the rootfs blob holds every layer), so when most
of the tree's paths changed (another release, not an update), or the base's layers
have grown past twice the tree, a delta is larger than a fresh image: the builder
then writes one flat layer, exactly as a plain build would, and still shares every
unchanged chunk through the store (see :func:`delta_pays`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import replace

from puzzlefs.builder.walk import Tree
from puzzlefs.format import Ino, Inode, Kind
from puzzlefs.reader import Image

__all__ = ["delta_layer", "delta_pays", "renumber"]


def _paths(tree: Tree) -> dict[Ino, list[bytes]]:
    """Every path of every node (hard links have several), in walk order."""
    out: dict[Ino, list[bytes]] = {tree.nodes[0].ino: [b""]}
    for node in tree.nodes:  # ino order is walk order: a directory before its entries
        if node.entries:
            parent = out[node.ino][0]
            for name, ino in node.entries:
                out.setdefault(ino, []).append(parent + b"/" + name if parent else name)
    return out


def delta_pays(tree: Tree, base: Image) -> bool:
    """Whether a layer on ``base`` is likely smaller than a flat image of ``tree``.

    The rootfs blob holds every layer, so a delta costs the base's layers plus the new
    one, while a flat image costs one layer of the tree. Estimated from names alone
    (before any data is read): paths added or removed stand for the new layer. A
    chain therefore grows while its layers stay under twice a flat image, then starts
    again from a flat one: metadata never costs more than about twice the tree.
    """
    paths = {p for ps in _paths(tree).values() for p in ps}
    base_paths = {path for path, _ in base.walk()}
    changed = len(paths ^ base_paths)
    if changed > len(paths | base_paths) / 2:
        return False  # another release rather than an update
    return base.rootfs.inode_count() + changed <= 2 * len(tree.nodes)


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
    layer = [i for i in inodes if i.ino > base_max or _changed(i, base)]
    for _, old in base.walk():
        if old.ino not in present:
            present.add(old.ino)
            layer.append(Inode(old.ino, Kind.WHT))
    layer.sort(key=lambda i: i.ino)
    return layer


def _changed(new: Inode, base: Image) -> bool:
    """Whether ``new`` differs from the base's inode of the same number.

    Chunks span file boundaries, so an unchanged small file often lands in a new chunk
    beside a changed neighbour: its chunk list differs while its bytes do not. Such a
    file keeps the base's inode (and the new chunks nothing else needs are dropped),
    which keeps delta layers to what really changed.
    """
    old = base.find(new.ino)
    if old is None or old == new:
        return old is None
    if new.kind is not Kind.FILE or old.kind is not Kind.FILE or new.size != old.size:
        return True
    if replace(new, chunks=old.chunks) != old:
        return True  # metadata changed
    # Both chunk lists live in the same store, so the base image reads either.
    return _content_hash(base, new) != _content_hash(base, old)


def _content_hash(image: Image, inode: Inode) -> bytes:
    h = hashlib.sha256()
    for piece in image.read_all(inode):
        h.update(piece)
    return h.digest()
