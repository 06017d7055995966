"""Credentials and the registries' authentication challenges.

Credentials come from the files docker and podman write (``auths``: per registry, the
base64 of ``user:password``), looked up in the order podman uses: ``--authfile`` or
``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
``~/.config/containers/auth.json``, then docker's ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``. Credential helpers (``credsStore``) are not run.

A registry that wants credentials answers 401 with ``WWW-Authenticate``: ``Basic``
(send them on every request) or ``Bearer realm=...,service=...,scope=...`` (trade them,
or nothing for anonymous access, at the realm for a token for that scope, and send the
token): :mod:`puzzlefs.registry._client` runs those flows.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from puzzlefs.errors import RegistryAuthError

__all__ = ["Challenge", "Credentials", "auth_files", "find_credentials", "parse_challenge"]


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # the file they came from, for messages

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lowercased
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


def auth_files(authfile: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where credentials are looked for, in order."""
    if authfile is not None:
        return [Path(authfile)]
    files: list[Path] = []
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        files.append(Path(env))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        files.append(Path(runtime) / "containers" / "auth.json")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    files.append(Path(config) / "containers" / "auth.json")
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    files.append(Path(docker) / "config.json")
    return files


def find_credentials(
    host: str, authfile: str | os.PathLike[str] | None = None
) -> Credentials | None:
    """The first credentials any auth file holds for ``host`` (``name[:port]``).
    An explicit ``authfile`` that cannot be read is an error; the usual places are
    simply skipped when missing."""
    for path in auth_files(authfile):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if authfile is not None:
                raise RegistryAuthError(f"auth file {path} does not exist") from None
            continue
        except OSError as e:
            if authfile is not None:
                raise RegistryAuthError(f"auth file {path}: {e.strerror}") from None
            continue
        found = _from_auths(data, host, path)
        if found is not None:
            return found
    return None


def _from_auths(data: bytes, host: str, path: Path) -> Credentials | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RegistryAuthError(f"auth file {path} is not valid JSON") from None
    auths = obj.get("auths") if isinstance(obj, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if not isinstance(key, str) or _key_host(key) != host or not isinstance(entry, dict):
            continue
        encoded = entry.get("auth")
        if isinstance(encoded, str) and encoded:
            try:
                raw = base64.b64decode(encoded, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise RegistryAuthError(f"auth file {path}: the auth of {key} is not "
                                        "base64 of user:password") from None  # fmt: skip
            user, sep, password = raw.partition(":")
            if not sep:
                raise RegistryAuthError(f"auth file {path}: the auth of {key} has no ':'")
            return Credentials(user, password, str(path))
        name, secret = entry.get("username"), entry.get("password")
        if isinstance(name, str) and isinstance(secret, str):
            return Credentials(name, secret, str(path))
    return None


def _key_host(key: str) -> str:
    """``https://host:5000/v1/`` and ``host:5000`` both name ``host:5000``."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    return key.split("/", 1)[0]


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` value: its scheme and parameters
    (quoted values may hold commas, as a scope with ``pull,push`` does)."""
    text = header.strip()
    scheme, _, rest = text.partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        start = i
        while i < n and rest[i] not in "=, ":
            i += 1
        name = rest[start:i].strip().lower()
        if i >= n or rest[i] != "=":
            if name:  # a token68, or the next challenge's scheme: stop here
                break
            continue
        i += 1
        if i < n and rest[i] == '"':
            i += 1
            value = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1  # the closing quote
            params[name] = "".join(value)
        else:
            start = i
            while i < n and rest[i] != ",":
                i += 1
            params[name] = rest[start:i].strip()
    return Challenge(scheme.lower(), params)
