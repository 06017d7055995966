"""Where registry images live locally: one OCI layout per registry repository.

``$PUZZLEFS_REGISTRY_CACHE/HOST/REPO``, else ``$XDG_CACHE_HOME/puzzlefs/registry/...``,
else ``~/.cache/puzzlefs/registry/...``. A mount from a registry fetches into it (so a
later mount, ``pull`` or ``copy`` of the same image finds its blobs here); it is an
ordinary layout: ``puzzlefs verify``, ``gc`` and ``rm -r`` work on it.
"""

from __future__ import annotations

import os
from pathlib import Path

from puzzlefs._files import user_cache_dir
from puzzlefs.registry._reference import RemoteRef

__all__ = ["cache_root", "cache_dir"]


def cache_root() -> Path:
    return user_cache_dir("registry", "PUZZLEFS_REGISTRY_CACHE")


def cache_dir(ref: RemoteRef, root: str | os.PathLike[str] | None = None) -> Path:
    """The layout for ``ref``'s repository (the host and repository were checked
    against the distribution grammar: no ``..``, no empty parts)."""
    base = Path(root) if root is not None else cache_root()
    return base / ref.host / ref.repo
