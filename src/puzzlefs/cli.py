"""The ``puzzlefs`` command: parse, call one library function, map errors to exits.

Errors are printed as one line, ``Error: <message>``, as the reference does; a
traceback only with ``PUZZLEFS_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from puzzlefs import __version__
from puzzlefs.errors import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    PuzzleFSError,
    Terminated,
    UsageError,
    one_line,
)
from puzzlefs.oci import parse_image_ref
from puzzlefs.progress import Progress

if TYPE_CHECKING:
    from puzzlefs.compression import ZstdOptions
    from puzzlefs.reader import Image
    from puzzlefs.registry import ClientOptions

Handler = Callable[[argparse.Namespace], int]


def _image_ref(text: str) -> tuple[Path, str]:
    return parse_image_ref(text)


def _expect_files(progress: Progress, image: Image) -> None:
    """Give a progress line on a terminal its totals (from the image's index)."""
    if not progress.enabled:
        return
    from puzzlefs.reader.index import load_tables

    try:
        files, size = load_tables(image.opened).file_totals()
    except PuzzleFSError:
        return  # the work itself says what is wrong
    progress.expect("files", files)
    progress.expect("bytes", size)


def _compression(args: argparse.Namespace) -> bool | ZstdOptions:
    """``-c`` with its ``--zstd-*`` options: False, True (the reference's settings), or
    the settings asked for."""
    from puzzlefs.chunking import parse_size
    from puzzlefs.compression import DEFAULT_FRAME_SIZE, DEFAULT_LEVEL, MAX_LEVEL, ZstdOptions

    frame, level = args.zstd_frame_size, args.zstd_level
    if not args.compression:
        if frame is not None or level is not None:
            raise UsageError("--zstd-frame-size and --zstd-level need -c (--compression)")
        return False
    if frame is None and level is None:
        return True
    if level is not None and not level.isdigit():
        raise UsageError(f"the zstd level must be a number from 1 to {MAX_LEVEL}, got {level!r}")
    return ZstdOptions(  # raises OptionError, a UsageError
        parse_size(frame) if frame is not None else DEFAULT_FRAME_SIZE,
        int(level) if level is not None else DEFAULT_LEVEL,
    )


def _add_mtimes_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-mtimes",
        action="store_true",
        help="keep no modification times (they read as 0, as in the reference's images):"
        " the image then does not depend on them; by default they are kept, in a layer"
        " of their own that the reference ignores",
    )


def _add_compression_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--compression", action="store_true", help="store chunks zstd-compressed")
    p.add_argument(
        "--zstd-frame-size",
        metavar="SIZE",
        help="with -c: bytes per zstd frame (default 4K, the reference's: fastest random"
        " reads; 64K stores about 10%% less, see README)",
    )
    p.add_argument(
        "--zstd-level",
        metavar="N",
        help="with -c: zstd level, 1 to 19 (default 3, the reference's; higher stores"
        " less and builds slower: 19 with 64K frames stores about 10%% less than level 3"
        " and builds about 25 times slower, see README)",
    )


def _verity_hex(text: str | None) -> str | None:
    """A manifest fs-verity digest as build prints it: 64 hex digits."""
    if text is None:
        return None
    value = text.lower().removeprefix("sha256:")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise UsageError(f"a digest is 64 hex digits, got {text!r}")
    return value


def cmd_build(args: argparse.Namespace) -> int:
    from puzzlefs.builder import build
    from puzzlefs.chunking import ChunkParams

    if args.legacy_tag is not None:  # the seed talk's `build ROOTFS OCI_DIR TAG`
        if ":" in args.image:
            raise UsageError(
                f"one argument too many: {args.image!r} names a tag already "
                "(give ROOTFS OCI_DIR:TAG, or the older ROOTFS OCI_DIR TAG)"
            )
        from puzzlefs.oci.layout import check_tag

        oci_dir, tag = Path(args.image), check_tag(args.legacy_tag)
    else:
        oci_dir, tag = _image_ref(args.image)
    params = ChunkParams.parse(args.chunk_sizes) if args.chunk_sizes else None
    result = build(
        args.rootfs,
        oci_dir,
        tag,
        compress=_compression(args),
        params=params,
        base_tag=args.base_layer,
        progress=Progress("building"),
        mtimes=not args.no_mtimes,
    )
    print(f"puzzlefs image manifest digest: {result.manifest_verity}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from puzzlefs.extract import extract, warn
    from puzzlefs.reader import open_image

    oci_dir, tag = _image_ref(args.image)
    image = open_image(oci_dir, tag, verity_digest=_verity_hex(args.digest))
    progress = Progress("extracting")
    _expect_files(progress, image)
    stats = extract(image, args.dest, progress=progress)
    warn(stats)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from puzzlefs._files import atomic_output
    from puzzlefs.export import export_tar
    from puzzlefs.reader import open_image

    oci_dir, tag = _image_ref(args.image)
    image = open_image(oci_dir, tag, verity_digest=_verity_hex(args.digest))
    progress = Progress("exporting")
    _expect_files(progress, image)
    if args.out == "-":
        export_tar(image, sys.stdout.buffer, progress=progress)
        sys.stdout.buffer.flush()
        return 0
    with atomic_output(args.out) as f:  # no half-written tar, ever
        export_tar(image, f, progress=progress)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from puzzlefs.oci import ImageLayout
    from puzzlefs.reader.verify import verify

    whole_layout = os.path.isfile(os.path.join(args.image, "index.json"))
    if whole_layout:  # every tag
        if args.digest:
            raise UsageError("--digest checks one image: give OCI_DIR:TAG")
        oci_dir = Path(args.image)
        tags, others = ImageLayout(args.image).puzzlefs_tags()
        if not tags:
            raise UsageError(f"{args.image} has no puzzlefs images to verify")
        if not args.json:
            for tag in others:
                print(one_line(f"{tag}: not a puzzlefs image: skipped"))
    else:
        oci_dir, tag = _image_ref(args.image)
        tags = [tag]
    reports = []
    for tag in tags:
        report = verify(
            oci_dir, tag, verity_digest=_verity_hex(args.digest), progress=Progress("verifying")
        )
        reports.append((tag, report))
        if args.json:
            continue
        for p in report.problems or []:
            print(one_line(f"{p.role} {p.blob or '-'}: {p.message}"))
        state = "ok" if report.ok else f"{len(report.problems or [])} problem(s)"
        chain = " and fs-verity chain" if args.digest else ""
        checked = f"{report.checked} blobs, {report.bytes:,} bytes checked (sha256{chain})"
        print(one_line(f"{tag}: {checked}: {state}"))
    if args.json:
        out = [r.to_json() for _, r in reports]
        print(json.dumps(out if whole_layout else out[0], indent=2))
    return 0 if all(r.ok for _, r in reports) else 1


def cmd_du(args: argparse.Namespace) -> int:
    from puzzlefs.reader.usage import usage

    progress = Progress("measuring")
    try:
        result = usage(args.oci_dir, args.tags or None, progress=progress)
    finally:
        progress.done()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    human = args.human if args.human is not None else sys.stdout.isatty()
    size = _human if human else (lambda n: f"{n:,}")
    head = ("TAG", "FILES", "FILE DATA", "AS A TAR", "STORED", "METADATA", "SHARED", "ADDS")
    rows = [head] + [
        (
            t.tag,
            f"{t.files:,}",
            size(t.logical),
            size(t.tar),
            size(t.stored),
            size(t.metadata),
            size(t.shared),
            size(t.adds),
        )
        for t in result.tags
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    n = len(result.tags)
    saved = result.saved
    verdict = f"{saved:.0%} less" if saved >= 0 else f"{-saved:.0%} more"
    print(
        f"\n{n} tag{'s' if n != 1 else ''}: {size(result.unified)} stored, of which"
        f" {size(result.unified_metadata)} metadata; {verdict} than their tars"
        f" ({size(result.tar_total)})."
    )
    print("SHARED: stored bytes other listed tags need too; ADDS: what only this tag needs")
    print("(removing it and running gc frees that much).")
    if result.skipped:
        print(one_line(f"Not counted (not puzzlefs images): {', '.join(result.skipped)}."))
    print()
    print(result.table())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from puzzlefs.describe import inspect_image

    oci_dir, tag = _image_ref(args.image)
    f = inspect_image(oci_dir, tag)
    if args.json:
        print(json.dumps(f.to_json(), indent=2))
        return 0
    lines = [
        ("tag", tag),
        ("manifest", f"{f.manifest_digest} ({_human(f.manifest_size)})"),
        ("fs-verity digest", f"{f.fs_verity_digest} (what mount --digest takes)"),
        ("artifact type", f.artifact_type or "none"),
        ("format", f"PuzzleFS v3, {f.metadata_layers} metadata layer(s)"),
        ("rootfs", f"{f.rootfs_digest} ({_human(f.rootfs_size)})"),
        ("times", f.times_digest or "none (they read as 0)"),
        ("chunks", f"{f.chunk_count:,}, {_human(f.chunk_bytes)} stored"),
        ("compression", f.compression),
        ("chunk sizes", f.chunk_sizes),
        ("inodes", f"{f.inodes:,}: " + ", ".join(f"{v:,} {k}" for k, v in f.kinds.items())),
        ("file data", _human(f.file_bytes)),
    ]
    lines += [(f"annotation {k}", v) for k, v in f.annotations.items()]
    lines += [("hidden", p) for p in f.problems]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from puzzlefs.describe import list_paths

    oci_dir, tag = _image_ref(args.image)
    out = sys.stdout
    for line in list_paths(oci_dir, tag, args.path or "", long=args.long):
        out.write(line + "\n")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from puzzlefs.describe import diff_images

    a = _image_ref(args.first)
    b = (
        _image_ref(args.second)
        if ":" in args.second and not args.second.startswith(":")
        else (
            a[0],
            args.second,
        )
    )
    result = diff_images(a, b)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    for p in result.added:
        print(f"+ {p}")
    for p in result.removed:
        print(f"- {p}")
    for c in result.changed:
        print(f"M {c.path} ({', '.join(c.what)})")
    print(
        f"{len(result.added)} added, {len(result.removed)} removed, {len(result.changed)} changed;"
        f" the second needs {_human(result.new_bytes)} ({result.new_chunks:,} chunks) the first"
        " does not"
    )
    return 0


def cmd_tags(args: argparse.Namespace) -> int:
    from puzzlefs.oci import ImageLayout

    tags = ImageLayout(args.oci_dir).tags()
    if args.json:
        rows = [
            {"tag": t, "digest": str(d.digest), "size": d.size} for t, d in sorted(tags.items())
        ]
        print(json.dumps(rows, indent=2))
    else:
        for t in sorted(tags):
            print(one_line(t))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from puzzlefs.manage import remove_tags
    from puzzlefs.oci import ImageLayout

    refs = [_image_ref(r) for r in args.images]
    dirs = {os.path.abspath(d) for d, _ in refs}
    if len(dirs) != 1:
        raise UsageError("rm takes tags of one OCI_DIR at a time")
    remove_tags(ImageLayout(refs[0][0]), [t for _, t in refs])
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from puzzlefs.manage import gc
    from puzzlefs.oci import ImageLayout

    report = gc(ImageLayout(args.oci_dir), dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    extra = f" and {report.temporary} temporary file(s)" if report.temporary else ""
    print(
        f"{verb} {len(report.removed)} unreferenced blob(s), {_human(report.freed)}{extra};"
        f" {report.kept} blob(s) in use"
    )
    return 0


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def cmd_enable_fs_verity(args: argparse.Namespace) -> int:
    from puzzlefs.reader.verify import enable_fs_verity

    oci_dir, tag = _image_ref(args.image)
    n = enable_fs_verity(oci_dir, tag, _verity_hex(args.digest) or "")
    print(f"fs-verity enabled and checked on {n} blobs")
    return 0


def _mount_remote(args: argparse.Namespace) -> int:
    from puzzlefs.registry import parse_remote
    from puzzlefs.registry._mount import mount_remote

    if args.legacy_mountpoint is not None:
        raise UsageError("mount docker://HOST/REPO:TAG MOUNTPOINT takes one mountpoint")
    mount_remote(
        parse_remote(args.image),
        args.mountpoint,
        client=_registry_options(args),
        cache=args.cache_dir,
        prefetch_all=args.prefetch == "all",
        prefetch_list=args.prefetch_list,
        record=args.record,
        verity_digest=_verity_hex(args.digest),
        options=args.options,
        foreground=args.foreground,
        init_pipe=args.init_pipe,
        log_file=args.log_file,
    )
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from puzzlefs.mount import mount

    if args.image.startswith("docker://"):
        return _mount_remote(args)
    remote_only = [args.prefetch != "none", args.prefetch_list, args.record, args.cache_dir]
    if any(remote_only):
        raise UsageError("--prefetch, --prefetch-list, --record and --cache-dir are for "
                         "mounts from a registry (docker://HOST/REPO:TAG)")  # fmt: skip
    persist = args.persist
    if args.legacy_mountpoint is not None:
        if args.writable and persist is None:
            # The mount-helper form: `mount OCI_DIR:TAG -w WRITABLE_DIR MOUNTPOINT`.
            persist, mountpoint = args.mountpoint, args.legacy_mountpoint
            oci_dir, tag = _image_ref(args.image)
        else:  # the seed talk's `mount OCI_DIR TAG MOUNTPOINT`
            if not (Path(args.image) / "oci-layout").is_file():
                raise UsageError(
                    f"three arguments are OCI_DIR TAG MOUNTPOINT, and {args.image} is not an"
                    " OCI layout (or give -w WRITABLE_DIR: OCI_DIR:TAG -w DIR MOUNTPOINT)"
                )
            oci_dir, tag, mountpoint = Path(args.image), args.mountpoint, args.legacy_mountpoint
    else:
        (oci_dir, tag), mountpoint = _image_ref(args.image), args.mountpoint
    mount(
        oci_dir,
        tag,
        mountpoint,
        verity_digest=_verity_hex(args.digest),
        options=args.options,
        foreground=args.foreground,
        init_pipe=args.init_pipe,
        log_file=args.log_file,
        writable=args.writable,
        persist=persist,
    )
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from puzzlefs.mount import umount

    umount(args.mountpoint)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from puzzlefs.chunking import ChunkParams, parse_size
    from puzzlefs.importer import import_image

    src_dir, src_tag = _image_ref(args.source)
    oci_dir, tag = _image_ref(args.image)
    params = ChunkParams.parse(args.chunk_sizes) if args.chunk_sizes else None
    max_layer = parse_size(args.max_layer_size) if args.max_layer_size is not None else None
    result = import_image(
        src_dir,
        src_tag,
        oci_dir,
        tag,
        compress=_compression(args),
        params=params,
        tmp_dir=args.tmpdir,
        max_layer_size=max_layer,
        progress=True,
        mtimes=not args.no_mtimes,
    )
    print(f"puzzlefs image manifest digest: {result.manifest_verity}")
    return 0


def _registry_options(args: argparse.Namespace) -> ClientOptions:
    from puzzlefs.registry import ClientOptions

    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    return ClientOptions(
        insecure=args.insecure,
        plain_http=args.plain_http,
        ca_file=args.ca_cert,
        authfile=args.authfile,
        connections=args.jobs,
    )


def _copy(args: argparse.Namespace, src: str, dest: str, verb: str) -> int:
    from puzzlefs.registry import copy_image, parse_ref

    options = _registry_options(args)
    source, target = parse_ref(src), parse_ref(dest)
    report = copy_image(
        source,
        target,
        options,
        mount_from=getattr(args, "mount_from", None),
        progress=Progress(verb),
        all_platforms=getattr(args, "all", False),
    )
    print(f"{target}: {report.summary('copied' if verb == 'copying' else verb[:-3] + 'ed')}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    if not args.dest.startswith("docker://"):
        raise UsageError(f"push goes to docker://HOST/REPO:TAG, got {args.dest!r}")
    return _copy(args, args.image, args.dest, "pushing")


def cmd_pull(args: argparse.Namespace) -> int:
    if not args.source.startswith("docker://"):
        raise UsageError(f"pull comes from docker://HOST/REPO:TAG, got {args.source!r}")
    return _copy(args, args.source, args.image, "pulling")


def cmd_copy(args: argparse.Namespace) -> int:
    return _copy(args, args.source, args.dest, "copying")


def _add_all_platforms(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--all",
        action="store_true",
        help="from an index of platforms, copy every platform's image and tag the index "
        "(default: this machine's image, its manifest tagged, as skopeo copies it)",
    )


def _add_registry_options(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the registry's TLS certificate, and use plain http where it "
        "does not speak TLS",
    )
    p.add_argument(
        "--plain-http",
        action="store_true",
        help="speak plain http (without asking, only to loopback registries that have no TLS)",
    )
    p.add_argument("--ca-cert", metavar="FILE", help="also trust the CA certificates in FILE")
    p.add_argument(
        "--authfile",
        metavar="FILE",
        help="credentials (auths of base64 user:password) from FILE instead of "
        "$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, "
        "~/.config/containers/auth.json, ~/.docker/config.json",
    )
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=16,
        metavar="N",
        help="requests in flight on kept-alive connections (default 16)",
    )


def _add_registry_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ps = _command(
        sub,
        "push",
        "upload an image to a registry",
        "Only the blobs the registry lacks are sent (many at a time on kept-alive "
        "connections), then the manifest(s), the tag last. TLS by default; credentials "
        "from the files docker and podman write (see --authfile).",
        [
            "puzzlefs push oci:v1 docker://registry.example:5000/team/app:v1",
            "puzzlefs push --mount-from team/base oci:v2 docker://registry.example/team/app:v2",
        ],
        cmd_push,
    )
    ps.add_argument("image", metavar="OCI_DIR:TAG")
    ps.add_argument("dest", metavar="docker://HOST[:PORT]/REPO[:TAG]")
    ps.add_argument(
        "--mount-from",
        metavar="REPO",
        help="mount the blobs another repository of the same registry has instead of "
        "uploading them",
    )
    _add_registry_options(ps)

    pl = _command(
        sub,
        "pull",
        "download an image from a registry",
        "Every blob is checked against its sha256 and stored as soon as it is complete, "
        "so an interrupted pull run again fetches only what is missing; the tag is set "
        "last.",
        ["puzzlefs pull docker://registry.example/team/app:v1 oci:v1"],
        cmd_pull,
    )
    pl.add_argument("source", metavar="docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")
    pl.add_argument("image", metavar="OCI_DIR:TAG")
    _add_all_platforms(pl)
    _add_registry_options(pl)

    cp = _command(
        sub,
        "copy",
        "copy an image between OCI layouts and registries",
        "SRC and DEST are docker://HOST[:PORT]/REPO[:TAG] or oci:OCI_DIR:TAG (or "
        "OCI_DIR:TAG), as skopeo names them; between two repositories of one registry, "
        "blobs are mounted, not uploaded.",
        [
            "puzzlefs copy oci:images:v1 docker://registry.example/app:v1",
            "puzzlefs copy docker://registry.example/app:v1 docker://registry.example/app2:v1",
        ],
        cmd_copy,
    )
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("dest", metavar="DEST")
    cp.add_argument(
        "--mount-from",
        metavar="REPO",
        help="to a registry: mount blobs from this repository of it instead of uploading",
    )
    _add_all_platforms(cp)
    _add_registry_options(cp)


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    examples: Sequence[str],
    func: Handler,
    **kw: object,
) -> argparse.ArgumentParser:
    """A subcommand with its one-line summary, a description and examples."""
    text = "\n".join(f"  {e}" for e in examples)
    cmd = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ". " + description,
        epilog=f"examples:\n{text}",
        formatter_class=_Help,
        **kw,  # type: ignore[arg-type]
    )
    cmd.set_defaults(func=func)
    return cmd


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions wrapped to the terminal, examples kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        return "\n\n".join(
            para  # a list of examples, one per indented line: as written
            if "\n  " in para
            else textwrap.fill(para, width, initial_indent=indent, subsequent_indent=indent)
            for para in text.split("\n\n")
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="puzzlefs",
        description="Build, mount and extract PuzzleFS container images (format v3): "
        "content-defined chunks stored once each in an OCI image layout, mounted "
        "without extracting. `puzzlefs COMMAND --help` explains each command.",
    )
    p.add_argument("--version", action="version", version=f"puzzlefs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = _command(
        sub,
        "build",
        "build an image from a directory tree",
        "The tree is walked in a canonical order and all file contents are cut, as one "
        "stream, into content-defined chunks, each stored once by its sha256 under "
        "OCI_DIR/blobs/sha256 (OCI_DIR is created if needed; many tags share one store). "
        "It prints the fs-verity digest of the manifest: the one value that "
        "authenticates the whole image (mount --digest, extract --digest). The same tree "
        "gives the same image, byte for byte. A failed build leaves every tag as it was."
        "\n\nModification times are kept (--no-mtimes leaves them out); a build on a "
        "base (-b) stores a layer of what changed. Progress shows on a terminal.",
        [
            "puzzlefs build rootfs/ oci:v1",
            "puzzlefs build -c rootfs/ oci:v1-zstd",
            "puzzlefs build -b v1 rootfs/ oci:v2",
        ],
        cmd_build,
    )
    b.add_argument("rootfs", metavar="ROOTFS", help="the directory tree to build")
    b.add_argument("image", metavar="OCI_DIR:TAG", help="where to store it, and its tag")
    b.add_argument("legacy_tag", nargs="?", metavar="TAG", help=argparse.SUPPRESS)
    _add_compression_options(b)
    _add_mtimes_option(b)
    b.add_argument(
        "-b",
        "--base-layer",
        metavar="BASE_TAG",
        help="build on top of this tag of OCI_DIR: only what changed is stored",
    )
    b.add_argument(
        "--chunk-sizes",
        metavar="MIN:AVG:MAX",
        help="FastCDC chunk sizes (default: the base's, else 16K:64K:256K, the reference's)",
    )

    x = _command(
        sub,
        "extract",
        "write an image's tree into a directory",
        "Every inode type, owners (as root), modes including setuid/setgid/sticky, "
        "xattrs, hard links, holes and modification times. Every chunk is checked "
        "against its sha256; with --digest, against the whole fs-verity chain. Hostile "
        "images are refused and can never write outside DEST.",
        ["puzzlefs extract oci:v1 /tmp/rootfs", "puzzlefs extract -d HEX oci:v1 /tmp/rootfs"],
        cmd_extract,
    )
    x.add_argument("image", metavar="OCI_DIR:TAG")
    x.add_argument("dest", metavar="DEST", help="a new or empty directory")
    x.add_argument(
        "-d", "--digest", metavar="HEX", help="check the whole fs-verity chain against this"
    )

    t = _command(
        sub,
        "export",
        "write an image's tree as a reproducible tar",
        "POSIX (pax) format, sorted, numeric owners, the image's modification times, "
        "xattrs, hard links as links. Sockets cannot be stored in a tar: they are left "
        "out with a warning. Written to a temporary file renamed into place.",
        ["puzzlefs export oci:v1 v1.tar", "puzzlefs export oci:v1 - | tar -tvf -"],
        cmd_export,
    )
    t.add_argument("image", metavar="OCI_DIR:TAG")
    t.add_argument("out", metavar="OUT.tar", help="the tar to write, - for stdout")
    t.add_argument("-d", "--digest", metavar="HEX", help="check the fs-verity chain")

    v = _command(
        sub,
        "verify",
        "check that every blob of an image is present and intact",
        "Every blob the image needs (manifest, config, rootfs, times, every chunk any "
        "layer uses) for presence, size and sha256, and with --digest the whole "
        "fs-verity chain. It lists every problem and exits 1 if there is any. Given "
        "an OCI_DIR without a tag, it checks every tag of it.",
        [
            "puzzlefs verify oci:v1",
            "puzzlefs verify --digest HEX --json oci:v1",
            "puzzlefs verify oci",
        ],
        cmd_verify,
    )
    v.add_argument("image", metavar="OCI_DIR[:TAG]")
    v.add_argument(
        "-d", "--digest", metavar="HEX", help="also check the fs-verity chain from this digest"
    )
    v.add_argument("--json", action="store_true", help="print a JSON report")

    u = _command(
        sub,
        "du",
        "what each tag stores, what tags share, and what the store saves against tars",
        "Per tag: its files and their bytes, the size of the tar the same tree makes, "
        "the bytes it needs in the store (and how much of that is metadata), the bytes "
        "other listed tags need too, and what only it needs (what removing it and "
        "running gc would free). Sizes are human-readable on a terminal (-h), bytes "
        "otherwise (--bytes).",
        ["puzzlefs du oci", "puzzlefs du oci v1 v2", "puzzlefs du --json oci"],
        cmd_du,
        add_help=False,
    )
    u.add_argument("--help", action="help", help="show this help message and exit")
    u.add_argument("oci_dir", metavar="OCI_DIR")
    u.add_argument("tags", nargs="*", metavar="TAG", help="default: every tag")
    u.add_argument("-h", "--human", dest="human", action="store_true", default=None,
                   help="sizes in KiB, MiB, GiB (the default on a terminal)")  # fmt: skip
    u.add_argument("--bytes", dest="human", action="store_false", help="sizes in bytes")
    u.add_argument("--json", action="store_true", help="print JSON (sizes in bytes)")

    n = _command(
        sub,
        "inspect",
        "show what an image is",
        "Its manifest digest and fs-verity digest (what mount --digest takes), sizes, "
        "chunk count, compression and chunk sizes, metadata layers, times, inode counts "
        "and annotations, as skopeo inspect and unsquashfs -s show them.",
        ["puzzlefs inspect oci:v1", "puzzlefs inspect --json oci:v1"],
        cmd_inspect,
    )
    n.add_argument("image", metavar="OCI_DIR:TAG")
    n.add_argument("--json", action="store_true", help="print JSON")

    ls = _command(
        sub,
        "ls",
        "list the paths of an image",
        "Every path at and below PATH (default: the whole image), as unsquashfs -l and "
        "tar -t list them; -l adds mode, owner/group, size (major,minor for devices), "
        "modification time (UTC) and symlink targets, as tar -tv.",
        ["puzzlefs ls oci:v1", "puzzlefs ls -l oci:v1 usr/bin"],
        cmd_ls,
    )
    ls.add_argument("image", metavar="OCI_DIR:TAG")
    ls.add_argument("path", metavar="PATH", nargs="?", help="a path inside the image")
    ls.add_argument("-l", "--long", action="store_true", help="long listing")

    d = _command(
        sub,
        "diff",
        "show what changed between two images",
        "The paths the second adds, removes and changes (type, mode, owner, size, "
        "content, xattrs, mtime), and the stored bytes it needs that the first does "
        "not. SECOND is OCI_DIR:TAG, or a TAG of FIRST's OCI_DIR.",
        [
            "puzzlefs diff oci:v1 v2",
            "puzzlefs diff oci:v1 other-oci:v1",
            "puzzlefs diff --json oci:v1 v2",
        ],
        cmd_diff,
    )
    d.add_argument("first", metavar="FIRST")
    d.add_argument("second", metavar="SECOND")
    d.add_argument("--json", action="store_true", help="print JSON")

    e = _command(
        sub,
        "enable-fs-verity",
        "enable kernel fs-verity on every blob and check the chain",
        "Enables fs-verity on the manifest, rootfs, config and every chunk blob, and "
        "checks each measurement against the chain that starts at MANIFEST_DIGEST. On "
        "a kernel or filesystem without fs-verity it says so and fails.",
        ["puzzlefs enable-fs-verity oci:v1 HEX"],
        cmd_enable_fs_verity,
    )
    e.add_argument("image", metavar="OCI_DIR:TAG")
    e.add_argument("digest", metavar="MANIFEST_DIGEST", help="as printed by build")

    tg = _command(
        sub,
        "tags",
        "list the tags of an OCI layout",
        "One per line, sorted; --json adds each manifest's digest and size.",
        ["puzzlefs tags oci", "puzzlefs tags --json oci"],
        cmd_tags,
    )
    tg.add_argument("oci_dir", metavar="OCI_DIR")
    tg.add_argument("--json", action="store_true", help="with manifest digests and sizes")

    r = _command(
        sub,
        "rm",
        "remove tags (their blobs stay until gc)",
        "Remove tags from an OCI layout's index.json. The blobs they used stay until "
        "`puzzlefs gc OCI_DIR` removes those no other tag needs.",
        ["puzzlefs rm oci:v1", "puzzlefs rm oci:v1 oci:v2 && puzzlefs gc oci"],
        cmd_rm,
    )
    r.add_argument("images", nargs="+", metavar="OCI_DIR:TAG")

    g = _command(
        sub,
        "gc",
        "remove the blobs no tag needs",
        "Remove every blob of OCI_DIR that no manifest in its index.json reaches (left "
        "by rebuilt or removed tags, or by failed builds). It waits for builds in "
        "progress to commit first, and they wait for it. It refuses a store shared "
        "with other layouts (blobs/sha256 a symlink): their tags cannot be seen here.",
        ["puzzlefs gc --dry-run oci", "puzzlefs gc oci"],
        cmd_gc,
    )
    g.add_argument("oci_dir", metavar="OCI_DIR")
    g.add_argument("-n", "--dry-run", action="store_true", help="only say what would go")
    g.add_argument("--json", action="store_true", help="print a JSON report")

    m = _command(
        sub,
        "mount",
        "mount an image with FUSE, read-only or with a writable overlay",
        "In the background (the default) the command returns once the mount is live, "
        "or fails with the reason, leaving nothing mounted; the daemon then logs to "
        "syslog (/dev/log), or to --log-file. With -f it stays in the foreground, logs "
        "to stderr, and unmounts on Ctrl-C or SIGTERM. `puzzlefs umount`, or SIGTERM to "
        "the daemon, unmounts cleanly."
        "\n\nThe mount is nosuid,nodev by default, as FUSE mounts are: for chroot or "
        "container use (device nodes such as /dev/null, setuid binaries) give -o "
        "dev,suid. Files show the modification times the image keeps (0, the epoch, "
        "for images built with --no-mtimes or by the reference)."
        "\n\n-w and -p put an overlayfs on top (root only): -w with a temporary upper "
        "layer that umount removes, -p with one kept in UPPERDIR. The mount-helper form "
        "`mount OCI_DIR:TAG -w DIR MOUNTPOINT` is -p DIR.",
        [
            "puzzlefs mount oci:v1 /mnt/image",
            "puzzlefs mount -o dev,suid oci:v1 /mnt/root && chroot /mnt/root sh",
            "puzzlefs mount -w oci:v1 /mnt/writable",
            "puzzlefs mount --digest HEX oci:v1 /mnt/verified",
            "puzzlefs umount /mnt/image",
        ],
        cmd_mount,
    )
    m.add_argument("image", metavar="OCI_DIR:TAG")
    m.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    m.add_argument("legacy_mountpoint", nargs="?", help=argparse.SUPPRESS)
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument(
        "-o",
        dest="options",
        metavar="OPT,...",
        action="append",
        default=[],
        help="mount options: allow_other, allow_root, dev, suid, exec, noatime, fsname=, "
        "subtype=, max_read=, nonempty; always ro and default_permissions, and by "
        "default nosuid,nodev,fsname=OCI_DIR:TAG,subtype=puzzlefs",
    )
    m.add_argument(
        "-d",
        "--digest",
        metavar="HEX",
        help="the manifest's fs-verity digest (as build printed it): refuse to mount on a "
        "mismatch, and check every chunk before serving it (EIO on a mismatch)",
    )
    m.add_argument(
        "-i",
        "--init-pipe",
        metavar="FIFO",
        help="write 's' to FIFO once the mount is live, 'f' if it failed",
    )
    m.add_argument(
        "--log-file",
        metavar="FILE",
        help="append the daemon's log to FILE (default: syslog; with -f: stderr)",
    )
    m.add_argument(
        "-w",
        "--writable",
        action="store_true",
        help="make the mount writable: an overlayfs whose upper layer is a temporary"
        " directory, removed by umount (root only)",
    )
    m.add_argument(
        "-p",
        "--persist",
        metavar="UPPERDIR",
        help="make the mount writable and keep the changes in UPPERDIR, across mounts (root only)",
    )
    reg = m.add_argument_group(
        "from a registry (docker://HOST[:PORT]/REPO[:TAG])",
        "The image is live once its metadata is fetched; each chunk is fetched on first "
        "use (a miss reads ahead) into a local OCI layout, "
        "$XDG_CACHE_HOME/puzzlefs/registry/HOST/REPO, where later mounts, pulls and "
        "copies find it. A fetch that keeps failing gives EIO to its reader.",
    )
    reg.add_argument(
        "--prefetch",
        choices=("none", "all"),
        default="none",
        help="all: fetch every chunk in the background (in stream order) once live",
    )
    reg.add_argument(
        "--prefetch-list",
        metavar="FILE",
        help="fetch the chunks FILE lists (as --record wrote them) first, in the background",
    )
    reg.add_argument(
        "--record",
        metavar="FILE",
        help="append each chunk's digest to FILE the first time a reader uses it",
    )
    reg.add_argument("--cache-dir", metavar="DIR", help="instead of the cache directory above")
    _add_registry_options(reg)

    um = _command(
        sub,
        "umount",
        "unmount a puzzlefs mount",
        "Refuses anything that is not a puzzlefs mount. A writable mount (-w, -p) goes "
        "with its overlay and, for -w, its temporary upper layer. A busy mount is left "
        "as it is, with an error saying so.",
        ["puzzlefs umount /mnt/image"],
        cmd_umount,
    )
    um.add_argument("mountpoint", metavar="MOUNTPOINT")

    i = _command(
        sub,
        "import",
        "import an OCI image of tar layers (docker, skopeo, umoci, buildah)",
        "Import an OCI image layout whose layers are tars (plain, gzip or zstd; OCI or "
        "Docker media types; an image index gives linux on this machine's architecture) "
        "as a puzzlefs image, without extracting it: the layers are applied with the OCI "
        "whiteout rules and the result equals `build` of the unpacked tree. Every blob "
        "is checked against its digest; the uncompressed layers are spooled in a "
        "temporary directory, removed afterwards.",
        [
            "skopeo copy docker://debian:bookworm oci:debian:bookworm",
            "puzzlefs import debian:bookworm oci:bookworm",
        ],
        cmd_import,
    )
    i.add_argument("source", metavar="SRC_OCI_DIR:TAG", help="the image to import")
    i.add_argument("image", metavar="OCI_DIR:TAG", help="where to store it, and its tag")
    _add_compression_options(i)
    _add_mtimes_option(i)
    i.add_argument(
        "--chunk-sizes",
        metavar="MIN:AVG:MAX",
        help="FastCDC chunk sizes (default: 16K:64K:256K, the reference's)",
    )
    i.add_argument(
        "--tmpdir",
        metavar="DIR",
        help="where to spool the uncompressed layers (default: $TMPDIR, else /var/tmp)",
    )
    i.add_argument(
        "--max-layer-size",
        metavar="SIZE",
        help="refuse a layer that expands to more than SIZE uncompressed (sparse files"
        " at their full size), e.g. 10G; default: what the spool's filesystem has free"
        " (the spool never takes more than that, less a reserve, in any case)",
    )
    _add_registry_parsers(sub)
    return p


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


class _Warnings(logging.Handler):
    """Library warnings (an index rebuilt, a problem hidden) as ``warning:`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM and SIGHUP unwind like Ctrl-C: a build stops its workers, an extract
    # or export removes what it wrote, and the exit code says which signal it was.
    # (The entry point, puzzlefs.__main__, leaves SIGINT at its default action until
    # here: now it becomes KeyboardInterrupt, caught below.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_Warnings(logging.WARNING))
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # see puzzlefs._entry
        parser = _parser()
        args = parser.parse_args(argv)
        func: Handler = args.func
        return func(args)
    except PuzzleFSError as e:
        return _fail(e, str(e), e.exit_code)
    except BrokenPipeError:  # `puzzlefs ls ... | head`: the reader has all it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return _fail(e, f"{e.strerror or e}{where}", EXIT_ERROR)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as e:
        print(f"Error: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug: still one line, the traceback on request
        return _fail(
            e,
            f"internal error: {type(e).__name__}: {e} (PUZZLEFS_DEBUG=1 shows more)",
            EXIT_INTERNAL,
        )


def _fail(e: BaseException, message: str, code: int) -> int:
    if os.environ.get("PUZZLEFS_DEBUG"):
        raise e
    print(f"Error: {one_line(message)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
