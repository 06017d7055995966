"""Where registry images live locally: one OCI layout per registry repository.

``$PUZZLEFS_REGISTRY_CACHE/HOST/REPO``, else ``$XDG_CACHE_HOME/puzzlefs/registry/...``,
else ``~/.cache/puzzlefs/registry/...``. A mount from a registry fetches into it (so a
later mount, ``pull`` or ``copy`` of the same image finds its blobs here); it is an
ordinary layout: ``puzzlefs verify``, ``gc`` and ``rm -r`` work on it.
"""

from __future__ import annotations

import os
from pathlib import Path

from puzzlefs.registry._reference import RemoteRef

__all__ = ["cache_root", "cache_dir"]


def cache_root() -> Path:
    env = os.environ.get("PUZZLEFS_REGISTRY_CACHE")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "puzzlefs" / "registry"


def cache_dir(ref: RemoteRef, root: str | os.PathLike[str] | None = None) -> Path:
    """The layout for ``ref``'s repository (the host and repository were checked
    against the distribution grammar: no ``..``, no empty parts)."""
    base = Path(root) if root is not None else cache_root()
    return base / ref.host / ref.repo
