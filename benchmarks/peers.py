"""Images and the ways the mount benchmark serves them: puzzlefs and its peers.

An :class:`ImageSet` is one source tree built every way the benchmark needs, each
image made once and cached in its own directory (``WORKDIR/images/KEY``):

    puzzlefs build TREE oci-plain:bench             (and -c into oci-zstd)
    mksquashfs TREE tree.sqfs -comp zstd -noappend -quiet
    mkfs.erofs -zlz4hc tree.erofs TREE              (erofs-utils 1.5 has lz4 and lz4hc)

A :class:`Server` mounts one image one way and knows its daemon: every FUSE server is
mounted with ``-o dev,suid`` (libfuse's default for root is nosuid,nodev; the kernel
mounts allow both, and chroot'ed programs open ``/dev/null``). :class:`Mounts` owns
the mountpoints, finds each FUSE mount's daemon (the processes holding /dev/fuse whose
command line names the mountpoint, else the ones that appeared with the mount), and
on any exit, Ctrl-C included, unmounts whatever is still mounted under its root and
detaches every loop device backed by an image under the work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ImageSet",
    "Mounts",
    "Server",
    "daemon_memory",
    "fuse_daemons",
    "puzzlefs_command",
]

TAG = "bench"
FUSE_OPTIONS = "dev,suid"


def sh(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run, and fail with the command's own words."""
    done = subprocess.run(cmd, text=True, capture_output=True, check=False)
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[:600]
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {said}")
    return done


def puzzlefs_command(given: str | None = None) -> list[str]:
    """The puzzlefs command line: ``given`` (split as the shell would, e.g. ``python3 -m
    puzzlefs``), else the installed console script beside this interpreter (no pyenv or
    venv shim in the timings), else the first on PATH."""
    if given:
        return shlex.split(given)
    beside = Path(sys.executable).with_name("puzzlefs")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("puzzlefs")
    if found is None:
        raise SystemExit("puzzlefs not found (pip install the project)")
    return [found]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- images ----------------------------------------------------------------------------
@dataclass
class ImageSet:
    tree: Path
    dir: Path  # WORKDIR/images/KEY
    puzzlefs: list[str]
    # The puzzlefs images remember which puzzlefs built them (command and --version)
    # and are built again by another one, or by any with ``rebuild``.
    identity: str = ""
    rebuild: bool = False
    commands: list[str] = field(default_factory=list)
    _fresh: set[str] = field(default_factory=set)  # built by this run

    def _stamp(self, name: str) -> Path:
        return self.dir / f"{name}.done"

    def _built(self, name: str, cmd: list[str], after: Callable[[str], str] | None = None) -> str:
        """Run ``cmd`` unless ``name`` was built before (by the same puzzlefs, for its
        images); ``after`` gets its output and returns a note kept in the stamp."""
        if " ".join(cmd) not in self.commands:
            self.commands.append(" ".join(cmd))
        stamp = self.dir / f"{name}.done"
        built_by = self.identity if name.startswith("oci-") else ""
        if stamp.exists():
            by, _, note = stamp.read_text().partition("\n")
            forced = self.rebuild and built_by and name not in self._fresh
            if by == built_by and not forced:
                return note.strip()
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir / name, ignore_errors=True)
        t = time.perf_counter()
        out = sh(cmd).stdout
        note = after(out) if after else ""
        stamp.write_text(f"{built_by}\n{note}\n")
        self._fresh.add(name)
        _log(f"built {self.dir.name}/{name} in {time.perf_counter() - t:.1f} s")
        return note

    def oci(self, compressed: bool) -> tuple[str, str]:
        """(``OCI_DIR:TAG``, manifest fs-verity digest) of the puzzlefs image."""
        name = "oci-zstd" if compressed else "oci-plain"
        oci = self.dir / name
        flags = ["-c"] if compressed else []
        cmd = [*self.puzzlefs, "build", *flags, str(self.tree), f"{oci}:{TAG}"]

        def after(out: str) -> str:
            m = re.search(r"manifest digest: ([0-9a-f]{64})", out)
            if not m:
                raise RuntimeError(f"puzzlefs build printed no digest: {out!r}")
            if not compressed:
                # A copy that is never mounted: first mounts mount copies of it, so
                # that anything a mount leaves beside its image is not there for them.
                pristine = self.pristine()
                shutil.rmtree(pristine, ignore_errors=True)
                sh(["cp", "-a", str(oci), str(pristine)])
            return m.group(1)

        return f"{oci}:{TAG}", self._built(name, cmd, after)

    def pristine(self) -> Path:
        """The never-mounted copy of the plain image (made when it is built)."""
        return self.dir / "oci-plain.pristine"

    def squashfs(self) -> Path:
        img = self.dir / "tree.sqfs"
        cmd = ["mksquashfs", str(self.tree), str(img), "-comp", "zstd", "-noappend", "-quiet"]
        self._built("tree.sqfs", cmd)
        return img

    def erofs(self) -> Path:
        img = self.dir / "tree.erofs"
        cmd = ["mkfs.erofs", "-zlz4hc", "--quiet", str(img), str(self.tree)]
        self._built("tree.erofs", cmd)
        return img

    def sizes(self) -> dict[str, int]:
        """Stored bytes of each image built so far."""
        out = {}
        for name in ("oci-plain", "oci-zstd"):
            if (self.dir / name).is_dir():
                out[name] = sum(
                    f.stat().st_size for f in (self.dir / name).rglob("*") if f.is_file()
                )
        for name in ("tree.sqfs", "tree.erofs"):
            if (self.dir / name).exists():
                out[name] = (self.dir / name).stat().st_size
        return out


# -- daemons ---------------------------------------------------------------------------
def _fuse_holders() -> set[int]:
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                        pids.add(int(pid))
                        break
    return pids


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def fuse_daemons(mountpoint: Path, before: set[int]) -> list[int]:
    """The processes serving a FUSE mount: holders of /dev/fuse naming the mountpoint on
    their command line, else those that hold /dev/fuse now and did not ``before``."""
    holders = _fuse_holders()
    target = os.fsencode(mountpoint)
    named = [p for p in holders if any(a.rstrip(b"/") == target for a in _cmdline(p))]
    return sorted(named or (holders - before))


def daemon_memory(pids: list[int]) -> dict[str, int] | None:
    """VmRSS, RssAnon (the daemon's own memory; the rest of VmRSS is mapped image files
    the kernel may drop) and VmHWM (the peak), in KiB, summed over the processes."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "VmHWM": "hwm"}
    out = dict.fromkeys(keys.values(), 0)
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in keys:
                out[keys[name]] += int(value.split()[0])
    return out if pids else None


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for pid in pids:
        while Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "Z":
                    break
            if time.monotonic() > deadline:
                _log(f"warning: daemon {pid} still alive {timeout:.0f} s after its unmount; killed")
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)


# -- servers ---------------------------------------------------------------------------
@dataclass
class Server:
    """One image served one way: ``mount_cmd`` is what gets timed."""

    name: str
    fuse: bool
    mount_cmd: list[str]  # with MNT where the mountpoint goes
    unmount_cmd: list[str]
    prepare: Callable[[], None] | None = None  # before each mount, untimed
    finish: Callable[[], None] | None = None  # after each unmount
    ready: Callable[[Path], None] | None = None  # waits for a foreground server
    popen: bool = False  # mount_cmd stays in the foreground (fuse_floor.py)

    def command(self) -> str:
        return " ".join(self.mount_cmd)

    def argv(self, mnt: Path, which: list[str]) -> list[str]:
        return [str(mnt) if a == "MNT" else a for a in which]


def puzzlefs_server(name: str, puzzlefs: list[str], ref: str, *extra: str) -> Server:
    return Server(
        name,
        True,
        [*puzzlefs, "mount", "-o", FUSE_OPTIONS, *extra, ref, "MNT"],
        [*puzzlefs, "umount", "MNT"],
    )


def first_mount_server(name: str, puzzlefs: list[str], pristine: Path) -> Server:
    """``puzzlefs mount`` of a new hard-linked copy of a never-mounted image each time
    (its first mount). Its index goes to a directory of
    its own, emptied each time: the copy has the image's rootfs, so an index it built
    where the other mounts keep theirs would replace the one they have checked, and
    send each of them through the full check of a changed index."""
    copy = pristine.with_name("oci-first-mount")
    index = pristine.with_name("index-first-mount")

    def prepare() -> None:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(index, ignore_errors=True)
        sh(["cp", "-al", str(pristine), str(copy)])

    def finish() -> None:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(index, ignore_errors=True)

    server = puzzlefs_server(
        name, ["env", f"PUZZLEFS_INDEX_DIR={index}", *puzzlefs], f"{copy}:{TAG}"
    )
    server.prepare = prepare
    server.finish = finish
    return server


def floor_server(tree: Path, counts: Path | None = None) -> Server:
    script = Path(__file__).with_name("fuse_floor.py")
    extra = ["--counts", str(counts)] if counts else []
    return Server(
        "pyfuse3 floor",
        True,
        [sys.executable, str(script), str(tree), "MNT", *extra],
        ["fusermount3", "-u", "MNT"],
        popen=True,
    )


def squashfuse_server(img: Path) -> Server:
    return Server(
        "squashfuse_ll",
        True,
        ["squashfuse_ll", "-o", FUSE_OPTIONS, str(img), "MNT"],
        ["fusermount3", "-u", "MNT"],
    )


def kernel_server(name: str, fstype: str, img: Path) -> Server:
    # mount -o loop sets the loop device to detach itself when unmounted.
    return Server(
        name, False, ["mount", "-t", fstype, "-o", "loop,ro", str(img), "MNT"], ["umount", "MNT"]
    )


# -- mounting and cleaning up ------------------------------------------------------------
@dataclass
class Mounted:
    server: Server
    mnt: Path
    seconds: float  # the mount command, start to return
    daemons: list[int]
    proc: subprocess.Popen[bytes] | None = None


class Mounts:
    """Mountpoints under ``root``; whatever is left mounted is cleaned on close."""

    def __init__(self, root: Path, images_root: Path) -> None:
        self.root = root
        self.images_root = images_root
        self.live: dict[Path, Mounted] = {}
        root.mkdir(parents=True, exist_ok=True)

    def mountpoint(self, server: Server) -> Path:
        mnt = self.root / re.sub(r"[^A-Za-z0-9._-]+", "-", server.name).strip("-")
        mnt.mkdir(exist_ok=True)
        return mnt

    def mount(self, server: Server) -> Mounted:
        mnt = self.mountpoint(server)
        if server.prepare:
            server.prepare()
        before = _fuse_holders() if server.fuse else set()
        argv = server.argv(mnt, server.mount_cmd)
        proc = None
        t = time.perf_counter()
        if server.popen:
            proc = subprocess.Popen(argv, start_new_session=True)
            deadline = time.monotonic() + 600
            while not os.path.ismount(mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"{' '.join(argv)} did not mount")
                time.sleep(0.01)
        else:
            sh(argv)
        seconds = time.perf_counter() - t
        daemons = fuse_daemons(mnt, before) if server.fuse else []
        m = Mounted(server, mnt, seconds, daemons, proc)
        self.live[mnt] = m
        return m

    def unmount(self, m: Mounted) -> None:
        try:
            try:
                sh(m.server.argv(m.mnt, m.server.unmount_cmd))
            except RuntimeError:
                # Busy or broken: detach it anyway, so the next mount here can happen,
                # and report the failure.
                subprocess.run(["umount", "-l", str(m.mnt)], capture_output=True, check=False)
                raise
            finally:
                _wait_gone(m.daemons)
            if m.proc is not None:
                m.proc.wait(timeout=60)
        finally:
            self.live.pop(m.mnt, None)
            if m.server.finish:
                m.server.finish()

    @contextlib.contextmanager
    def mounted(self, server: Server) -> Iterator[Mounted]:
        m = self.mount(server)
        try:
            yield m
        finally:
            self.unmount(m)

    def close(self) -> None:
        """Unmount everything under the root (lazily if busy), kill what we started,
        detach loop devices backed by our images."""
        root = str(self.root.resolve())
        targets = []
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point == root or point.startswith(root + "/"):
                    targets.append(point)
        for point in sorted(targets, key=len, reverse=True):
            _log(f"cleaning up: unmounting {point}")
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for m in list(self.live.values()):
            if m.proc is not None and m.proc.poll() is None:
                m.proc.kill()
            _wait_gone(m.daemons, timeout=10)
            if m.server.finish:
                with contextlib.suppress(Exception):
                    m.server.finish()
        self.live.clear()
        done = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True, check=False)
        images = str(self.images_root.resolve())
        with contextlib.suppress(ValueError):
            for dev in json.loads(done.stdout or "{}").get("loopdevices", []):
                back = dev.get("back-file") or ""
                if back.startswith(images + "/"):
                    _log(f"cleaning up: detaching {dev['name']} ({back})")
                    subprocess.run(["losetup", "-d", dev["name"]], capture_output=True, check=False)
