"""Where the mount daemon's messages go: syslog, a file, or (foreground) stderr."""

from __future__ import annotations

import errno
import logging
import os
import stat
import sys
import syslog
from collections.abc import Iterable

from puzzlefs.errors import MountError

__all__ = ["configure_logging", "log_handler", "stderr_handler"]

SYSLOG_SOCKET = "/dev/log"
_FORMAT = "%(levelname)s %(name)s: %(message)s"


def log_handler(log_file: str | None, foreground: bool) -> logging.Handler | None:
    """Opened before forking, so that a bad log file or a missing syslog is reported
    on the terminal."""
    if log_file is not None:
        try:
            h: logging.Handler = logging.FileHandler(log_file)
        except OSError as e:
            raise MountError(f"log file {log_file}: {e.strerror}") from None
        h.setFormatter(logging.Formatter("%(asctime)s puzzlefs[%(process)d] " + _FORMAT))
        return h
    if foreground:
        return None
    import socket  # (not logging.handlers: socket is the one part of it needed)

    try:
        if not stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode):
            raise OSError(errno.ENOTSOCK, "not a socket")
        # The C library connects on the first message and drops them all if nobody
        # listens: find out now, while the terminal can still be told.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(SYSLOG_SOCKET)
    except OSError:
        print(
            f"warning: no syslog at {SYSLOG_SOCKET}: the mount daemon's messages are "
            "discarded (use --log-file FILE to keep them)",
            file=sys.stderr,
        )
        return None
    sh = SyslogHandler()
    sh.setFormatter(logging.Formatter(_FORMAT))
    return sh


class SyslogHandler(logging.Handler):
    """To syslog through the C library (the ``syslog`` module, not logging.handlers,
    which imports socket, pickle and more into every mount's start): facility daemon,
    tagged ``puzzlefs[PID]``, the connection opened by the first message, in the
    process that logs (the daemon, after the fork)."""

    _PRIORITIES = (
        (logging.CRITICAL, syslog.LOG_CRIT),
        (logging.ERROR, syslog.LOG_ERR),
        (logging.WARNING, syslog.LOG_WARNING),
        (logging.INFO, syslog.LOG_INFO),
    )

    def __init__(self) -> None:
        super().__init__()
        self._opened_in: int | None = None  # the pid that called openlog

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if self._opened_in != os.getpid():
                syslog.openlog("puzzlefs", syslog.LOG_PID, syslog.LOG_DAEMON)
                self._opened_in = os.getpid()
            syslog.syslog(self.priority(record.levelno), message)
        except Exception:
            self.handleError(record)

    @classmethod
    def priority(cls, level: int) -> int:
        return next((p for at, p in cls._PRIORITIES if level >= at), syslog.LOG_DEBUG)


def stderr_handler() -> logging.Handler:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("puzzlefs: " + _FORMAT))
    return h


def configure_logging(handlers: Iterable[logging.Handler | None]) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for new in handlers:
        if new is not None:
            root.addHandler(new)
    root.setLevel(logging.DEBUG if os.environ.get("PUZZLEFS_DEBUG") else logging.INFO)
