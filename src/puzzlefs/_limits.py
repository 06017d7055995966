"""What Linux can create, in one place: an import refuses what an extract would then
fail to write, and an extract says which limit an image broke."""

from __future__ import annotations

__all__ = [
    "MAX_MAJOR",
    "MAX_MINOR",
    "NAME_MAX",
    "PATH_MAX",
    "XATTR_NAMESPACES",
    "XATTR_NAME_MAX",
    "XATTR_SIZE_MAX",
    "device_in_range",
]

NAME_MAX = 255  # bytes in one path component
PATH_MAX = 4096  # with its terminating NUL: paths and link targets of at most 4095 bytes
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_NAMESPACES = (b"security.", b"system.", b"trusted.", b"user.")
# dev_t as mknod(2) takes it (the kernel's 32-bit encoding): 12 bits of major, 20 of minor.
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1


def device_in_range(major: int, minor: int) -> bool:
    return 0 <= major <= MAX_MAJOR and 0 <= minor <= MAX_MINOR
