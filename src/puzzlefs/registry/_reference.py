"""Image references as skopeo names them: ``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]``
for a registry, ``oci:DIR:TAG`` (or a bare ``DIR:TAG``) for a local layout.

As containers/image reads a name, its first part is the registry only if it has a
``.`` or a ``:`` or is ``localhost``; otherwise the registry is Docker Hub, whose
one-part repositories are under ``library/`` (``docker://alpine`` is
``docker.io/library/alpine``), served at ``registry-1.docker.io``. Every part is
checked against the distribution spec's grammar before it goes into a URL or a path.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from puzzlefs.digest import Digest
from puzzlefs.errors import UsageError
from puzzlefs.oci.layout import parse_image_ref

__all__ = ["LocalRef", "RemoteRef", "is_loopback", "parse_ref", "parse_remote"]

DOCKER = "docker://"
OCI = "oci:"
DEFAULT_TAG = "latest"
DOCKER_HUB_API = "registry-1.docker.io"  # where Docker Hub's distribution API answers
# The names Docker Hub goes by (its credentials are kept under https://index.docker.io/v1/).
DOCKER_HUB = frozenset({"docker.io", "index.docker.io", DOCKER_HUB_API})

# The distribution spec's grammar (distribution/reference).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOSTNAME = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
MAX_REPO = 255


@dataclass(frozen=True)
class RemoteRef:
    """A repository on a registry, and a tag or a digest in it."""

    host: str  # as written: name or address, with :PORT if given ([v6] bracketed)
    repo: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    @property
    def hostname(self) -> str:
        """The host without its port (and without brackets)."""
        host = self.host
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rpartition(":")[0] if ":" in host else host

    def __str__(self) -> str:
        ref = f"@{self.digest}" if self.digest is not None else f":{self.reference}"
        return f"{DOCKER}{self.host}/{self.repo}{ref}"


@dataclass(frozen=True)
class LocalRef:
    path: Path
    tag: str

    def __str__(self) -> str:
        return f"{OCI}{self.path}:{self.tag}"


def parse_remote(text: str) -> RemoteRef:
    """``docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`` (the tag defaults to latest)."""
    if not text.startswith(DOCKER):
        raise UsageError(f"expected docker://HOST/REPO:TAG, got {text!r}")
    rest = text[len(DOCKER) :]
    host, sep, path = rest.partition("/")
    if not sep or not (host == "localhost" or "." in host or ":" in host or "[" in host):
        host, path = DOCKER_HUB_API, rest  # a name without a registry: Docker Hub's
    elif host in DOCKER_HUB:
        host = DOCKER_HUB_API
    if not path:
        raise UsageError(f"{text!r}: expected docker://HOST[:PORT]/REPO[:TAG]")
    _check_host(host, text)
    digest = None
    tag = None
    if "@" in path:
        path, _, digest_text = path.partition("@")
        try:
            digest = Digest.parse(digest_text)
        except ValueError:
            raise UsageError(f"{text!r}: {digest_text!r} is not a sha256 digest") from None
    else:
        name, colon, maybe_tag = path.rpartition(":")
        if colon and "/" not in maybe_tag:
            path, tag = name, maybe_tag
            if not _TAG.fullmatch(tag):
                raise UsageError(f"{text!r}: invalid tag {tag!r}")
    if host == DOCKER_HUB_API and "/" not in path:
        path = f"library/{path}"
    if len(path) > MAX_REPO or not _REPO.fullmatch(path):
        raise UsageError(
            f"{text!r}: invalid repository name {path!r} (lowercase letters, digits, "
            "and . _ - between them, in /-separated parts)"
        )
    return RemoteRef(host, path, tag if digest is None else None, digest)


def parse_ref(text: str) -> RemoteRef | LocalRef:
    """A registry reference (``docker://``), or a local layout (``oci:DIR:TAG`` or
    ``DIR:TAG``)."""
    if text.startswith(DOCKER):
        return parse_remote(text)
    path, tag = parse_image_ref(text.removeprefix(OCI))
    return LocalRef(path, tag)


def _check_host(host: str, text: str) -> None:
    name = host
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise UsageError(f"{text!r}: unclosed [ in the host")
        try:
            ipaddress.IPv6Address(host[1:end])
        except ValueError:
            raise UsageError(f"{text!r}: {host[1:end]!r} is not an IPv6 address") from None
        port = host[end + 1 :]
        if port and not (port.startswith(":") and port[1:].isdigit()):
            raise UsageError(f"{text!r}: invalid port in {host!r}")
        return
    if ":" in host:
        name, _, port = host.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"{text!r}: invalid port in {host!r}")
    if not _HOSTNAME.fullmatch(name):
        raise UsageError(f"{text!r}: invalid registry host {host!r}")


def is_loopback(hostname: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: where plain http is allowed without asking."""
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False
