"""Store management: tags, rm, gc (and gc against builds running at the same time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from puzzlefs import build
from puzzlefs.errors import UsageError
from puzzlefs.manage import gc, reachable_blobs
from puzzlefs.oci import ImageLayout
from puzzlefs.reader.verify import verify


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "puzzlefs", *args], capture_output=True, text=True, timeout=120
    )


def tree(root: Path, seed: int, size: int = 400_000) -> Path:
    root.mkdir(parents=True)
    (root / "data").write_bytes(seed.to_bytes(4, "big") * (size // 4))
    (root / "rand").write_bytes(os.urandom(size))
    return root


def blobs(oci: Path) -> set[str]:
    return set(os.listdir(oci / "blobs" / "sha256"))


def test_rebuilt_tag_garbage_is_collected(tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    build(tree(tmp_path / "a", 1), oci, "t")
    first = blobs(oci)
    build(tree(tmp_path / "b", 2), oci, "t")  # the old image is now unreachable
    build(tree(tmp_path / "c", 3), oci, "keep", compress=True)
    layout = ImageLayout(oci)
    needed = reachable_blobs(layout)
    dry = gc(layout, dry_run=True)
    assert dry.removed and set(dry.removed) <= first
    assert blobs(oci) >= set(dry.removed)  # a dry run removes nothing
    report = gc(layout)
    assert report.removed == dry.removed and report.freed == dry.freed > 0
    assert blobs(oci) == needed
    assert verify(oci, "t").ok and verify(oci, "keep").ok
    assert gc(layout).removed == []


def test_rm_then_gc_removes_only_what_no_tag_shares(tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    src = tree(tmp_path / "a", 1)
    build(src, oci, "one")
    (src / "extra").write_bytes(os.urandom(300_000))
    build(src, oci, "two")  # shares the chunks of "one"
    assert run("rm", f"{oci}:one").returncode == 0
    assert run("tags", str(oci)).stdout.split() == ["two"]
    done = run("gc", str(oci))
    assert done.returncode == 0 and "removed" in done.stdout
    assert verify(oci, "two").ok
    listed = json.loads(run("tags", str(oci), "--json").stdout)
    assert [t["tag"] for t in listed] == ["two"]


def test_rm_of_unknown_tag_is_a_clean_error(tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    build(tree(tmp_path / "a", 1), oci, "one")
    done = run("rm", f"{oci}:nope")
    assert done.returncode != 0 and done.stderr.startswith("Error: tag 'nope' not found")
    assert run("tags", str(oci)).stdout.split() == ["one"]


def test_gc_keeps_foreign_images_and_untagged_manifests(tmp_path: Path) -> None:
    """An OCI image of tar layers in the same layout (an import's source) stays whole."""
    oci = tmp_path / "oci"
    build(tree(tmp_path / "a", 1), oci, "p")
    layout = ImageLayout(oci)
    layer = layout.blobs.put(b"not really a tar")
    config = layout.blobs.put(b"{}")
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(config),
                "size": 2,
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": str(layer),
                    "size": 16,
                }
            ],
        }
    ).encode()
    mdigest = layout.blobs.put(manifest)
    index = json.loads((oci / "index.json").read_text())
    index["manifests"].append(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": str(mdigest),
            "size": len(manifest),
        }
    )
    (oci / "index.json").write_text(json.dumps(index))
    gc(layout)
    assert {layer.hex, config.hex, mdigest.hex} <= blobs(oci)
    assert verify(oci, "p").ok


def test_gc_refuses_a_shared_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    oci = tmp_path / "oci"
    (oci / "blobs").mkdir(parents=True)
    (oci / "blobs" / "sha256").symlink_to(store)
    build(tree(tmp_path / "a", 1), oci, "t")
    with pytest.raises(UsageError, match="shared store"):
        gc(ImageLayout(oci))


def test_gc_refuses_when_a_tag_is_damaged(tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    build(tree(tmp_path / "a", 1), oci, "t")
    layout = ImageLayout(oci)
    _, _, manifest = layout.read_manifest("t")
    (oci / "blobs" / "sha256" / manifest.rootfs.digest.hex).unlink()
    before = blobs(oci)
    done = run("gc", str(oci))
    assert done.returncode != 0 and "gc refuses" in done.stderr
    assert blobs(oci) == before


def test_gc_waits_for_a_build_in_progress(tmp_path: Path) -> None:
    """A build holds the store from its first stored chunk to its commit: a gc asked
    for meanwhile waits, and then sees the new tag, so it removes none of its blobs."""
    oci = tmp_path / "oci"
    build(tree(tmp_path / "a", 1), oci, "old")
    layout = ImageLayout(oci)
    src = tree(tmp_path / "b", 2, size=30 << 20)
    holder = threading.Event()
    result: list[object] = []

    def slow_build() -> None:
        with layout.blobs.writing():  # as the build does; held a moment longer
            holder.set()
            time.sleep(0.5)
            result.append(build(src, oci, "new", workers=1))

    t = threading.Thread(target=slow_build)
    t.start()
    holder.wait()
    started = time.monotonic()
    report = gc(layout)
    waited = time.monotonic() - started
    t.join()
    assert result and waited > 0.3
    assert verify(oci, "new").ok and verify(oci, "old").ok
    assert not report.removed


def test_gc_racing_builds_in_other_processes(tmp_path: Path) -> None:
    """Builds and gcs at once, in separate processes: no tag ever loses a blob."""
    oci = tmp_path / "oci"
    sources = [tree(tmp_path / f"s{i}", i, size=3 << 20) for i in range(4)]
    build(sources[0], oci, "t0")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "puzzlefs", "build", str(src), f"{oci}:t{i}"],
            stderr=subprocess.PIPE,
        )
        for i, src in enumerate(sources)
    ]
    for _ in range(6):
        assert run("gc", str(oci)).returncode == 0
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert run("gc", str(oci)).returncode == 0
    for i in range(4):
        assert verify(oci, f"t{i}").ok


def test_gc_of_a_layout_without_a_store_changes_nothing(tmp_path: Path) -> None:
    """An empty layout (no blobs/sha256 yet): nothing to collect, and gc, dry or
    not, creates nothing (it used to create the store to lock it)."""
    oci = tmp_path / "oci"
    ImageLayout(oci, create=True)
    (oci / "blobs" / "sha256").rmdir()
    for dry_run in (True, False):
        report = gc(ImageLayout(oci), dry_run=dry_run)
        assert (report.removed, report.kept) == ([], 0)
        assert not (oci / "blobs" / "sha256").exists()


def test_verify_without_a_tag_checks_every_tag(tmp_path: Path) -> None:
    oci = tmp_path / "oci"
    build(tree(tmp_path / "a", 1), oci, "one")
    before = blobs(oci)
    build(tree(tmp_path / "b", 2), oci, "two", compress=True)
    only_two = blobs(oci) - before
    r = run("verify", str(oci))
    assert r.returncode == 0, r.stderr
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == ["one", "two"]
    report = json.loads(run("verify", "--json", str(oci)).stdout)
    assert [t["tag"] for t in report] == ["one", "two"] and all(t["ok"] for t in report)
    assert json.loads(run("verify", "--json", f"{oci}:two").stdout)["tag"] == "two"
    # a chunk only "two" needs goes: "two" fails, "one" stays ok, and the exit says so
    (oci / "blobs" / "sha256" / sorted(only_two)[0]).unlink()
    r = run("verify", str(oci))
    assert r.returncode == 1
    assert "one: " in r.stdout and r.stdout.split("one: ")[1].splitlines()[0].endswith(": ok")
    assert "two: " in r.stdout and "problem" in r.stdout.split("two: ")[1]
    r = run("verify", "--digest", "00" * 32, str(oci))
    assert r.returncode == 2 and r.stderr.startswith("Error: --digest checks one image")


def test_every_tag_means_every_puzzlefs_image(tmp_path: Path) -> None:
    """A layout that also holds other images (tar layers, Docker's, an index of
    platforms: what pull and import keep there) is measured and verified for its
    puzzlefs images; the others are named as passed over, never counted as broken."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_import import E, Layout, make_tar

    oci = tmp_path / "oci"
    build(tree(tmp_path / "a", 1), oci, "ours")
    other = Layout(oci)
    other.index = json.loads((oci / "index.json").read_text())["manifests"]
    layer = make_tar([E("etc", "dir"), E("etc/hostname", data=b"box\n")])
    other.tag("tars", other.manifest([(layer, "gzip")]))
    other.tag("docker", other.manifest([(layer, "gzip")], docker=True))
    other.tag("multi", other.image_index([other.manifest([(layer, "gzip")])]))
    layout = ImageLayout(oci)
    assert layout.puzzlefs_tags() == (["ours"], ["docker", "multi", "tars"])
    r = run("verify", str(oci))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[:3] == [
        f"{t}: not a puzzlefs image: skipped" for t in ("docker", "multi", "tars")
    ]
    assert r.stdout.splitlines()[3].startswith("ours: ") and r.stdout.endswith(": ok\n")
    r = run("du", "--json", str(oci))
    assert r.returncode == 0, r.stderr
    usage = json.loads(r.stdout)
    assert [t["tag"] for t in usage["tags"]] == ["ours"]
    assert usage["skipped"] == ["docker", "multi", "tars"]
    r = run("du", str(oci))
    assert "Not counted (not puzzlefs images): docker, multi, tars." in r.stdout
    r = run("du", str(oci), "tars")  # named: said, in one line
    assert r.returncode != 0 and r.stderr.startswith("Error: ") and len(r.stderr.splitlines()) == 1
    r = run("gc", str(oci))  # keeps what every image needs
    assert r.returncode == 0 and run("verify", str(oci)).returncode == 0
    assert run("import", f"{oci}:docker", f"{tmp_path / 'imp'}:t").returncode == 0
