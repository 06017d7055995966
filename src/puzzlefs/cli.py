"""The ``puzzlefs`` command: parse, call one library function, map errors to exits.

Errors are printed as one line, ``Error: <message>``, as the reference does; a
traceback only with ``PUZZLEFS_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from puzzlefs import __version__
from puzzlefs.errors import PuzzleFSError, Terminated, UsageError
from puzzlefs.oci import parse_image_ref
from puzzlefs.progress import Progress

if TYPE_CHECKING:
    from puzzlefs.compression import ZstdOptions
    from puzzlefs.registry import ClientOptions

Handler = Callable[[argparse.Namespace], int]


def _image_ref(text: str) -> tuple[Path, str]:
    return parse_image_ref(text)


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
    try:
        return ZstdOptions(
            parse_size(frame) if frame is not None else DEFAULT_FRAME_SIZE,
            int(level) if level is not None else DEFAULT_LEVEL,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


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
        oci_dir, tag = Path(args.image), args.legacy_tag
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
    stats = extract(image, args.dest, progress=Progress("extracting"))
    warn(stats)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from puzzlefs.export import export_tar
    from puzzlefs.reader import open_image

    oci_dir, tag = _image_ref(args.image)
    image = open_image(oci_dir, tag, verity_digest=_verity_hex(args.digest))
    if args.out == "-":
        export_tar(image, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return 0
    out = Path(args.out)
    # A temporary file beside the target, renamed into place: no half-written tar.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            export_tar(image, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from puzzlefs.reader.verify import verify

    oci_dir, tag = _image_ref(args.image)
    report = verify(oci_dir, tag, verity_digest=_verity_hex(args.digest))
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        for p in report.problems or []:
            print(f"{p.role} {p.blob or '-'}: {p.message}")
        state = "ok" if report.ok else f"{len(report.problems or [])} problem(s)"
        chain = " and fs-verity chain" if args.digest else ""
        checked = f"{report.checked} blobs, {report.bytes:,} bytes checked (sha256{chain})"
        print(f"{tag}: {checked}: {state}")
    return 0 if report.ok else 1


def cmd_du(args: argparse.Namespace) -> int:
    from puzzlefs.reader.usage import usage

    result = usage(args.oci_dir, args.tags or None)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    head = ("files", "logical", "tar", "stored", "metadata", "shared")
    print(f"{'tag':<24} " + " ".join(f"{h:>12}" for h in head))
    for t in result.tags:
        print(
            f"{t.tag:<24} {t.files:>12} {t.logical:>12,} {t.tar:>12,} {t.stored:>12,}"
            f" {t.metadata:>12,} {t.shared:>12,}"
        )
    print(f"unified: {result.unified:,} bytes ({result.unified_metadata:,} metadata)")
    print()
    print(result.table())
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
            print(t)
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
    if args.legacy_mountpoint is not None:  # the seed talk's `mount OCI_DIR TAG MOUNTPOINT`
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
    )
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    from puzzlefs.mount import umount

    umount(args.mountpoint)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from puzzlefs.chunking import ChunkParams
    from puzzlefs.importer import import_image

    src_dir, src_tag = _image_ref(args.source)
    oci_dir, tag = _image_ref(args.image)
    params = ChunkParams.parse(args.chunk_sizes) if args.chunk_sizes else None
    result = import_image(
        src_dir,
        src_tag,
        oci_dir,
        tag,
        compress=_compression(args),
        params=params,
        tmp_dir=args.tmpdir,
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
    ps = sub.add_parser(
        "push",
        help="upload an image to a registry",
        description="Upload OCI_DIR:TAG to a registry: only the blobs it lacks are sent "
        "(many at a time), then the manifest(s), the tag last.",
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
    ps.set_defaults(func=cmd_push)

    pl = sub.add_parser(
        "pull",
        help="download an image from a registry",
        description="Download an image into OCI_DIR under TAG: every blob is checked "
        "against its sha256 and stored as soon as it is complete, so an interrupted pull "
        "run again fetches only what is missing; the tag is set last.",
    )
    pl.add_argument("source", metavar="docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")
    pl.add_argument("image", metavar="OCI_DIR:TAG")
    _add_registry_options(pl)
    pl.set_defaults(func=cmd_pull)

    cp = sub.add_parser(
        "copy",
        help="copy an image between OCI layouts and registries",
        description="Copy an image: SRC and DEST are docker://HOST[:PORT]/REPO[:TAG] or "
        "oci:OCI_DIR:TAG (or OCI_DIR:TAG), as skopeo names them.",
    )
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("dest", metavar="DEST")
    cp.add_argument(
        "--mount-from",
        metavar="REPO",
        help="to a registry: mount blobs from this repository of it instead of uploading",
    )
    _add_registry_options(cp)
    cp.set_defaults(func=cmd_copy)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="puzzlefs",
        description="Build, mount and extract PuzzleFS container images (format v3).",
    )
    p.add_argument("--version", action="version", version=f"puzzlefs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser("build", help="build an image from a directory tree")
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
    b.set_defaults(func=cmd_build)

    x = sub.add_parser("extract", help="write an image's tree into a directory")
    x.add_argument("image", metavar="OCI_DIR:TAG")
    x.add_argument("dest", metavar="DEST", help="a new or empty directory")
    x.add_argument(
        "-d", "--digest", metavar="HEX", help="check the whole fs-verity chain against this"
    )
    x.set_defaults(func=cmd_extract)

    t = sub.add_parser("export", help="write an image's tree as a reproducible tar")
    t.add_argument("image", metavar="OCI_DIR:TAG")
    t.add_argument("out", metavar="OUT.tar", help="the tar to write, - for stdout")
    t.add_argument("-d", "--digest", metavar="HEX", help="check the fs-verity chain")
    t.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="check that every blob of an image is present and intact")
    v.add_argument("image", metavar="OCI_DIR:TAG")
    v.add_argument(
        "-d", "--digest", metavar="HEX", help="also check the fs-verity chain from this digest"
    )
    v.add_argument("--json", action="store_true", help="print a JSON report")
    v.set_defaults(func=cmd_verify)

    u = sub.add_parser("du", help="sizes per tag, sharing, and savings against tarballs")
    u.add_argument("oci_dir", metavar="OCI_DIR")
    u.add_argument("tags", nargs="*", metavar="TAG", help="default: every tag")
    u.add_argument("--json", action="store_true", help="print JSON")
    u.set_defaults(func=cmd_du)

    e = sub.add_parser(
        "enable-fs-verity", help="enable kernel fs-verity on every blob and check the chain"
    )
    e.add_argument("image", metavar="OCI_DIR:TAG")
    e.add_argument("digest", metavar="MANIFEST_DIGEST", help="as printed by build")
    e.set_defaults(func=cmd_enable_fs_verity)

    tg = sub.add_parser("tags", help="list the tags of an OCI layout")
    tg.add_argument("oci_dir", metavar="OCI_DIR")
    tg.add_argument("--json", action="store_true", help="with manifest digests and sizes")
    tg.set_defaults(func=cmd_tags)

    r = sub.add_parser(
        "rm",
        help="remove tags (their blobs stay until gc)",
        description="Remove tags from an OCI layout's index.json. The blobs they used "
        "stay until `puzzlefs gc OCI_DIR` removes those no other tag needs.",
    )
    r.add_argument("images", nargs="+", metavar="OCI_DIR:TAG")
    r.set_defaults(func=cmd_rm)

    g = sub.add_parser(
        "gc",
        help="remove the blobs no tag needs",
        description="Remove every blob of OCI_DIR that no manifest in its index.json "
        "reaches (left by rebuilt or removed tags, or by failed builds). It waits for "
        "builds in progress to commit first, and they wait for it.",
    )
    g.add_argument("oci_dir", metavar="OCI_DIR")
    g.add_argument("-n", "--dry-run", action="store_true", help="only say what would go")
    g.add_argument("--json", action="store_true", help="print a JSON report")
    g.set_defaults(func=cmd_gc)

    m = sub.add_parser(
        "mount",
        help="mount an image read-only with FUSE",
        description="Mount an image read-only with FUSE. In the background (the default) "
        "the command returns once the mount is live, or fails with the reason; the "
        "daemon then logs to syslog (/dev/log), or to --log-file. With -f it stays in "
        "the foreground, logs to stderr, and unmounts on Ctrl-C or SIGTERM. SIGTERM to "
        "the daemon, or `puzzlefs umount`, unmounts cleanly.",
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
        help="FUSE mount options (allow_other, allow_root, default_permissions, dev, suid, "
        "exec, noatime, fsname=, subtype=, nonempty, ...); always ro, and by default "
        "default_permissions,fsname=OCI_DIR:TAG,subtype=puzzlefs",
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
    m.set_defaults(func=cmd_mount)

    u = sub.add_parser("umount", help="unmount a puzzlefs mount")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
    u.set_defaults(func=cmd_umount)

    i = sub.add_parser(
        "import",
        help="import an OCI image of tar layers (docker, skopeo, umoci, buildah)",
        description="Import an OCI image layout whose layers are tars (plain, gzip or zstd; "
        "OCI or Docker media types; an image index gives linux on this machine's "
        "architecture) as a puzzlefs image, without extracting it: the layers are "
        "applied with the OCI whiteout rules and the result equals `build` of the "
        "unpacked tree. Every blob is checked against its digest; the uncompressed "
        "layers are spooled in a temporary directory, removed afterwards.",
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
    i.set_defaults(func=cmd_import)
    _add_registry_parsers(sub)
    return p


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM and SIGHUP unwind like Ctrl-C: a build stops its workers, an extract
    # or export removes what it wrote, and the exit code says which signal it was.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # see puzzlefs._entry
        parser = _parser()
        args = parser.parse_args(argv)
        func: Handler = args.func
        return func(args)
    except PuzzleFSError as e:
        return _fail(e, str(e), e.exit_code)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return _fail(e, f"{e.strerror or e}{where}", 1)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"Error: terminated by {signal.Signals(e.signum).name}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # a bug: still one line, the traceback on request
        return _fail(
            e, f"internal error: {type(e).__name__}: {e} (PUZZLEFS_DEBUG=1 shows more)", 70
        )


def _fail(e: BaseException, message: str, code: int) -> int:
    if os.environ.get("PUZZLEFS_DEBUG"):
        raise e
    print(f"Error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
