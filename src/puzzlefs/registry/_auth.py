"""Credentials and the registries' authentication challenges.

Credentials come from the files docker and podman write, looked up in the order podman
uses: ``--authfile`` or ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
``~/.config/containers/auth.json``, then docker's ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``. In each, as docker reads it: the registry's credential helper
(``credHelpers``), else the file's own store (``credsStore``), each run as docker runs
them (``docker-credential-NAME get``, the registry on stdin, JSON on stdout), else
``auths`` (the base64 of ``user:password``, or an ``identitytoken``). An identity token
(also what a helper gives as user ``<token>``) is an OAuth2 refresh token, traded at the
token service for an access token.

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
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from puzzlefs.errors import RegistryAuthError
from puzzlefs.registry._reference import DOCKER_HUB

HUB_KEY = "https://index.docker.io/v1/"  # the key docker keeps Docker Hub's credentials at

__all__ = ["Challenge", "Credentials", "auth_files", "find_credentials", "parse_challenge"]


HELPER_TIMEOUT = 60.0  # seconds a credential helper may take (it may ask the desktop)
TOKEN_USER = "<token>"  # a helper's user name for an identity token


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # the file (or helper) they came from, for messages
    identity_token: str | None = None  # an OAuth2 refresh token, for Bearer realms only

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
    host: str,
    authfile: str | os.PathLike[str] | None = None,
    missing_helpers: list[str] | None = None,
) -> Credentials | None:
    """The first credentials any auth file holds for ``host`` (``name[:port]``).
    An explicit ``authfile`` that cannot be read is an error; the usual places are
    simply skipped when missing. A credential helper a file names that is not
    installed is passed over (a stale ``credsStore`` must not stop anonymous pulls),
    and said in ``missing_helpers``, for the message should the registry ask."""
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
        found = _from_file(data, host, path, missing_helpers)
        if found is not None:
            return found
    return None


def _from_file(data: bytes, host: str, path: Path, missing: list[str] | None) -> Credentials | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RegistryAuthError(f"auth file {path} is not valid JSON") from None
    if not isinstance(obj, dict):
        return None
    host = _key_host(host)  # as the files' keys are compared: Docker Hub's names as one
    helpers = obj.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if isinstance(key, str) and _key_host(key) == host and isinstance(name, str):
                return _from_helper(name, key, path, missing)  # the registry's own: only it
    store = obj.get("credsStore")
    if isinstance(store, str) and store:
        found = _from_helper(store, _helper_key(obj.get("auths"), host), path, missing)
        if found is not None:
            return found
    return _from_auths(obj.get("auths"), host, path)


def _helper_key(auths: object, host: str) -> str:
    """What docker hands a store for ``host``: its key in ``auths`` if there is one
    (``https://index.docker.io/v1/`` for Docker Hub), else the host itself."""
    if isinstance(auths, dict):
        for key in auths:
            if isinstance(key, str) and _key_host(key) == host:
                return key
    return HUB_KEY if host == _key_host(HUB_KEY) else host


def _from_helper(
    name: str, server: str, path: Path, missing: list[str] | None
) -> Credentials | None:
    """``docker-credential-NAME get`` for ``server``: None if it has none for it, or
    is not installed."""
    program = f"docker-credential-{name}"
    if not name or "/" in name or shutil.which(program) is None:
        if missing is not None:
            missing.append(f"{program} (named in {path}) is not on PATH")
        return None
    try:
        done = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True,
            timeout=HELPER_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RegistryAuthError(f"credential helper {program} gave no answer in "
                                f"{HELPER_TIMEOUT:.0f} s") from None  # fmt: skip
    except OSError as e:
        raise RegistryAuthError(f"credential helper {program}: {e.strerror}") from None
    said = " ".join(done.stdout.decode(errors="replace").split())
    if done.returncode != 0:
        if "credentials not found" in said.lower():
            return None
        # Its words, unless they may hold the secret (an answer, then a failure).
        why = " ".join(done.stderr.decode(errors="replace").split())
        if not why and "secret" not in said.lower():
            why = said
        why = why[:200] or f"exit status {done.returncode}"
        raise RegistryAuthError(f"credential helper {program} failed: {why}")
    try:
        obj = json.loads(done.stdout)
    except ValueError:
        obj = None
    user = obj.get("Username") if isinstance(obj, dict) else None
    secret = obj.get("Secret") if isinstance(obj, dict) else None
    if not isinstance(user, str) or not isinstance(secret, str):
        raise RegistryAuthError(f"credential helper {program} answered no Username and Secret")
    source = f"credential helper {program}"
    if user == TOKEN_USER:
        return Credentials("", "", source, identity_token=secret)
    return Credentials(user, secret, source)


def _from_auths(auths: object, host: str, path: Path) -> Credentials | None:
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if not isinstance(key, str) or _key_host(key) != host or not isinstance(entry, dict):
            continue
        token = entry.get("identitytoken")
        if isinstance(token, str) and token:
            return Credentials("", "", str(path), identity_token=token)
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
    """``https://host:5000/v1/`` and ``host:5000`` both name ``host:5000``; each of
    Docker Hub's names names ``docker.io``."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    host = key.split("/", 1)[0]
    return "docker.io" if host in DOCKER_HUB else host


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
