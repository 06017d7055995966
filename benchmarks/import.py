#!/usr/bin/env python3
"""Import of an OCI v1 image (one tar+gzip layer of a Debian minbase tree) against the
usual way and against plain unpacking, in one run.

Setup, untimed: a tar of the tree (``~/.cache/puzzlefs-bench/tars/<name>.tar`` when it
exists, else ``tar --sort=name --numeric-owner --xattrs`` of the tree), gzip -6 -n, and
an OCI image layout written directly (oci-layout, index.json, config with diff_ids,
manifest). Then, each into a fresh directory, after a sync, page cache warm:

- ``puzzlefs import SRC:latest OUT:t`` (and ``-c``): straight from the layer, no
  extraction (the uncompressed layer is spooled once in a temporary file);
- ``umoci unpack --image SRC:latest BUNDLE`` then ``puzzlefs build BUNDLE/rootfs``:
  what one does without ``import`` (each part also timed on its own);
- ``tar -xzf LAYER``: only unpacking the layer, the least any consumer does.

Prints one Markdown table (time, CPU time of the commands, each time as a ratio to
``puzzlefs import``) and whether import and unpack+build gave the same image (they
must: same manifest digest). A measurement, not a test: nothing asserts on times.

    python3 benchmarks/import.py [TREE] [--tmp DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path.home() / ".cache" / "puzzlefs-bench"
DEFAULT_TREE = BENCH / "rootfs" / "bookworm"

IMPORT = "puzzlefs import"
IMPORT_C = "puzzlefs import -c"
UNPACK_BUILD = "umoci unpack + puzzlefs build"
UNPACK = "umoci unpack (alone)"
BUILD = "puzzlefs build (alone)"
TAR_X = "tar -xzf layer"


@dataclass
class Result:
    name: str
    seconds: float
    cpu: float
    command: str


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(command: str) -> tuple[float, float]:
    cpu0, t0 = cpu_children(), time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)
    return time.perf_counter() - t0, cpu_children() - cpu0


def fresh(*paths: Path) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    os.sync()


def make_layout(tar: Path, layout: Path) -> Path:
    """An OCI image layout with one tar+gzip layer; returns the layer blob."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    diff_id, gz = hashlib.sha256(), hashlib.sha256()
    tmp = blobs / ".layer"
    with (
        open(tar, "rb") as src,
        open(tmp, "wb") as raw_out,
        gzip.GzipFile(fileobj=raw_out, mode="wb", compresslevel=6, mtime=0) as out,
    ):
        while block := src.read(1 << 20):
            diff_id.update(block)
            out.write(block)
    with open(tmp, "rb") as f:
        while block := f.read(1 << 20):
            gz.update(block)
    layer = blobs / gz.hexdigest()
    tmp.rename(layer)

    def put(obj: object) -> dict[str, object]:
        data = json.dumps(obj).encode()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config = put(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id.hexdigest()}"]},
        }
    )
    manifest = put(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": f"sha256:{gz.hexdigest()}",
                    "size": layer.stat().st_size,
                }
            ],
        }
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return layer


def manifest_digest(oci: Path, tag: str) -> str:
    for d in json.loads((oci / "index.json").read_text())["manifests"]:
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(d["digest"])
    raise SystemExit(f"no tag {tag} in {oci}")


def table(results: dict[str, Result]) -> str:
    base = results[IMPORT].seconds
    head = ["step", "time s", "CPU s", f"time / `{IMPORT}`"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results.values():
        lines.append(f"| `{r.name}` | {r.seconds:.2f} | {r.cpu:.2f} | {r.seconds / base:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tree", nargs="?", default=str(DEFAULT_TREE), help="the tree to image")
    p.add_argument("--tmp", default="/var/tmp", help="where everything is written (a disk)")
    p.add_argument("--repeat", type=int, default=1, help="best of N runs per step")
    args = p.parse_args(argv)
    tree = Path(args.tree).resolve()
    if not tree.is_dir():
        p.error(f"{tree} is not a directory (make the benchmark data set first)")
    if not shutil.which("umoci"):
        p.error("umoci is not installed (scripts/install-system-deps.sh)")
    q = subprocess.list2cmdline
    puzzlefs = q([sys.executable, "-m", "puzzlefs"])

    with tempfile.TemporaryDirectory(prefix="puzzlefs-bench-import-", dir=args.tmp) as tmpdir:
        tmp = Path(tmpdir)
        tar = BENCH / "tars" / f"{tree.name}.tar"
        if not tar.is_file():
            tar = tmp / "tree.tar"
            print(f"making {tar} ...", file=sys.stderr)
            subprocess.run(
                ["tar", "--sort=name", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
                + ["-C", str(tree), "-cf", str(tar), "."],
                check=True,
            )
        src = tmp / "src"
        print(f"writing an OCI image of {tar} to {src} ...", file=sys.stderr)
        layer = make_layout(tar, src)
        tar_mb, layer_mb = tar.stat().st_size / 1e6, layer.stat().st_size / 1e6
        out, bundle, untar = tmp / "out", tmp / "bundle", tmp / "untar"
        steps = [
            (IMPORT, f"{puzzlefs} import {src}:latest {out}:t >/dev/null", [out]),
            (IMPORT_C, f"{puzzlefs} import -c {src}:latest {out}:t >/dev/null", [out]),
            (
                UNPACK_BUILD,
                f"umoci unpack --image {src}:latest {bundle} >/dev/null && "
                f"{puzzlefs} build {bundle}/rootfs {out}:t >/dev/null",
                [out, bundle],
            ),
            (UNPACK, f"umoci unpack --image {src}:latest {bundle} >/dev/null", [bundle]),
            (BUILD, f"{puzzlefs} build {bundle}/rootfs {out}:t >/dev/null", [out]),
            (TAR_X, f"mkdir {untar} && tar --numeric-owner -xzf {layer} -C {untar}", [untar]),
        ]
        with open(layer, "rb") as f:  # warm the page cache with the layer, untimed
            while f.read(1 << 20):
                pass
        results: dict[str, Result] = {}
        digests: dict[str, str] = {}
        for name, command, outputs in steps:
            print(f"timing {name} ...", file=sys.stderr, flush=True)
            best: Result | None = None
            for _ in range(args.repeat):
                if name == BUILD:  # needs umoci's tree, untimed
                    fresh(bundle, out)
                    subprocess.run(
                        ["umoci", "unpack", "--image", f"{src}:latest", str(bundle)],
                        check=True,
                        capture_output=True,
                    )
                fresh(*outputs)
                seconds, cpu = run_timed(command)
                if best is None or seconds < best.seconds:
                    best = Result(name, seconds, cpu, command)
                if name in (IMPORT, UNPACK_BUILD):
                    digests[name] = manifest_digest(out, "t")
            assert best is not None
            results[name] = best
            fresh(out, bundle, untar)

    print(
        f"\n{tree} as one tar+gzip layer ({tar_mb:,.1f} MB tar, {layer_mb:,.1f} MB gzip); "
        f"{os.cpu_count()} CPUs; Python {sys.version.split()[0]}; best of {args.repeat}\n"
    )
    print(table(results))
    same = digests.get(IMPORT) == digests.get(UNPACK_BUILD)
    print(
        f"\nimport and umoci unpack + build give the same image: {'yes' if same else 'NO'}"
        f" ({digests.get(IMPORT)})"
    )
    r = results
    print(
        f"import is {r[UNPACK_BUILD].seconds / r[IMPORT].seconds:.2f}x as fast as unpack + build,"
        f" and takes {r[IMPORT].seconds / r[TAR_X].seconds:.2f}x the time of tar -x"
    )
    print("\nCommands:")
    for res in results.values():
        print(f"- {res.name}: `{res.command}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
