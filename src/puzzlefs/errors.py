"""The exception tree of puzzlefs.

Every error the library raises on purpose derives from :class:`PuzzleFSError`, which
carries the process exit code the CLI should use and the errno a FUSE reader should
see. The CLI and the FUSE adapter translate errors in exactly one place each.

    PuzzleFSError
    ├── UsageError                 bad arguments (exit 2)
    ├── ImageError                 a corrupt, hostile or unsupported image
    │   ├── NotAnOCILayout
    │   ├── TagNotFound (KeyError)
    │   ├── BlobNotFound (KeyError)
    │   ├── InvalidDigest (ValueError)
    │   ├── DigestMismatch
    │   ├── VerityMismatch
    │   ├── UnsupportedVersion
    │   └── MetadataError          Cap'n Proto that does not decode, bad inodes, loops
    ├── BuildError                 the source tree cannot be built
    ├── ExtractError               the destination cannot be written safely
    ├── VerityUnsupported          the kernel or filesystem has no fs-verity
    ├── MountError
    └── RegistryError              a registry refused a request or could not be reached
        ├── RegistryUnreachable    connection errors, timeouts, 5xx: after the retries
        ├── RegistryAuthError      no credentials for a registry that asks, or refused
        └── RemoteNotFound (KeyError)  no such repository, tag or blob there

    Terminated (BaseException)     SIGTERM or SIGHUP: unwind as Ctrl-C does
"""

from __future__ import annotations

import errno as _errno


class PuzzleFSError(Exception):
    """Base class: a message for humans, an exit code for the CLI, an errno for FUSE."""

    exit_code: int = 1
    errno: int = _errno.EIO

    def __str__(self) -> str:
        # KeyError quotes its argument; our messages are sentences, never quoted.
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(PuzzleFSError):
    exit_code = 2
    errno = _errno.EINVAL


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


class UnsupportedVersion(ImageError):
    pass


class MetadataError(ImageError):
    pass


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
