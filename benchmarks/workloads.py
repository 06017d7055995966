"""The container start-up trees of the mount benchmark, made from this machine.

- :func:`python_tree`: /usr/lib/python3.11, /etc/python3.11 (its sitecustomize.py is a
  link there), /usr/bin/python3.11, and the ``ldd`` closure of the interpreter and of
  every shared object under /usr/lib/python3.11 (the extension modules load libsqlite3,
  libssl, libcrypto, ...), the dynamic loader included. Symlinks on the way are kept as
  symlinks (Debian's merged /usr: ``lib -> usr/lib``, ``lib64 -> usr/lib64``), so the
  tree is laid out as the host is. ``dev/null`` is a real character device: chroot'ed
  programs open it, so FUSE peers are mounted with ``-o dev`` (their default is nodev;
  the kernel peers allow devices by default).
- :func:`python_tree` with ``unchecked=True``: the same tree with every module
  recompiled as an ``unchecked-hash`` .pyc (PEP 552). The format stores no mtimes (a
  puzzlefs mount shows every file at the epoch), so the host's timestamp-checked .pyc
  files are stale there and the interpreter compiles each imported module again, every
  run, which the peers (they keep mtimes) never do. This variant takes that out, so the
  difference left is the filesystems'.
- :func:`debian_rootfs`: a Debian bookworm minbase tree (``debootstrap
  --variant=minbase``, cleaned as container images are) made by
  ``../shared/bench/make_dataset.sh build bookworm`` and cached where that script
  caches it (``$BENCH``, default ``~/.cache/puzzlefs-bench/rootfs/bookworm``).
  debootstrap makes its ``dev/`` nodes.

Both are cached: the Python tree under ``WORKDIR/trees/python3.11`` (delete it to pick
up a changed host), the Debian one under ``$BENCH``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = [
    "CHROOT",
    "CHROOT_ENV",
    "DEBIAN_COMMAND",
    "PYTHON_COMMAND",
    "debian_rootfs",
    "python_tree",
]

PYTHON = "/usr/bin/python3.11"
PYTHON_IMPORTS = (
    "import json, asyncio, email, http.client, sqlite3, xml.etree.ElementTree, unittest"
)
PYTHON_COMMAND = [PYTHON, "-c", PYTHON_IMPORTS]
DEBIAN_COMMAND = ["sh", "-c", "dpkg -l >/dev/null; perl -MPOSIX -e 1"]
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
CHROOT = shutil.which("chroot", path=CHROOT_ENV["PATH"]) or "chroot"
MAKE_DATASET = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench" / "make_dataset.sh"


def python_tree(workdir: str | os.PathLike[str], *, unchecked: bool = False) -> Path:
    """The interpreter's tree under ``workdir/trees/python3.11``, made if missing (or,
    ``unchecked``, ``python3.11-unchecked-pyc``)."""
    base = Path(workdir) / "trees"
    name = "python3.11-unchecked-pyc" if unchecked else "python3.11"
    dest = base / name
    marker = base / f"{name}.done"
    if marker.exists() and dest.is_dir():
        return dest
    tmp = base / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    if unchecked:
        subprocess.run(["cp", "-a", str(python_tree(workdir)), str(tmp)], check=True)
        # In the tree itself, so that the .pyc files name their sources as the
        # interpreter will see them (one process: no /dev/shm in there for a pool).
        # A few test files do not compile, on purpose: the status is not checked.
        subprocess.run(
            [
                CHROOT,
                str(tmp),
                PYTHON,
                "-m",
                "compileall",
                "-q",
                "-f",
                "--invalidation-mode",
                "unchecked-hash",
                "/usr/lib/python3.11",
            ],
            check=False,
            env=CHROOT_ENV,
            capture_output=True,
        )
        os.rename(tmp, dest)
        marker.write_text("complete\n")
        return dest
    tmp.mkdir(parents=True)
    roots = ["/usr/lib/python3.11", "/etc/python3.11", PYTHON]
    elves = [PYTHON] + [
        str(p) for p in Path("/usr/lib/python3.11").rglob("*.so*") if p.is_file() and _is_elf(p)
    ]
    for path in [*roots, *sorted(_ldd_closure(elves))]:
        _copy_path(path, tmp)
    (tmp / "dev").mkdir(exist_ok=True)
    os.mknod(tmp / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    os.chmod(tmp / "dev" / "null", 0o666)
    os.rename(tmp, dest)
    marker.write_text("complete\n")
    return dest


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def _ldd_closure(elves: list[str]) -> set[str]:
    """Every library (and the loader) that ``ldd`` lists for these binaries."""
    found: set[str] = set()
    for elf in elves:
        out = subprocess.run(["ldd", elf], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
            if m:
                found.add(m.group(1))
    return found


def _copy_path(path: str, dest: Path) -> None:
    """Copy ``path`` (a file or a whole directory) to ``dest`` + ``path``, recreating each
    symlink met on the way, and what it points to, as the host has them."""
    parts = Path(path).parts[1:]
    host = Path("/")
    for i, part in enumerate(parts):
        host = host / part
        mirror = dest / host.relative_to("/")
        if host.is_symlink():
            target = os.readlink(host)
            if not mirror.is_symlink():
                mirror.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, mirror)
            resolved = os.path.normpath(os.path.join(host.parent, target))
            rest = parts[i + 1 :]
            _copy_path(os.path.join(resolved, *rest) if rest else resolved, dest)
            return
    mirror = dest / Path(path).relative_to("/")
    if mirror.exists():
        return
    mirror.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(path):
        shutil.copytree(path, mirror, symlinks=True)
    else:
        shutil.copy2(path, mirror)


def debian_rootfs(bench: str | os.PathLike[str] | None = None) -> Path:
    """The bookworm minbase tree, made by the project's dataset script if missing."""
    root = Path(
        bench
        or os.environ.get("BENCH")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "puzzlefs-bench"
    )
    tree = root / "rootfs" / "bookworm"
    if (tree / "var" / "lib" / "dpkg" / "status").exists():
        return tree
    script = MAKE_DATASET.resolve()
    if not script.exists():
        raise SystemExit(
            f"no Debian tree at {tree} and no {script} to make it "
            "(or pass --debian-rootfs DIR: any debootstrap --variant=minbase tree)"
        )
    env = {**os.environ, "BENCH": str(root)}
    subprocess.run([str(script), "build", "bookworm"], check=True, env=env)
    return tree
