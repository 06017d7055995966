"""Progress lines: counters, and the share done with the time left where the total is
known; nothing at all when not on a terminal."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

from puzzlefs.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_share_and_time_left() -> None:
    out = Tty()
    p = Progress("building", stream=out)
    p.expect("bytes", 4_000_000)
    p._start -= 10  # as if it had run for ten seconds
    p.add("bytes", 1_000_000)
    line = p.line()
    assert line.startswith("building:  25% 1.0 MB of 4.0 MB")
    assert "about 30 s left" in line
    p.add("bytes", 3_000_000)
    assert "100%" in p.line() and "left" not in p.line()


def test_counters_without_a_total() -> None:
    p = Progress("verifying", stream=Tty())
    p.add("blobs", 3)
    assert p.line().startswith("verifying: 3 blobs (")


def test_silent_in_a_pipe(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1 << 20))
    done = subprocess.run(
        [sys.executable, "-m", "puzzlefs", "build", str(src), f"{tmp_path}/oci:t"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stderr == ""


def test_a_terminal_sees_the_share_done(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(30 << 20))
    assert (
        subprocess.run(
            [sys.executable, "-m", "puzzlefs", "build", str(src), f"{tmp_path}/oci:t"]
        ).returncode
        == 0
    )
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "puzzlefs", "extract", f"{tmp_path}/oci:t", str(tmp_path / "x")],
        stderr=child,
    )
    os.close(child)
    seen = b""
    while True:
        try:
            data = os.read(main, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        seen += data
    assert proc.wait(timeout=120) == 0
    os.close(main)
    text = seen.decode(errors="replace")
    assert "extracting:" in text and "% " in text and "MB of 125.8 MB" in text


def test_du_counts_tags_of_all(tmp_path: Path) -> None:
    from puzzlefs import build
    from puzzlefs.reader.usage import usage

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1000))
    for tag in ("a", "b", "c"):
        build(src, tmp_path / "oci", tag)
    p = Progress("measuring", stream=Tty())
    usage(tmp_path / "oci", progress=p)
    assert p.line().startswith("measuring: 100% 3 tags of 3 tags, 6 entries")
