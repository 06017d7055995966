"""Faults a store must survive: builds killed at any moment, builds racing each other
(in one layout, and in two layouts sharing one blob store), a full disk.

After each: every tag committed before is intact (all its blobs present and
verified), no process of the killed build is left, nothing waits on a lock, and the
next build works.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from puzzlefs import build
from puzzlefs.oci import ImageLayout
from puzzlefs.oci._lock import flocked
from puzzlefs.reader.verify import verify

# Past the pipeline's PARALLEL_MIN_BYTES: these builds run worker processes.
TREE_BYTES = 40 << 20


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "puzzlefs", *args]


def make_tree(root: Path, seed: int, total: int = TREE_BYTES, files: int = 40) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"d{i % 5}").mkdir(exist_ok=True)
        (root / f"d{i % 5}" / f"f{i}").write_bytes(rng.randbytes(total // files))
    return root


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a killed build and any worker it left)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state; the session id is the 4th field after the name.
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry))
    return out


def wait_gone(sid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = session_processes(sid)
        if not left:
            return []
        time.sleep(0.02)
    return session_processes(sid)


def catches_sigterm(pid: int) -> bool:
    """Whether the process has installed its SIGTERM handler (the CLI runs): the
    interpreter's own start-up, before any puzzlefs code, is not ours to test."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def assert_not_locked(oci: Path) -> None:
    """Neither index.json's lock nor the store's is held by anyone."""
    with flocked(oci, wait=False) as free:
        assert free, "the layout's lock is still held"
    with flocked(oci / "blobs" / "sha256", wait=False) as free:
        assert free, "the store's lock is still held"


def assert_intact(oci: Path, tag: str) -> None:
    report = verify(oci, tag)
    assert report.ok, report.problems


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("fault-trees")
    return make_tree(base / "old", 1), make_tree(base / "new", 2)


@contextlib.contextmanager
def started(args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.parametrize(
    ("signum", "moments"),
    [(signal.SIGKILL, 20), (signal.SIGTERM, 6), (signal.SIGINT, 6)],
    ids=["SIGKILL", "SIGTERM", "SIGINT"],
)
def test_build_killed_at_random_moments(
    trees: tuple[Path, Path], tmp_path: Path, signum: int, moments: int
) -> None:
    old, new = trees
    oci = tmp_path / "oci"
    build(old, oci, "old")
    rng = random.Random(signum)
    for i in range(moments):
        with started(_cli("build", str(new), f"{oci}:new-{i}")) as proc:
            if signum != signal.SIGKILL:  # from the moment the CLI can handle it
                deadline = time.monotonic() + 30
                while not catches_sigterm(proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 1.2))
            # SIGINT is Ctrl-C at a terminal, where the whole group gets it.
            target = proc.pid if signum != signal.SIGINT else -proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signum)
            proc.wait(timeout=30)
            stderr = proc.stderr.read().decode() if proc.stderr else ""
            assert "Traceback" not in stderr, stderr
            assert wait_gone(proc.pid) == [], f"moment {i}: the build left processes behind"
        assert_not_locked(oci)
        assert_intact(oci, "old")
        tags = ImageLayout(oci).tags()
        if f"new-{i}" in tags:  # it finished before the signal: then it is whole
            assert_intact(oci, f"new-{i}")
    done = subprocess.run(_cli("build", str(new), f"{oci}:again"), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_intact(oci, "again")
    assert_intact(oci, "old")


def test_terminated_build_says_so(trees: tuple[Path, Path], tmp_path: Path) -> None:
    _, new = trees
    blobs = tmp_path / "oci" / "blobs" / "sha256"
    with started(_cli("build", str(new), f"{tmp_path}/oci:t")) as proc:
        deadline = time.monotonic() + 30
        while not (blobs.is_dir() and len(os.listdir(blobs)) > 10):  # chunks are being stored
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines() == ["Error: terminated by SIGTERM"]


def test_four_builds_into_one_layout_at_once(tmp_path: Path) -> None:
    sources = [make_tree(tmp_path / f"src{i}", 10 + i, total=20 << 20, files=8) for i in range(4)]
    oci = tmp_path / "oci"
    procs = [
        subprocess.Popen(_cli("build", str(src), f"{oci}:t{i}"), stderr=subprocess.PIPE)
        for i, src in enumerate(sources)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert sorted(ImageLayout(oci).tags()) == ["t0", "t1", "t2", "t3"]
    for i in range(4):
        assert_intact(oci, f"t{i}")


# A build that stores a few chunks, then waits for a signal file before it fails: the
# other build, meanwhile, finds those chunks present and commits a tag that needs them.
_FAIL_LATE = """
import os, sys, time
from puzzlefs import builder
from puzzlefs.errors import BuildError
real, calls = builder._store_chunk, []
def failing(*args, **kw):
    calls.append(1)
    if len(calls) == 50:
        open(sys.argv[3], "w").close()  # the other build may start now
        while not os.path.exists(sys.argv[4]):
            time.sleep(0.01)
        raise BuildError("simulated failure")
    return real(*args, **kw)
builder._store_chunk = failing
from puzzlefs.cli import main
sys.exit(main(["build", sys.argv[1], sys.argv[2]]))
"""


def test_failed_build_never_removes_what_another_build_committed(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two layouts share one store through a ``blobs/sha256`` symlink (FORMAT.md §1)."""
    _, new = trees
    store = tmp_path / "shared-store"
    store.mkdir()
    layouts = []
    for name in ("a", "b"):
        oci = tmp_path / name
        (oci / "blobs").mkdir(parents=True)
        (oci / "blobs" / "sha256").symlink_to(store)
        (oci / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        layouts.append(oci)
    started_flag, done_flag = tmp_path / "started", tmp_path / "done"
    failing = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _FAIL_LATE,
            str(new),
            f"{layouts[0]}:t",
            str(started_flag),
            str(done_flag),
        ],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not started_flag.exists():
        assert failing.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    # Inline (one worker), so that every chunk the failing build stored is found present.
    build(new, layouts[1], "t", workers=1)
    done_flag.touch()
    _, err = failing.communicate(timeout=60)
    assert failing.returncode != 0 and b"simulated failure" in err
    assert_intact(layouts[1], "t")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk(trees: tuple[Path, Path], tmp_path: Path) -> None:
    old, new = trees
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(disk)], check=True)
    try:
        oci = disk / "oci"
        build(old, oci, "old")  # 40 MB of the 60
        done = subprocess.run(_cli("build", str(new), f"{oci}:new"), capture_output=True, text=True)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "no space left" in lines[0].lower(), done.stderr
        assert sorted(ImageLayout(oci).tags()) == ["old"]
        assert_intact(oci, "old")
        assert_not_locked(oci)
        # The failed build's chunks stay for gc (another build may have relied on them).
        freed = subprocess.run(_cli("gc", str(oci)), capture_output=True, text=True)
        assert freed.returncode == 0, freed.stderr
        assert_intact(oci, "old")
        small = tmp_path / "small"
        small.mkdir()
        (small / "f").write_bytes(b"fits")
        again = subprocess.run(_cli("build", str(small), f"{oci}:small"), capture_output=True)
        assert again.returncode == 0, again.stderr
        assert_intact(oci, "small")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _corrupt_last_chunk(oci: Path, tag: str) -> None:
    from puzzlefs.oci import ImageLayout

    _, _, manifest = ImageLayout(oci).read_manifest(tag)
    last = manifest.chunk_layers[-1].digest.hex
    blob = oci / "blobs" / "sha256" / last
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.unlink()
    blob.write_bytes(bytes(data))


@pytest.mark.parametrize("dest_exists", [False, True], ids=["new-dest", "empty-dest"])
def test_failed_extract_leaves_nothing(
    trees: tuple[Path, Path], tmp_path: Path, dest_exists: bool
) -> None:
    old, _ = trees
    oci = tmp_path / "oci"
    build(old, oci, "t")
    os.chmod(old / "d0", 0o555)  # a read-only directory too (made before the failure)
    try:
        build(old, oci, "ro")
    finally:
        os.chmod(old / "d0", 0o755)
    _corrupt_last_chunk(oci, "ro")
    dest = tmp_path / "out"
    if dest_exists:
        dest.mkdir()
    done = subprocess.run(_cli("extract", f"{oci}:ro", str(dest)), capture_output=True, text=True)
    assert done.returncode != 0 and "corrupt" in done.stderr
    if dest_exists:
        assert os.listdir(dest) == []
    else:
        assert not dest.exists()


def test_interrupted_extract_leaves_nothing(trees: tuple[Path, Path], tmp_path: Path) -> None:
    old, _ = trees
    oci = tmp_path / "oci"
    build(old, oci, "t")
    dest = tmp_path / "out"
    with started(_cli("extract", f"{oci}:t", str(dest))) as proc:
        deadline = time.monotonic() + 30
        while not (dest.is_dir() and any(dest.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not dest.exists()
