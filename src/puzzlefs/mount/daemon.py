"""Serving a mount: in the foreground, or in a daemon the command waits for.

The filesystem is mounted by the calling process (errors reach the terminal as one
line), which then, unless told to stay in the foreground, forks a daemon that serves
the requests. The parent waits on a pipe until the daemon has answered the kernel's
INIT request: it returns only once the mount is live, and if the daemon dies or stalls
first, it unmounts and fails. Nothing is left mounted after a failure.

The session's threads serve; the main thread waits for SIGTERM, SIGINT or SIGHUP
(blocked in every thread, so it alone receives them) and then detaches the mount; an
unmount from outside ends the session, which wakes the main thread with SIGUSR1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from puzzlefs.errors import MountError
from puzzlefs.fuse.kernel import MountFlags, mount_fuse, unmount
from puzzlefs.fuse.session import Connection, Operations, Session
from puzzlefs.mount.logs import configure_logging
from puzzlefs.mount.mountinfo import find_mount

__all__ = ["InitPipe", "serve_background", "serve_foreground"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0  # seconds the parent waits for the daemon before giving up
READAHEAD_KIB = 1024
STOP_GRACE = 1.0  # seconds the serving threads get to finish after a stop signal
_STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_ENDED = signal.SIGUSR1  # the session is over (unmounted from outside)

# Builds the filesystem once the mount is made (in the process that will serve it).
MakeFS = Callable[[Callable[[Connection], None]], Operations]


class InitPipe:
    """The reference's ``--init-pipe``: one byte, ``s`` (live) or ``f`` (failed)."""

    def __init__(self, path: str | None) -> None:
        self._fd: int | None = None
        if path is not None:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as e:
                raise MountError(f"init pipe {path}: {e.strerror}") from None

    def send(self, byte: bytes) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, byte)
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class _StatusPipe:
    """The daemon's side of the readiness pipe: ``pid N``, then ``ok`` or ``error ...``."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, line: str) -> None:
        if self._fd is not None:
            data = (" ".join(line.split()) + "\n").encode(errors="replace")
            with contextlib.suppress(OSError):
                while data:
                    data = data[os.write(self._fd, data) :]

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def _blocked_signals() -> Iterator[None]:
    """Hold the stop signals from the mount until the server waits for them (threads
    started meanwhile inherit the mask), so a signal in between cannot kill us with
    the filesystem mounted."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, (*_STOP, _ENDED))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def serve_foreground(
    make_fs: MakeFS, target: str, flags: MountFlags, notify: InitPipe, threads: int,
    handlers: list[logging.Handler | None],
    on_live: Callable[[], None] | None = None,
    before_unmount: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """``on_live`` runs once the mount is live (before the init pipe hears of it),
    ``before_unmount`` when a signal stops it (a writable overlay goes first)."""
    configure_logging(handlers)

    def live(conn: Connection) -> None:
        log.info("mounted %s at %s", flags.source, target)
        _after_init(target)
        if on_live is not None:
            threading.Thread(target=_then_notify, args=(on_live, notify), daemon=True).start()
        else:
            notify.send(b"s")

    with _blocked_signals():
        fd = mount_fuse(target, flags)
        _serve(Session(fd, make_fs(live), threads=threads), target, before_unmount)


def _then_notify(step: Callable[[], None], notify: InitPipe) -> None:
    # In a thread of its own: a step that uses the mount (overlayfs looks at its
    # lower layer) needs the serving threads free.
    try:
        step()
    except Exception as e:
        log.error("%s", e)
        notify.send(b"f")
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGTERM)
        return
    notify.send(b"s")


def serve_background(
    make_fs: MakeFS, target: str, flags: MountFlags, notify: InitPipe, threads: int,
    handler: logging.Handler | None,
) -> None:  # fmt: skip
    r, w = os.pipe()
    status = _StatusPipe(w)

    def live(conn: Connection) -> None:
        log.info("mounted %s at %s", flags.source, target)
        notify.send(b"s")
        status.send("ok")
        status.close()
        _after_init(target)

    with _blocked_signals():
        fd = mount_fuse(target, flags)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the daemon side, seen through the tests
            os.close(r)
            _daemon(make_fs, live, fd, target, handler, status, threads)
    # Parent: the daemon alone holds /dev/fuse from now on, so if it dies the kernel
    # aborts the connection instead of leaving readers waiting on us.
    status.close()
    os.close(fd)
    os.waitpid(pid, 0)  # the intermediate child exits at once
    try:
        error = _wait_ready(r)
    finally:
        os.close(r)
    if error is not None:
        force_unmount(target)
        raise MountError(error)


def _daemon(
    make_fs: MakeFS,
    live: Callable[[Connection], None],
    fd: int,
    target: str,
    handler: logging.Handler | None,
    status: _StatusPipe,
    threads: int,
) -> None:
    """In the forked child: detach, log to syslog or the file, serve, exit."""
    code = 1
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        status.send(f"pid {os.getpid()}")
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(devnull, std)
        os.close(devnull)
        configure_logging([handler])
        log.info("serving %s (pid %d)", target, os.getpid())
        _serve(Session(fd, make_fs(live), threads=threads), target)
        code = 0
    except BaseException as e:  # the daemon must never return into the CLI
        with contextlib.suppress(BaseException):
            log.exception("daemon failed")
            status.send(f"error {e}")
    finally:
        logging.shutdown()
        os._exit(code)


def _serve(session: Session, target: str, before_unmount: Callable[[], None] | None = None) -> None:
    """Serve until unmounted or signalled; always leave the mountpoint clean. Called
    with the stop signals blocked."""
    main = threading.get_ident()
    # The session may end (and say so) after a stop signal was taken: harmless then.
    signal.signal(_ENDED, lambda signum, frame: None)

    def ended() -> None:
        session.done.wait()
        signal.pthread_kill(main, _ENDED)

    session.start()
    threading.Thread(target=ended, name="puzzlefs-ended", daemon=True).start()
    signum = signal.sigwait((*_STOP, _ENDED))
    if signum != _ENDED:
        log.info("%s: unmounting %s", signal.Signals(signum).name, target)
        if before_unmount is not None:
            before_unmount()
        # Lazily: a busy mount is detached now and goes when its last user does.
        force_unmount(target)
        session.stop()
        # An idle mount ends its connection at once; a busy one is abandoned when
        # this process exits (its readers get ENOTCONN), as libfuse's daemons do.
        session.join(timeout=STOP_GRACE)
    else:
        session.join()
    log.info("unmounted %s", target)


def _after_init(target: str) -> None:
    _tune_readahead(target)


def _tune_readahead(target: str, kib: int = READAHEAD_KIB) -> None:
    """Let the kernel read ahead up to ``kib`` on this mount (128 KiB by default for
    FUSE, which the INIT reply can only lower): large sequential reads then come as
    1 MiB requests, a quarter of the round trips. Only root may; others keep 128."""
    entry = find_mount(target)
    if entry is None or not entry.device:
        return
    path = f"/sys/class/bdi/{entry.device}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{kib}\n")
    except OSError as e:
        log.debug("cannot raise readahead (%s): %s", path, e)


def _wait_ready(r: int) -> str | None:
    """None once the daemon says the mount is live, else why it is not."""
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    pid = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if pid is not None:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            return f"the mount daemon did not become ready within {READY_TIMEOUT:.0f} s"
        ready, _, _ = select.select([r], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(r, 4096)
        buf += chunk
        for line in buf.decode(errors="replace").splitlines():
            if line.startswith("pid "):
                pid = int(line[4:])
            elif line == "ok":
                return None
            elif line.startswith("error "):
                return f"the mount daemon failed: {line[6:]}"
        if not chunk:
            return "the mount daemon exited before the mount was ready"


def force_unmount(target: str) -> None:
    """Whatever happened, leave nothing mounted (lazily: a busy mount is detached)."""
    if find_mount(target) is None:
        return
    try:
        unmount(target, lazy=True)
    except MountError as e:
        log.error("%s", e)
