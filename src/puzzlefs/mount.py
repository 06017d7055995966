"""Mounting and unmounting: everything around the FUSE adapter that is about processes.

``mount`` checks everything it can before the filesystem goes live (the mountpoint,
the image, the fs-verity chain, the options) so that errors reach the user's terminal
as one line. It then mounts in the calling process (libfuse's complaints are captured
and become the error message) and, unless told to stay in the foreground, forks a
daemon that serves requests. The parent waits on a pipe until the daemon has answered
the kernel's INIT request: it returns only once the mount is live, and if the daemon
dies or stalls first, it unmounts and fails. Nothing is left mounted after a failure.

The daemon (and ``-f``) unmount cleanly on SIGTERM, SIGINT and SIGHUP. An unmount from
outside (``puzzlefs umount``, ``fusermount3 -u``, ``umount``) ends the daemon.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import logging.handlers
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from puzzlefs.errors import MountError, UsageError
from puzzlefs.reader import Image, open_image

if TYPE_CHECKING:
    import pyfuse3

__all__ = [
    "MountInfo",
    "find_mount",
    "fuse_options",
    "mount",
    "umount",
]

log = logging.getLogger(__name__)

FSTYPE = "fuse.puzzlefs"
SUBTYPE = "puzzlefs"
READAHEAD_KIB = 1024
READY_TIMEOUT = 30.0  # seconds the parent waits for the daemon before giving up
SYSLOG_SOCKET = "/dev/log"
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_REFUSED = {"rw": "puzzlefs mounts are read-only; -o rw is not supported"}
_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


# -- /proc/self/mountinfo -----------------------------------------------------------
@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    fstype: str
    source: str
    device: str = ""  # "major:minor", as /sys/class/bdi names it

    @property
    def is_puzzlefs(self) -> bool:
        if self.fstype == FSTYPE:
            return True
        # A puzzlefs mount whose subtype was overridden with -o: its source is still
        # OCI_DIR:TAG unless fsname= was overridden too.
        if not self.fstype.startswith("fuse"):
            return False
        oci_dir, sep, _ = self.source.rpartition(":")
        return bool(sep) and (Path(oci_dir) / "oci-layout").is_file()


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts() -> Iterator[MountInfo]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
                yield MountInfo(
                    _unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2]), fields[2]
                )
            except (ValueError, IndexError):
                continue


def find_mount(path: str | os.PathLike[str]) -> MountInfo | None:
    """The topmost mount at exactly ``path``, or None."""
    target = _canonical(path)
    found = None
    for m in _mounts():
        if m.mountpoint == target:
            found = m  # later lines are mounted on top of earlier ones
    return found


def _canonical(path: str | os.PathLike[str]) -> str:
    # Resolve symlinks in the parent only: the mountpoint itself may be a dead FUSE
    # mount that cannot be stat'ed.
    p = Path(os.path.abspath(path))
    return str(Path(os.path.realpath(p.parent)) / p.name) if p.name else str(p)


# -- options ------------------------------------------------------------------------
def fuse_options(
    user: Iterable[str], oci_dir: str | os.PathLike[str], tag: str
) -> tuple[set[str], bool]:
    """The FUSE options for a mount, and whether a non-empty mountpoint is allowed.

    Defaults: ``ro``, ``default_permissions``, ``fsname=OCI_DIR:TAG``,
    ``subtype=puzzlefs``. ``-o`` options are added (``fsname=``/``subtype=`` replace
    the default); ``nonempty`` is ours (libfuse 3 dropped it); ``rw`` is refused.
    """
    fsname = _option_value(f"{os.path.abspath(oci_dir)}:{tag}")
    opts = {"ro", "default_permissions", f"subtype={SUBTYPE}"}
    named = {"fsname": f"fsname={fsname}"}
    nonempty = False
    for group in user:
        for opt in _split_options(group):
            if not opt:
                continue
            if opt in _REFUSED:
                raise UsageError(_REFUSED[opt])
            if opt == "nonempty":
                nonempty = True
            elif opt.startswith("fsname="):
                named["fsname"] = "fsname=" + _option_value(opt[7:])
            elif opt.startswith("subtype="):
                opts.discard(f"subtype={SUBTYPE}")
                opts.add(opt)
            else:
                try:
                    opt.encode("ascii")
                except UnicodeEncodeError:
                    raise UsageError(f"FUSE options must be ASCII: {opt!r}") from None
                opts.add(opt)
    opts.update(named.values())
    return opts, nonempty


def _split_options(group: str) -> list[str]:
    # Split at commas not escaped with a backslash (libfuse's own convention).
    out, cur, i = [], [], 0
    while i < len(group):
        c = group[i]
        if c == "\\" and i + 1 < len(group):
            cur.append(group[i : i + 2])
            i += 2
            continue
        if c == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _option_value(text: str) -> str:
    # pyfuse3 passes options as ASCII; libfuse splits at unescaped commas.
    ascii_text = text.encode("ascii", "backslashreplace").decode("ascii")
    return ascii_text.replace("\\", "\\\\").replace(",", "\\,") if "," in text else ascii_text


# -- mountpoint checks -------------------------------------------------------------
def check_mountpoint(path: str | os.PathLike[str], *, allow_nonempty: bool = False) -> str:
    """The absolute mountpoint, after refusing anything a mount must not go onto."""
    p = _canonical(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise MountError(f"mountpoint {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(
                f"mountpoint {path} is a dead FUSE mount (transport endpoint is not "
                f"connected); clean it with: puzzlefs umount {path}"
            ) from None
        raise MountError(f"mountpoint {path}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mountpoint {path} is not a directory")
    existing = find_mount(p)
    if existing is not None:
        raise MountError(
            f"mountpoint {path} is already a mount point ({existing.fstype} from "
            f"{existing.source}); unmount it first"
        )
    if not allow_nonempty:
        try:
            with os.scandir(p) as it:
                nonempty = any(True for _ in it)
        except OSError as e:
            raise MountError(f"mountpoint {path}: {e.strerror}") from None
        if nonempty:
            raise MountError(f"mountpoint {path} is not empty (-o nonempty mounts over it)")
    return p


# -- mount -----------------------------------------------------------------------
def mount(
    oci_dir: str | os.PathLike[str],
    tag: str,
    mountpoint: str | os.PathLike[str],
    *,
    verity_digest: str | None = None,
    options: Iterable[str] = (),
    foreground: bool = False,
    init_pipe: str | None = None,
    log_file: str | None = None,
) -> None:
    """Mount ``oci_dir:tag`` read-only at ``mountpoint``.

    The image is opened (and with ``verity_digest``, its manifest and rootfs checked
    against the fs-verity chain) before anything is mounted. Background (default):
    returns once the mount is live; the daemon logs to syslog, or to ``log_file``.
    Foreground: serves until unmounted or signalled, logging to stderr (and to
    ``log_file`` if given). ``init_pipe``: a FIFO (or file) that gets ``s`` once the
    mount is live, ``f`` if it failed, as the reference writes. Raises a
    :class:`~puzzlefs.errors.PuzzleFSError` (nothing left mounted) on failure.
    """
    notify = _InitPipe(init_pipe)
    try:
        opts, nonempty = fuse_options(options, oci_dir, tag)
        target = check_mountpoint(mountpoint, allow_nonempty=nonempty)
        # Absolute: the daemon changes to / and must still find the blobs.
        image = open_image(Path(os.path.abspath(oci_dir)), tag, verity_digest=verity_digest)
        # Decode the root now: a rootfs whose root is broken fails here, not in the kernel.
        image.attr(image.root)
        handler = _log_handler(log_file, foreground)
        if foreground:
            _configure_logging([handler, _stderr_handler()])
            _serve_foreground(image, target, opts, notify)
        else:
            _serve_background(image, target, opts, notify, handler)
    except BaseException:
        notify.send(b"f")
        raise
    finally:
        notify.close()


def _serve_foreground(image: Image, target: str, opts: set[str], notify: _InitPipe) -> None:
    from puzzlefs.fuse import PuzzleFS

    def live() -> None:
        log.info("mounted %s:%s at %s", image.layout.path, image.tag, target)
        notify.send(b"s")
        _after_init(image, target)

    ready = _Ready(live)
    ops = PuzzleFS(image, on_ready=ready.init_received)
    with _blocked_signals():
        _fuse_init(ops, target, opts)
        _run(target, ready)


def _serve_background(
    image: Image,
    target: str,
    opts: set[str],
    notify: _InitPipe,
    handler: logging.Handler | None,
) -> None:
    from puzzlefs.fuse import PuzzleFS

    r, w = os.pipe()
    status = _StatusPipe(w)

    def live() -> None:
        log.info("mounted %s:%s at %s", image.layout.path, image.tag, target)
        notify.send(b"s")
        status.send("ok")
        status.close()
        _after_init(image, target)

    ready = _Ready(live)
    ops = PuzzleFS(image, on_ready=ready.init_received)
    with _blocked_signals():
        _fuse_init(ops, target, opts)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the daemon side, seen through the tests
            os.close(r)
            _daemon(target, handler, status, ready)
    # Parent: the daemon alone holds /dev/fuse from now on, so if it dies the kernel
    # aborts the connection instead of leaving readers waiting on us.
    status.close()
    _close_fuse_fds()
    os.waitpid(pid, 0)  # the intermediate child exits at once
    try:
        error = _wait_ready(r)
    finally:
        os.close(r)
    if error is not None:
        _force_unmount(target)
        raise MountError(error)


class _Ready:
    """The kernel's INIT request arrives in the adapter (``init_received``); ``live``
    runs in the loop once it has been answered, when the mount really is live."""

    def __init__(self, live: Callable[[], None]) -> None:
        self.live = live
        self.event: Any = None  # a trio.Event, made inside the loop

    def init_received(self) -> None:
        if self.event is not None:
            self.event.set()


def _after_init(image: Image, target: str) -> None:
    _tune_readahead(target)
    image.enable_readahead()
    _warm_up(image)


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


def _warm_up(image: Image) -> None:
    """Let a thread decode what the first requests will need while the kernel is still
    getting ready to send them (a walk of the whole tree, on large images seconds)."""

    def run() -> None:
        try:
            image.warm_up()
        except Exception as e:  # the request that needs it reports it again
            log.warning("warming up the image failed: %s", e)

    threading.Thread(target=run, name="puzzlefs-warm-up", daemon=True).start()


def _daemon(
    target: str, handler: logging.Handler | None, status: _StatusPipe, ready: _Ready
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
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        _configure_logging([handler])
        log.info("serving %s (pid %d)", target, os.getpid())
        _run(target, ready)
        code = 0
    except BaseException as e:  # the daemon must never return into the CLI
        with contextlib.suppress(BaseException):
            log.exception("daemon failed")
            status.send(f"error {e}")
    finally:
        logging.shutdown()
        os._exit(code)


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


def _run(target: str, ready: _Ready) -> None:
    """Serve until unmounted or signalled; always leave the mountpoint clean."""
    import pyfuse3
    import trio

    async def when_live() -> None:
        await ready.event.wait()
        ready.live()

    async def serve() -> None:
        ready.event = trio.Event()
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            # Signals that arrived while blocked are delivered now, to the receiver.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        log.info("%s: unmounting %s", signal.Signals(signum).name, target)
                        pyfuse3.terminate()
                        return

                nursery.start_soon(watch)
                nursery.start_soon(when_live)
                # One task: no handler awaits anything (see puzzlefs.fuse), so more
                # tasks cannot overlap requests and only add trio scheduling to each
                # (a cold `find` of 3k entries: median 0.143 s with pyfuse3's default
                # of up to 99 tasks, 0.122 s with one; 9 runs each, noisy machine).
                await pyfuse3.main(min_tasks=1, max_tasks=1)
                nursery.cancel_scope.cancel()

    try:
        trio.run(serve)
    finally:
        # Unmounts unless the kernel already did (an unmount from outside).
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", target)


@contextlib.contextmanager
def _blocked_signals() -> Iterator[None]:
    """Hold SIGTERM/SIGINT/SIGHUP from mount until the serving loop listens for them,
    so a signal in between cannot kill us with the filesystem mounted."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fuse_init(ops: pyfuse3.Operations, target: str, opts: set[str]) -> None:
    """pyfuse3.init (the mount itself), with libfuse's stderr captured into the error."""
    import pyfuse3

    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            pyfuse3.init(ops, target, opts)
            failure = None
        except (RuntimeError, OSError) as e:
            failure = e
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        said = " ".join(captured.read().decode(errors="replace").split())
    if failure is not None:
        reason = said.removeprefix("fuse: ") or str(failure)
        raise MountError(f"cannot mount at {target}: {reason}")
    if said:
        log.warning("libfuse: %s", said)


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


def _close_fuse_fds() -> None:
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                os.close(int(name))


class _InitPipe:
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


# -- logging ---------------------------------------------------------------------
def _log_handler(log_file: str | None, foreground: bool) -> logging.Handler | None:
    """Opened before forking, so that a bad log file or a missing syslog is reported
    on the terminal."""
    if log_file is not None:
        try:
            h: logging.Handler = logging.FileHandler(log_file)
        except OSError as e:
            raise MountError(f"log file {log_file}: {e.strerror}") from None
        h.setFormatter(logging.Formatter("%(asctime)s puzzlefs[%(process)d] " + _LOG_FORMAT))
        return h
    if foreground:
        return None
    try:
        if not stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode):
            raise OSError(errno.ENOTSOCK, "not a socket")
        sh = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
    except OSError:
        print(
            f"warning: no syslog at {SYSLOG_SOCKET}: the mount daemon's messages are "
            "discarded (use --log-file FILE to keep them)",
            file=sys.stderr,
        )
        return None
    sh.ident = "puzzlefs: "
    sh.setFormatter(logging.Formatter(_LOG_FORMAT))
    return sh


def _stderr_handler() -> logging.Handler:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("puzzlefs: " + _LOG_FORMAT))
    return h


def _configure_logging(handlers: Iterable[logging.Handler | None]) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for new in handlers:
        if new is not None:
            root.addHandler(new)
    root.setLevel(logging.DEBUG if os.environ.get("PUZZLEFS_DEBUG") else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)


# -- umount ---------------------------------------------------------------------
def umount(mountpoint: str | os.PathLike[str]) -> None:
    """Unmount a puzzlefs mount; refuse anything else."""
    info = find_mount(mountpoint)
    if info is None:
        raise MountError(f"{mountpoint} is not a mount point")
    if not info.is_puzzlefs:
        raise MountError(
            f"{mountpoint} is not a puzzlefs mount (it is {info.fstype} from {info.source})"
        )
    _unmount(info.mountpoint, lazy=False)


def _unmount(target: str, *, lazy: bool) -> None:
    if os.geteuid() == 0:
        flags = 2 if lazy else 0  # MNT_DETACH
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.umount2(os.fsencode(target), flags) != 0:
            err = ctypes.get_errno()
            if err == errno.EBUSY:
                raise MountError(f"{target} is busy (a process is using it)")
            raise MountError(f"cannot unmount {target}: {os.strerror(err)}")
        return
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        raise MountError("fusermount3 not found (Debian: apt install fuse3)")
    cmd = [fusermount, "-u", *(["-z"] if lazy else []), "--", target]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = " ".join(done.stderr.split()) or f"{fusermount} failed"
        raise MountError(f"cannot unmount {target}: {said.removeprefix(fusermount + ': ')}")


def _force_unmount(target: str) -> None:
    """After a failed start: whatever happened, leave nothing mounted."""
    if find_mount(target) is None:
        return
    try:
        _unmount(target, lazy=True)
    except MountError as e:
        log.error("%s", e)
