"""Mounting and unmounting: readiness, failures that leave nothing behind, signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fusehelp import (
    TAG,
    MountFn,
    assert_clean,
    cli,
    daemon_pids,
    mount_entry,
    wait_until,
)

from puzzlefs.oci import ImageLayout


def _one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if not x.startswith("warning:")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], done.stderr


def test_unknown_tag(all_types_images: dict[str, str], mountpoint: Path) -> None:
    oci = all_types_images["plain"].rsplit(":", 1)[0]
    done = cli("mount", f"{oci}:no-such-tag", mountpoint)
    _one_line_error(done, "no-such-tag")
    assert_clean(mountpoint)


def test_missing_mountpoint(all_types_images: dict[str, str], tmp_path: Path) -> None:
    done = cli("mount", all_types_images["plain"], tmp_path / "absent")
    _one_line_error(done, "does not exist")
    assert not (tmp_path / "absent").exists()


def test_mountpoint_that_is_a_file(all_types_images: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    _one_line_error(cli("mount", all_types_images["plain"], tmp_path / "file"), "not a directory")


def test_non_empty_mountpoint(all_types_images: dict[str, str], mountpoint: Path) -> None:
    (mountpoint / "something").write_bytes(b"x")
    done = cli("mount", all_types_images["plain"], mountpoint)
    _one_line_error(done, "not empty")
    assert mount_entry(mountpoint) is None
    assert os.listdir(mountpoint) == ["something"]
    # and -o nonempty mounts over it on purpose
    done = cli("mount", "-o", "nonempty", all_types_images["plain"], mountpoint)
    assert done.returncode == 0, done.stderr
    assert (mountpoint / "one").read_bytes() == b"x"
    assert cli("umount", mountpoint).returncode == 0
    assert_clean(mountpoint)


def test_already_mounted_mountpoint(all_types_images: dict[str, str], mount: MountFn) -> None:
    with mount(all_types_images["plain"]) as m:
        done = cli("mount", all_types_images["zstd"], m.path)
        _one_line_error(done, "already a mount point")
        # the first mount is untouched, and only one daemon serves it
        assert (m.path / "one").read_bytes() == b"x"
        assert len(daemon_pids(m.path)) == 1


def test_corrupt_rootfs(all_types_tree: Path, tmp_path: Path, mountpoint: Path) -> None:
    from fusehelp import build

    oci = tmp_path / "oci"
    build(all_types_tree, oci)
    layout = ImageLayout(oci)
    rootfs = layout.read_manifest(TAG)[2].rootfs.digest
    path = oci / "blobs" / "sha256" / rootfs.hex
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    done = cli("mount", f"{oci}:{TAG}", mountpoint)
    _one_line_error(done, rootfs.hex)
    assert_clean(mountpoint)


def test_bad_digest_argument(all_types_images: dict[str, str], mountpoint: Path) -> None:
    done = cli("mount", "--digest", "xyz", all_types_images["plain"], mountpoint)
    assert done.returncode == 2
    _one_line_error(done, "64 hex digits")
    assert_clean(mountpoint)


def test_read_write_option_is_refused(all_types_images: dict[str, str], mountpoint: Path) -> None:
    _one_line_error(cli("mount", "-o", "rw", all_types_images["plain"], mountpoint), "read-only")
    assert_clean(mountpoint)


def test_unknown_fuse_option(all_types_images: dict[str, str], mountpoint: Path) -> None:
    done = cli("mount", "-o", "no_such_option", all_types_images["plain"], mountpoint)
    _one_line_error(done, "no_such_option")
    assert_clean(mountpoint)


@pytest.mark.parametrize("kind", ["plain", "zstd"])
def test_only_a_compressed_image_loads_zstd(
    all_types_images: dict[str, str], all_types_tree: Path, mount: MountFn, kind: str
) -> None:
    """The daemon of a plain image never loads the codec (from a cold cache, about
    15 ms that the first reads of a container would wait for)."""
    with mount(all_types_images[kind]) as m:
        read = 0
        for path in sorted(all_types_tree.rglob("*")):
            if path.is_file() and not path.is_symlink():
                rel = path.relative_to(all_types_tree)
                assert (m.path / rel).read_bytes() == path.read_bytes()
                read += 1
        assert read
        maps = Path(f"/proc/{daemon_pids(m.path)[0]}/maps").read_text()
        assert ("zstandard" in maps) == (kind == "zstd")


def test_umount_leaves_the_mountpoint_clean(
    all_types_images: dict[str, str], mountpoint: Path
) -> None:
    done = cli("mount", all_types_images["plain"], mountpoint)
    assert done.returncode == 0, done.stderr
    assert daemon_pids(mountpoint)
    done = cli("umount", mountpoint)
    assert done.returncode == 0, done.stderr
    assert_clean(mountpoint)
    assert os.listdir(mountpoint) == []


def test_sigterm_to_the_daemon_unmounts(all_types_images: dict[str, str], mountpoint: Path) -> None:
    done = cli("mount", all_types_images["zstd"], mountpoint)
    assert done.returncode == 0, done.stderr
    pids = daemon_pids(mountpoint)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGTERM)
    assert wait_until(lambda: mount_entry(mountpoint) is None)
    assert_clean(mountpoint)


def test_sigterm_with_a_file_open(all_types_images: dict[str, str], mountpoint: Path) -> None:
    """A busy mount is detached (lazily): the mountpoint is clean at once."""
    done = cli("mount", all_types_images["plain"], mountpoint)
    assert done.returncode == 0, done.stderr
    fd = os.open(mountpoint / "text", os.O_RDONLY)
    try:
        os.kill(daemon_pids(mountpoint)[0], signal.SIGTERM)
        assert wait_until(lambda: mount_entry(mountpoint) is None)
        assert_clean(mountpoint)
    finally:
        with contextlib.suppress(OSError):  # the connection is gone: ENOTCONN
            os.close(fd)


def test_umount_refuses_what_is_not_puzzlefs(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    _one_line_error(cli("umount", plain), "not a mount point")
    other = tmp_path / "tmpfs"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(other)], check=True)
    try:
        _one_line_error(cli("umount", other), "not a puzzlefs mount", "tmpfs")
        assert mount_entry(other) is not None
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_umount_cleans_a_dead_daemons_mount(
    all_types_images: dict[str, str], mountpoint: Path
) -> None:
    done = cli("mount", all_types_images["plain"], mountpoint)
    assert done.returncode == 0, done.stderr
    os.kill(daemon_pids(mountpoint)[0], signal.SIGKILL)
    assert wait_until(lambda: not daemon_pids(mountpoint))
    with pytest.raises(OSError):  # "Transport endpoint is not connected"
        os.listdir(mountpoint)
    # mounting there says what is wrong; umount repairs it
    _one_line_error(cli("mount", all_types_images["plain"], mountpoint), "umount")
    done = cli("umount", mountpoint)
    assert done.returncode == 0, done.stderr
    assert_clean(mountpoint)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_foreground_and_init_pipe(
    all_types_images: dict[str, str], mountpoint: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    fifo = tmp_path / "init"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "puzzlefs", "mount", "-f", "-i", str(fifo)]
        + [all_types_images["plain"], str(mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
        reader.start()
        reader.join(timeout=30)
        assert got == [b"s"]
        assert (mountpoint / "one").read_bytes() == b"x"
        assert proc.poll() is None  # still serving
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "unmounted" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert_clean(mountpoint)


def test_init_pipe_reports_failure(all_types_images: dict[str, str], tmp_path: Path) -> None:
    fifo = tmp_path / "init"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    done = cli("mount", "-f", "-i", fifo, all_types_images["plain"], tmp_path / "absent")
    reader.join(timeout=30)
    assert done.returncode != 0
    assert got == [b"f"]
