"""The mount daemon's syslog handler, against a real /dev/log socket (in a private
mount namespace, over a tmpfs /dev: root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import logging, os, socket
    from puzzlefs.mount.logs import SYSLOG_SOCKET, configure_logging, log_handler

    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(SYSLOG_SOCKET)
    server.settimeout(5)
    handler = log_handler(None, foreground=False)
    assert handler is not None
    configure_logging([handler])
    logging.getLogger("puzzlefs.test").warning("a chunk failed: %s", "EIO")
    logging.getLogger("puzzlefs.test").error("served no more")
    for _ in range(2):
        print(server.recv(4096).decode())
    if os.fork() == 0:  # the daemon logs after the fork: its own pid in the tag
        logging.getLogger("puzzlefs.test").info("child %d", os.getpid())
        os._exit(0)
    os.wait()
    print(server.recv(4096).decode())
    """
)


def _with_own_dev(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a private mount namespace over an empty tmpfs /dev."""
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs none /dev && exec "$0" -c "$1"', sys.executable, script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
def test_daemon_messages_reach_syslog_with_priority_and_pid() -> None:
    done = _with_own_dev(SCRIPT)
    lines = done.stdout.splitlines()
    pid = lines[0].split("[", 1)[1].split("]", 1)[0]
    # <facility daemon (3) * 8 + priority>: warning 4, error 3, info 6
    assert lines[0].startswith("<28>") and lines[0].endswith(
        f"puzzlefs[{pid}]: WARNING puzzlefs.test: a chunk failed: EIO"
    )
    assert lines[1].startswith("<27>") and lines[1].endswith("ERROR puzzlefs.test: served no more")
    child = lines[2].rsplit(" ", 1)[1]
    assert lines[2].startswith("<30>") and f"puzzlefs[{child}]:" in lines[2] and child != pid


def test_priorities_follow_the_levels() -> None:
    import logging
    import syslog

    from puzzlefs.mount.logs import SyslogHandler

    assert SyslogHandler.priority(logging.DEBUG) == syslog.LOG_DEBUG
    assert SyslogHandler.priority(logging.INFO) == syslog.LOG_INFO
    assert SyslogHandler.priority(logging.WARNING) == syslog.LOG_WARNING
    assert SyslogHandler.priority(logging.ERROR + 5) == syslog.LOG_ERR
    assert SyslogHandler.priority(logging.CRITICAL) == syslog.LOG_CRIT


DEAD = textwrap.dedent(
    """
    import socket
    from puzzlefs.mount.logs import SYSLOG_SOCKET, log_handler

    gone = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    gone.bind(SYSLOG_SOCKET)
    gone.close()  # the socket file stays; nobody listens
    print(log_handler(None, foreground=False))
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
def test_a_syslog_socket_nobody_listens_on_is_said_at_once() -> None:
    done = _with_own_dev(DEAD)
    assert done.stdout.strip() == "None"
    assert "no syslog at /dev/log" in done.stderr
