"""The exception tree of puzzlefs.

Every error the library raises on purpose derives from :class:`PuzzleFSError`, which
carries the process exit code the CLI should use and the errno a FUSE reader should
see. The CLI and the FUSE adapter translate errors in exactly one place each. Anything
else that reaches the CLI is a bug: it exits with :data:`EXIT_INTERNAL`.

    PuzzleFSError                  exit 1 unless said otherwise
    ├── UsageError                 bad arguments (exit 2, EINVAL)
    │   └── OptionError (ValueError)  an option value out of range (zstd frame size...)
    ├── NotFound (KeyError)        a name or inode that does not exist, or was deleted
    │                              by a whiteout (ENOENT)
    ├── ImageError                 a corrupt, hostile or unsupported image (EIO)
    │   ├── NotAnOCILayout
    │   ├── TagNotFound (KeyError)     (ENOENT)
    │   ├── BlobNotFound (KeyError)    (ENOENT)
    │   ├── InvalidDigest (ValueError) (EINVAL)
    │   ├── DigestMismatch
    │   │   └── VerityMismatch
    │   ├── UnsafeFile             a layout file that is not a regular file (a FIFO, a
    │   │                          device, a symlink), or larger than it can be
    │   ├── UnsupportedVersion
    │   ├── MetadataError          Cap'n Proto that does not decode, bad inodes, loops
    │   └── LayerError             a source image of tar layers that cannot be imported
    │       └── LayerTooLarge      its layers expand past the spool's limit
    ├── BuildError                 the source tree cannot be built
    ├── ExtractError               the destination cannot be written safely
    ├── VerityUnsupported          the kernel or filesystem has no fs-verity (EOPNOTSUPP)
    ├── MountError
    └── RegistryError              a registry refused a request or could not be reached
        ├── RegistryUnreachable    connection errors, timeouts, 5xx: after the retries
        ├── RegistryAuthError      no credentials for a registry that asks, or refused
        └── RemoteNotFound (KeyError)  no such repository, tag or blob there

    Terminated (BaseException)     SIGTERM or SIGHUP: unwind as Ctrl-C does; exit 128+N
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "BlobNotFound",
    "BuildError",
    "DigestMismatch",
    "ExtractError",
    "ImageError",
    "InvalidDigest",
    "LayerError",
    "LayerTooLarge",
    "MetadataError",
    "MountError",
    "NotAnOCILayout",
    "NotFound",
    "OptionError",
    "PuzzleFSError",
    "RegistryAuthError",
    "RegistryError",
    "RegistryUnreachable",
    "RemoteNotFound",
    "TagNotFound",
    "Terminated",
    "UnsafeFile",
    "UnsupportedVersion",
    "UsageError",
    "VerityMismatch",
    "VerityUnsupported",
    "one_line",
]

EXIT_ERROR = 1  # what the reference exits with on any error
EXIT_USAGE = 2  # as argparse
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): a bug, never the input's fault
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def one_line(text: str) -> str:
    """A message as one terminal line: control characters (a newline in a file name
    or an xattr name from a hostile image), and bytes that are not UTF-8, escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class PuzzleFSError(Exception):
    """Base class: a message for humans, an exit code for the CLI, an errno for FUSE."""

    exit_code: int = EXIT_ERROR
    errno: int = _errno.EIO

    def __str__(self) -> str:
        # KeyError quotes its argument; our messages are sentences, never quoted.
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(PuzzleFSError):
    exit_code = EXIT_USAGE
    errno = _errno.EINVAL


class OptionError(UsageError, ValueError):
    """An option whose value is out of its range (raised where the value is checked,
    e.g. :class:`puzzlefs.compression.ZstdOptions`, so library callers get it too)."""


class NotFound(PuzzleFSError, KeyError):
    """A name or inode that does not exist (or was deleted by a whiteout)."""

    errno = _errno.ENOENT


class ImageError(PuzzleFSError):
    """The image is not what the format says it must be."""


class NotAnOCILayout(ImageError):
    pass


class TagNotFound(ImageError, KeyError):
    errno = _errno.ENOENT


class BlobNotFound(ImageError, KeyError):
    errno = _errno.ENOENT


class InvalidDigest(ImageError, ValueError):
    errno = _errno.EINVAL


class DigestMismatch(ImageError):
    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class VerityMismatch(DigestMismatch):
    pass


class UnsafeFile(ImageError):
    """A file of an OCI layout (a blob, index.json, oci-layout) that is not a regular
    file, or is larger than its descriptor or its kind allows: refused before any of
    it is read, so a FIFO cannot hang a reader and /dev/zero cannot fill its memory."""


class UnsupportedVersion(ImageError):
    pass


class MetadataError(ImageError):
    pass


class LayerError(ImageError):
    """A source image or one of its tar layers that cannot be imported safely."""


class LayerTooLarge(LayerError):
    """The layers expand to more than the spool may hold (``--max-layer-size``, or
    the free space of the spool directory)."""


class BuildError(PuzzleFSError):
    pass


class ExtractError(PuzzleFSError):
    pass


class VerityUnsupported(PuzzleFSError):
    errno = _errno.EOPNOTSUPP


class MountError(PuzzleFSError):
    pass


class RegistryError(PuzzleFSError):
    """A registry answered with an error (its own message is part of ours)."""


class RegistryUnreachable(RegistryError):
    """Connection refused or reset, a timeout, TLS failing, or 5xx answers: each request
    was retried with backoff first, so this is final for the operation."""

    errno = _errno.EIO


class RegistryAuthError(RegistryError):
    errno = _errno.EACCES


class RemoteNotFound(RegistryError, KeyError):
    errno = _errno.ENOENT


class Terminated(BaseException):
    """A termination signal arrived. Raised from the signal handler the CLI installs,
    so that every cleanup runs as for Ctrl-C (KeyboardInterrupt), then the process
    exits with 128 + the signal number, as a shell reports a killed command."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
