#!/usr/bin/env python3
"""De-duplication across versions of a distribution image (issue 5), against peers.

Builds every tree of the benchmark data set (../shared/bench/make_dataset.sh) into one
OCI layout, in series order, for several configurations (plain / zstd, each version on
the previous one with -b or as independent builds into the same store, three chunk-size
settings, larger zstd frames and a higher zstd level), and measures in the same run the
peers: the sum of the uncompressed tars, of tar.gz (gzip -6, the OCI v1 way), of tar.zst
(zstd -3), and one `casync make` store of all the tars. Prints Markdown tables (sizes,
savings, build times, the cost of the 100-byte patch). Not a test: nothing here asserts timings.

    python3 benchmarks/dedup.py ~/.cache/puzzlefs-bench [--quick] [--no-casync]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from puzzlefs import build
from puzzlefs.chunking import ChunkParams
from puzzlefs.compression import DEFAULT_LEVEL, ZstdOptions
from puzzlefs.reader.usage import usage

SERIES = [
    "bullseye",
    "bullseye-upd",
    "bookworm",
    "bookworm-upd",
    "bookworm-py",
    "bookworm-py-extra",
    "trixie",
    "trixie-upd",
    "forky",
    "sid",
    "bookworm-patched",
]
# Each version is built on the previous one, except the patched one, on what it patches.
BASE_OVERRIDE = {"bookworm-patched": "bookworm"}
CHUNK_SETTINGS = ["16K:64K:256K", "8K:32K:128K", "32K:128K:512K"]
# The reference's 4 KiB frames at level 3 against larger frames and a higher level.
ZSTD_VARIANTS = [
    ZstdOptions(64 << 10),
    ZstdOptions(1 << 20),
    ZstdOptions(4 << 10, 15),
    ZstdOptions(64 << 10, 15),
    ZstdOptions(1 << 20, 15),
    ZstdOptions(64 << 10, 19),
    ZstdOptions(1 << 20, 19),
]
MB = 1e6


@dataclass
class Run:
    name: str
    store_bytes: int = 0
    metadata_bytes: int = 0
    seconds: float = 0.0
    added: dict[str, int] = field(default_factory=dict)  # version -> bytes it added
    patch_new_chunks: int = 0
    patch_metadata: int = 0


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_puzzlefs(
    trees: list[Path],
    work: Path,
    name: str,
    compress: bool | ZstdOptions,
    chained: bool,
    params: ChunkParams,
) -> Run:
    oci = work / name
    shutil.rmtree(oci, ignore_errors=True)
    run = Run(name)
    prev = None
    before = 0
    for tree in trees:
        t0 = time.perf_counter()
        result = build(
            tree,
            oci,
            tree.name,
            compress=compress,
            params=params,
            base_tag=BASE_OVERRIDE.get(tree.name, prev) if chained and prev else None,
        )
        run.seconds += time.perf_counter() - t0
        size = dir_bytes(oci / "blobs")
        run.added[tree.name] = size - before
        before = size
        if tree.name == "bookworm-patched":
            run.patch_new_chunks = result.new_chunks
            run.patch_metadata = result.rootfs.size
        prev = tree.name
    run.store_bytes = dir_bytes(oci / "blobs")
    run.metadata_bytes = usage(oci).unified_metadata
    shutil.rmtree(oci)
    return run


def peers(tars: list[Path], work: Path, casync: bool) -> list[tuple[str, int, float, int]]:
    """(name, total bytes, seconds, bytes the patched version adds)."""
    out = []
    total = sum(t.stat().st_size for t in tars)
    out.append(("sum of tars", total, 0.0, tars[-1].stat().st_size))
    for name, cmd in [
        ("tar.gz -6", ["gzip", "-6", "-n", "-c"]),
        ("tar.zst -3", ["zstd", "-3", "-T2", "-q", "-c"]),
    ]:
        t0 = time.perf_counter()
        sizes = []
        for t in tars:
            gz = t.with_suffix(".tar.gz")
            if name.startswith("tar.gz") and gz.exists():
                sizes.append(gz.stat().st_size)
                continue
            with open(t, "rb") as f:
                proc = subprocess.run(cmd, stdin=f, capture_output=True, check=True)
            sizes.append(len(proc.stdout))
        out.append((name, sum(sizes), time.perf_counter() - t0, sizes[-1]))
    if casync and shutil.which("casync"):
        store = work / "casync.castr"
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        last_before = 0
        for t in tars:
            last_before = dir_bytes(store) if store.exists() else 0
            subprocess.run(
                [
                    "casync",
                    "make",
                    "--compression=zstd",
                    f"--store={store}",
                    str(work / f"{t.stem}.caibx"),
                    str(t),
                ],
                check=True,
                capture_output=True,
            )
        size = dir_bytes(store) + sum(p.stat().st_size for p in work.glob("*.caibx"))
        out.append(
            ("casync make (zstd)", size, time.perf_counter() - t0, dir_bytes(store) - last_before)
        )
        shutil.rmtree(store)
        for p in work.glob("*.caibx"):
            p.unlink()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dataset", type=Path, help="the make_dataset.sh output ($BENCH)")
    ap.add_argument("--tmp", type=Path, default=None, help="scratch directory (same disk)")
    ap.add_argument("--quick", action="store_true", help="only the default chunk sizes")
    ap.add_argument("--no-casync", action="store_true")
    args = ap.parse_args()
    trees = [args.dataset / "rootfs" / n for n in SERIES if (args.dataset / "rootfs" / n).is_dir()]
    tars = [args.dataset / "tars" / f"{t.name}.tar" for t in trees]
    missing = [t for t in tars if not t.exists()]
    if not trees or missing:
        print(
            f"dataset incomplete (run make_dataset.sh all): {missing or 'no trees'}",
            file=sys.stderr,
        )
        return 1
    work = Path(tempfile.mkdtemp(prefix="puzzlefs-dedup-", dir=args.tmp))
    try:
        print(f"{len(trees)} versions: {', '.join(t.name for t in trees)}\n")
        peer_rows = peers(tars, work, not args.no_casync)
        tar_total = peer_rows[0][1]
        rows = [(n, b, s, p) for n, b, s, p in peer_rows]
        settings = CHUNK_SETTINGS[:1] if args.quick else CHUNK_SETTINGS
        runs: list[tuple[str, Run]] = []
        for setting in settings:
            params = ChunkParams.parse(setting)
            for compress in (False, True):
                for chained in (True, False):
                    label = (
                        f"puzzlefs {setting}{' -c' if compress else ''}"
                        f"{' -b previous' if chained else ' (independent builds)'}"
                    )
                    r = run_puzzlefs(trees, work, "oci", compress, chained, params)
                    runs.append((label, r))
                    print(
                        f"  {label}: {r.store_bytes / MB:.1f} MB in {r.seconds:.1f}s",
                        file=sys.stderr,
                    )
        for zstd in ZSTD_VARIANTS:
            flags = f"--zstd-frame-size {zstd.frame_size // 1024}K"
            if zstd.level != DEFAULT_LEVEL:
                flags += f" --zstd-level {zstd.level}"
            label = f"puzzlefs {settings[0]} -c {flags} (independent builds)"
            r = run_puzzlefs(trees, work, "oci", zstd, False, ChunkParams.parse(settings[0]))
            runs.append((label, r))
            print(f"  {label}: {r.store_bytes / MB:.1f} MB in {r.seconds:.1f}s", file=sys.stderr)
        print("| store | total MB | saved vs tars | metadata MB | build s | patched version adds |")
        print("|---|---:|---:|---:|---:|---|")
        for name, total, secs, patch in rows:
            saved = 1 - total / tar_total
            print(
                f"| {name} | {total / MB:.1f} | {saved:.0%} | | {secs:.1f} | {patch / MB:.3f} MB |"
            )
        for label, r in runs:
            saved = 1 - r.store_bytes / tar_total
            patch = r.added.get("bookworm-patched", 0)
            print(
                f"| {label} | {r.store_bytes / MB:.1f} | {saved:.0%} | {r.metadata_bytes / MB:.1f}"
                f" | {r.seconds:.1f} | {patch / MB:.3f} MB: {r.patch_new_chunks} new chunks,"
                f" rootfs {r.patch_metadata / 1e3:.0f} KB |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
