"""Writable mounts: overlayfs over the image (-w: a temporary upper layer; -p: a kept
one), the mount-helper form, umount taking both layers down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fusehelp import TAG, assert_clean, build, cli, daemon_pids, mount_entry, wait_until


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    src = tmp_path_factory.mktemp("writable") / "rootfs"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "config").write_text("original\n")
    (src / "etc" / "gone").write_text("to be deleted\n")
    (src / "bin").mkdir()
    (src / "bin" / "tool").write_bytes(b"\x7fELF-ish")
    oci = tmp_path_factory.mktemp("writable-oci") / "oci"
    build(src, oci)
    return f"{oci}:{TAG}"


@pytest.fixture()
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    monkeypatch.setenv("PUZZLEFS_RUN_DIR", str(d))
    return d


def test_writable_mount(image: str, mountpoint: Path, run_dir: Path) -> None:
    done = cli("mount", "-w", image, mountpoint)
    assert done.returncode == 0, done.stderr
    entry = mount_entry(mountpoint)
    assert entry is not None and entry[0] == "overlay"
    (mountpoint / "etc" / "config").write_text("changed\n")  # a copy-up
    (mountpoint / "etc" / "gone").unlink()  # a whiteout in the upper layer
    (mountpoint / "new").write_text("new\n")
    (mountpoint / "newdir").mkdir()
    assert sorted(os.listdir(mountpoint / "etc")) == ["config"]
    assert (mountpoint / "etc" / "config").read_text() == "changed\n"
    (state,) = list(run_dir.iterdir())
    upper = state / "upper"
    assert (upper / "new").read_text() == "new\n"
    gone = os.lstat(upper / "etc" / "gone")  # overlayfs's whiteout: a 0:0 char device
    assert os.major(gone.st_rdev) == 0 and os.minor(gone.st_rdev) == 0
    done = cli("umount", mountpoint)
    assert done.returncode == 0, done.stderr
    assert_clean(mountpoint)
    assert list(run_dir.iterdir()) == []  # the temporary layers are gone
    assert not daemon_pids(state / "lower")


def test_persisted_changes_survive_remounts(
    image: str, mountpoint: Path, run_dir: Path, tmp_path: Path
) -> None:
    upper = tmp_path / "keep"
    for round_ in range(2):
        done = cli("mount", "-p", str(upper), image, mountpoint)
        assert done.returncode == 0, done.stderr
        if round_ == 0:
            (mountpoint / "etc" / "config").write_text("persisted\n")
            (mountpoint / "etc" / "gone").unlink()
        else:
            assert (mountpoint / "etc" / "config").read_text() == "persisted\n"
            assert not (mountpoint / "etc" / "gone").exists()
        assert cli("umount", mountpoint).returncode == 0
        assert_clean(mountpoint)
    assert (upper / "etc" / "config").read_text() == "persisted\n"
    assert list(run_dir.iterdir()) == []
    assert not (tmp_path / ".keep.puzzlefs-work").exists()


def test_the_mount_helper_form(image: str, mountpoint: Path, run_dir: Path, tmp_path: Path) -> None:
    """LXC's: `puzzlefs mount OCI_DIR:TAG -w WRITABLE_DIR MOUNTPOINT`."""
    writable = tmp_path / "w"
    done = cli("mount", image, "-w", str(writable), mountpoint)
    assert done.returncode == 0, done.stderr
    (mountpoint / "x").write_text("x")
    assert cli("umount", mountpoint).returncode == 0
    assert (writable / "x").read_text() == "x"
    assert_clean(mountpoint)


def test_foreground_writable(image: str, mountpoint: Path, run_dir: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "init"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "puzzlefs",
            "mount",
            "-f",
            "-w",
            "-i",
            str(fifo),
            image,
            str(mountpoint),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert fifo.read_bytes() == b"s"
        (mountpoint / "etc" / "config").write_text("fg\n")
        assert (mountpoint / "etc" / "config").read_text() == "fg\n"
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert wait_until(lambda: mount_entry(mountpoint) is None)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_umount_of_a_busy_writable_mount_changes_nothing(
    image: str, mountpoint: Path, run_dir: Path
) -> None:
    assert cli("mount", "-w", image, mountpoint).returncode == 0
    f = open(mountpoint / "etc" / "config")  # noqa: SIM115
    try:
        done = cli("umount", mountpoint)
        assert done.returncode != 0 and "busy" in done.stderr
        assert mount_entry(mountpoint) is not None and f.read() == "original\n"
    finally:
        f.close()
    assert cli("umount", mountpoint).returncode == 0
    assert_clean(mountpoint)


def test_writable_needs_root_and_overlayfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused with one clear reason, before anything is mounted or made."""
    from puzzlefs.errors import MountError
    from puzzlefs.mount import overlay

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(MountError, match="needs root"):
        overlay.prepare(None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(overlay, "_has_overlayfs", lambda: False)
    with pytest.raises(MountError, match="overlayfs is not available"):
        overlay.prepare(None)
