"""Advisory directory locks that die with the process that took them.

A ``flock`` belongs to an open file description, and ``fork`` shares those: a child
(a build's worker process, a mount daemon) would otherwise keep a lock alive after the
process that took it was killed, and every later writer would wait forever. So every
lock descriptor taken here is closed in each forked child, and opened close-on-exec.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

__all__ = ["flocked"]

_held: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


@contextlib.contextmanager
def flocked(
    path: str | os.PathLike[str], *, shared: bool = False, wait: bool = True
) -> Iterator[bool]:
    """Hold a shared or exclusive lock on the directory ``path`` for the block.

    Yields True once locked; with ``wait=False``, yields False at once instead of
    waiting when another process holds a conflicting lock.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _held.add(fd)
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        yield locked
    finally:
        _held.discard(fd)
        os.close(fd)
