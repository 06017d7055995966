"""The ``puzzlefs`` command: parse, call one library function, map errors to exits.

Errors are printed as one line, ``Error: <message>``, as the reference does; a
traceback only with ``PUZZLEFS_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from puzzlefs import __version__
from puzzlefs.errors import PuzzleFSError
from puzzlefs.oci import parse_image_ref
from puzzlefs.progress import Progress

Handler = Callable[[argparse.Namespace], int]


def _image_ref(text: str) -> tuple[Path, str]:
    return parse_image_ref(text)


def cmd_build(args: argparse.Namespace) -> int:
    from puzzlefs.builder import build
    from puzzlefs.chunking import DEFAULT_PARAMS, ChunkParams

    if args.legacy_tag is not None:  # the seed talk's `build ROOTFS OCI_DIR TAG`
        oci_dir, tag = Path(args.image), args.legacy_tag
    else:
        oci_dir, tag = _image_ref(args.image)
    params = ChunkParams.parse(args.chunk_sizes) if args.chunk_sizes else DEFAULT_PARAMS
    result = build(
        args.rootfs,
        oci_dir,
        tag,
        compress=args.compression,
        params=params,
        progress=Progress("building"),
    )
    print(f"puzzlefs image manifest digest: {result.manifest_verity}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from puzzlefs.extract import extract, warn
    from puzzlefs.reader import open_image

    oci_dir, tag = _image_ref(args.image)
    image = open_image(oci_dir, tag, verity_digest=args.digest)
    stats = extract(image, args.dest, progress=Progress("extracting"))
    warn(stats)
    return 0


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
    b.add_argument("-c", "--compression", action="store_true", help="store chunks zstd-compressed")
    b.add_argument(
        "--chunk-sizes",
        metavar="MIN:AVG:MAX",
        help="FastCDC chunk sizes (default 16K:64K:256K, the reference's)",
    )
    b.set_defaults(func=cmd_build)

    x = sub.add_parser("extract", help="write an image's tree into a directory")
    x.add_argument("image", metavar="OCI_DIR:TAG")
    x.add_argument("dest", metavar="DEST", help="a new or empty directory")
    x.add_argument(
        "-d", "--digest", metavar="HEX", help="check the whole fs-verity chain against this"
    )
    x.set_defaults(func=cmd_extract)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except PuzzleFSError as e:
        return _fail(e, str(e), e.exit_code)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return _fail(e, f"{e.strerror or e}{where}", 1)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return 130


def _fail(e: BaseException, message: str, code: int) -> int:
    if os.environ.get("PUZZLEFS_DEBUG"):
        raise e
    print(f"Error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
