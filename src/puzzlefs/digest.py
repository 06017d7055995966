"""Content digests: the ``sha256:<hex>`` value type, validated before any path use."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from puzzlefs.errors import InvalidDigest

ALGORITHM = "sha256"
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A sha256 digest. Only 64 lowercase hex characters are ever accepted, so a
    Digest is always safe to use as a file name (no ``/``, no ``..``)."""

    hex: str

    def __post_init__(self) -> None:
        if not isinstance(self.hex, str) or not _HEX.fullmatch(self.hex):
            raise InvalidDigest(f"invalid sha256 digest: {_show(self.hex)}")

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<hex>`` (the OCI form)."""
        algo, sep, hexpart = text.partition(":")
        if not sep or algo != ALGORITHM:
            raise InvalidDigest(f"unsupported or malformed digest: {_show(text)}")
        return cls(hexpart)

    @classmethod
    def from_raw(cls, raw: bytes) -> Digest:
        if len(raw) != 32:
            raise InvalidDigest(f"a sha256 digest is 32 bytes, got {len(raw)}")
        return cls(raw.hex())

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        return cls(hashlib.sha256(data).hexdigest())

    @property
    def raw(self) -> bytes:
        return bytes.fromhex(self.hex)

    def __str__(self) -> str:
        return f"{ALGORITHM}:{self.hex}"


def _show(value: object) -> str:
    """A hostile value in a message: quoted, and cut short (it may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:72] + "...'"
