"""Content digests: the ``sha256:<hex>`` value type, validated before any path use."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from puzzlefs.errors import InvalidDigest

ALGORITHM = "sha256"
_HEX = re.compile(r"[0-9a-f]{64}")
_PREFIX = ALGORITHM + ":"
_TEXT_LENGTH = len(_PREFIX) + 64


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
        algo, sep, hexpart = text.partition(":")  # the rule all_valid applies to many
        if not sep or algo != ALGORITHM:
            raise InvalidDigest(f"unsupported or malformed digest: {_show(text)}")
        return cls(hexpart)

    @staticmethod
    def all_valid(texts: list[object]) -> bool:
        """Whether :meth:`parse` takes every one of ``texts``, checked in a few passes
        over them all, for lists of tens of thousands: each is the prefix and 64
        characters, and the hex parts together are what ``bytes.hex`` writes (lowercase
        hex, no spaces, which ``fromhex`` would skip)."""
        if not all(
            [type(t) is str and len(t) == _TEXT_LENGTH and t.startswith(_PREFIX) for t in texts]
        ):
            return False
        hexes = "".join(texts).replace(_PREFIX, "")  # type: ignore[arg-type]
        if len(hexes) != 64 * len(texts):  # a prefix inside a hex part
            return False
        try:
            return bytes.fromhex(hexes).hex() == hexes
        except ValueError:
            return False

    @staticmethod
    def raw_of(text: str) -> bytes:
        """The 32 bytes of a digest text :meth:`all_valid` accepted."""
        return bytes.fromhex(text[len(_PREFIX) :])

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
