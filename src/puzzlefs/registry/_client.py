"""One registry, spoken to through the OCI distribution API with httpx.

Every request has timeouts (connect, read, write, pool), and every operation (a blob
GET, a whole upload, a manifest PUT) is retried with exponential backoff on connection
errors, timeouts, 408/429 and 5xx answers, within a bounded number of attempts and a
bounded time; then :class:`~puzzlefs.errors.RegistryUnreachable`. Other answers are
final: 404 is :class:`~puzzlefs.errors.RemoteNotFound`, 401/403 after the challenge
flows :class:`~puzzlefs.errors.RegistryAuthError`, anything else a
:class:`~puzzlefs.errors.RegistryError` carrying the registry's own error code.

One ``httpx.Client`` (a pool of kept-alive connections) is shared by the threads of a
transfer; a process that forked makes its own on first use (connections are never
shared across processes).

The scheme: https, verified against the system's CAs, ``--ca-cert`` and the
``certs.d/HOST/*.crt`` files docker and podman read; ``insecure`` skips verification.
Plain http only when asked (``plain_http``), or for a loopback host or an
``insecure`` one whose port does not speak TLS at all (as docker treats its
"insecure registries"); a certificate that fails verification is an error, never a
reason to fall back to plain http.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from puzzlefs.digest import Digest
from puzzlefs.errors import (
    DigestMismatch,
    ImageError,
    RegistryAuthError,
    RegistryError,
    RegistryUnreachable,
    RemoteNotFound,
)
from puzzlefs.oci.layout import INDEX_TYPES, MANIFEST_TYPES, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST
from puzzlefs.registry._auth import Challenge, Credentials, find_credentials, parse_challenge
from puzzlefs.registry._reference import is_loopback

__all__ = ["ClientOptions", "Registry", "MANIFEST_ACCEPT"]

log = logging.getLogger(__name__)
# httpx logs every request at INFO: a mount's log would be all requests.
logging.getLogger("httpx").setLevel(logging.WARNING)

MANIFEST_ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
MAX_MANIFEST = 64 * 1024 * 1024  # what we accept; registries refuse over 4 MiB
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_DELAY = 4.0
_CERTS_D = ("/etc/containers/certs.d", "/etc/docker/certs.d")


@dataclass(frozen=True)
class ClientOptions:
    insecure: bool = False  # TLS without verification; plain http where TLS is absent
    plain_http: bool = False  # http only
    ca_file: str | None = None  # more CAs to trust
    authfile: str | None = None  # instead of the usual auth files
    connections: int = 16  # kept-alive connections, and requests in flight
    connect_timeout: float = 5.0
    timeout: float = 30.0  # read, write and waiting for a pooled connection
    attempts: int = 6  # per operation
    backoff: float = 0.25  # the first delay; doubles up to 4 s
    max_elapsed: float = 45.0  # no new attempt after this long
    credentials: Credentials | None = field(default=None, compare=False)  # else from files


class _Transient(Exception):
    """Worth another attempt: a connection problem or a 408/429/5xx answer."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Registry:
    """The distribution API of one registry host (``name[:port]``)."""

    def __init__(self, host: str, options: ClientOptions | None = None) -> None:
        self.host = host
        self.options = options or ClientOptions()
        hostname = host[1 : host.index("]")] if host.startswith("[") else host.rpartition(":")[0]
        self.hostname = hostname or host
        self.loopback = is_loopback(self.hostname)
        self._creds = self.options.credentials
        self._creds_looked = self._creds is not None
        self._missing_helpers: list[str] = []  # credential helpers named but not installed
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._pid = 0
        self._base: str | None = None
        self._base_lock = threading.Lock()
        self._basic = False  # the registry asked for Basic credentials
        self._bearer: Challenge | None = None  # or for tokens from this realm
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, expiry)
        self._token_lock = threading.Lock()
        self.requests = 0  # for the curious (benchmarks)
        self.bytes_in = 0
        self.bytes_out = 0

    # -- the connection --------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _http(self) -> httpx.Client:
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = self._make_client()
                self._pid = os.getpid()
            return self._client

    def _make_client(self) -> httpx.Client:
        o = self.options
        n = max(1, o.connections)
        return httpx.Client(
            verify=False if o.insecure else _ssl_context(self.host, o.ca_file),
            timeout=httpx.Timeout(o.timeout, connect=o.connect_timeout),
            limits=httpx.Limits(
                max_connections=n + 2, max_keepalive_connections=n + 2, keepalive_expiry=30.0
            ),
            # Never a proxy for loopback; elsewhere the environment's, as curl does.
            trust_env=not self.loopback,
            headers={"User-Agent": "puzzlefs"},
        )

    def base_url(self) -> str:
        """``https://HOST`` or ``http://HOST``, found once (see the module docstring)."""
        if self._base is not None:
            return self._base
        with self._base_lock:
            if self._base is None:
                self._base = self._find_base()
            return self._base

    def _find_base(self) -> str:
        o = self.options
        if o.plain_http:
            self._retry(lambda: self._ping(f"http://{self.host}"), f"http://{self.host}/v2/")
            return f"http://{self.host}"
        may_fall_back = self.loopback or o.insecure
        try:
            self._retry(lambda: self._ping(f"https://{self.host}"), f"https://{self.host}/v2/")
            return f"https://{self.host}"
        except _NoTLS as e:
            if not may_fall_back:
                raise RegistryUnreachable(
                    f"{self.host} does not speak TLS ({e}); plain http is used only for "
                    "loopback hosts, or with --insecure or --plain-http"
                ) from None
            self._retry(lambda: self._ping(f"http://{self.host}"), f"http://{self.host}/v2/")
            return f"http://{self.host}"

    def _ping(self, base: str) -> None:
        try:
            r = self._http().get(f"{base}/v2/")
        except httpx.TransportError as e:
            tls = _tls_error(e)
            if isinstance(tls, ssl.SSLCertVerificationError):
                raise RegistryUnreachable(
                    f"the TLS certificate of {self.host} is not trusted: {tls.verify_message} "
                    "(--ca-cert FILE trusts its CA, --insecure skips the check)"
                ) from None
            if tls is not None:
                raise _NoTLS(str(tls.reason or tls)) from None
            raise _Transient(_describe(e)) from None
        r.read()
        if r.status_code in _RETRY_STATUS:
            raise _Transient(f"HTTP {r.status_code}", _retry_after(r))
        if r.status_code == 401:
            self._challenged(r, None, sent=False)
        elif r.status_code not in (200, 401):
            raise RegistryError(
                f"{base}/v2/ answered HTTP {r.status_code}: is {self.host} a registry?"
            )

    # -- requests ----------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return path if "://" in path else self.base_url() + path

    def _once(
        self,
        method: str,
        path: str,
        scope: tuple[str, ...],
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        follow: bool = False,
    ) -> httpx.Response:
        """One request, through the authentication flows (at most one challenge
        answered); raises _Transient for what may pass."""
        url = httpx.URL(self._url(path))
        if params:
            url = url.copy_merge_params(params)
        challenged = False
        while True:
            h = dict(headers or {})
            h.update(self._auth_header(scope))
            client = self._http()
            try:
                req = client.build_request(method, url, headers=h, content=content)
                resp = client.send(req, stream=stream, follow_redirects=follow)
            except httpx.TransportError as e:
                tls = _tls_error(e)
                if isinstance(tls, ssl.SSLCertVerificationError):
                    raise RegistryUnreachable(
                        f"the TLS certificate of {url.host} is not trusted: "
                        f"{tls.verify_message} (--insecure skips the check)"
                    ) from None
                raise _Transient(f"{method} {_short(url)}: {_describe(e)}") from None
            self.requests += 1
            if content:
                self.bytes_out += len(content)
            if resp.status_code == 401:
                resp.read()
                resp.close()
                if challenged:
                    raise RegistryAuthError(self._refused(resp))
                self._challenged(resp, scope, sent="authorization" in h)
                challenged = True
                continue
            if resp.status_code in _RETRY_STATUS:
                resp.read()
                resp.close()
                raise _Transient(
                    f"{method} {_short(url)}: HTTP {resp.status_code}{_error_text(resp)}",
                    _retry_after(resp),
                )
            return resp

    def _retry(self, op: Callable[[], Any], what: str) -> Any:
        o = self.options
        start = time.monotonic()
        delay = o.backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                return op()
            except _Transient as e:
                wait = min(max(delay, e.retry_after or 0.0), _MAX_DELAY)
                elapsed = time.monotonic() - start
                if attempt >= o.attempts or elapsed + wait > o.max_elapsed:
                    raise RegistryUnreachable(
                        f"{what}: {e} (gave up after {attempt} attempts in {elapsed:.1f} s)"
                    ) from None
                log.debug("%s: %s; again in %.2f s", what, e, wait)
                time.sleep(wait)
                delay = min(delay * 2, _MAX_DELAY)

    # -- authentication ----------------------------------------------------------------
    def _credentials(self) -> Credentials | None:
        if not self._creds_looked:
            self._creds = find_credentials(self.host, self.options.authfile, self._missing_helpers)
            self._creds_looked = True
        return self._creds

    def _auth_header(self, scope: tuple[str, ...]) -> dict[str, str]:
        if self._basic:
            creds = self._credentials()
            return {"Authorization": creds.basic()} if creds else {}
        if self._bearer is not None and scope:
            return {"Authorization": f"Bearer {self._token(scope)}"}
        return {}

    def _challenged(self, resp: httpx.Response, scope: tuple[str, ...] | None, sent: bool) -> None:
        header = resp.headers.get("www-authenticate", "")
        challenge = parse_challenge(header)
        if challenge is None:
            raise RegistryAuthError(f"{self.host} answered 401 without a challenge")
        if challenge.scheme == "basic":
            creds = self._credentials()
            if creds is None:
                raise RegistryAuthError(self._no_credentials())
            if creds.identity_token is not None:
                raise RegistryAuthError(
                    f"{self.host} asks for a password, and {creds.source} holds an identity "
                    "token for it (which only a token service takes)"
                )
            if self._basic and sent:
                raise RegistryAuthError(self._refused(resp))
            self._check_plain(creds, str(resp.request.url))
            self._basic = True
        elif challenge.scheme == "bearer":
            if not challenge.realm:
                raise RegistryAuthError(f"{self.host}: a Bearer challenge without a realm")
            self._bearer = challenge
            if scope is not None:
                wanted = tuple(dict.fromkeys((*scope, *challenge.params.get("scope", "").split())))
                with self._token_lock:
                    self._tokens.pop(" ".join(scope), None)
                    token, expiry = self._fetch_token(wanted)
                    self._tokens[" ".join(scope)] = (token, expiry)
        else:
            raise RegistryAuthError(
                f"{self.host} asks for {challenge.scheme} authentication (only Basic and "
                "Bearer are supported)"
            )

    def _token(self, scope: tuple[str, ...]) -> str:
        key = " ".join(scope)
        with self._token_lock:
            cached = self._tokens.get(key)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
            token, expiry = self._fetch_token(scope)
            self._tokens[key] = (token, expiry)
            return token

    def _fetch_token(self, scope: tuple[str, ...]) -> tuple[str, float]:
        assert self._bearer is not None
        realm = self._bearer.realm
        params: list[tuple[str, str | int | float | bool | None]] = []
        if "service" in self._bearer.params:
            params.append(("service", self._bearer.params["service"]))
        params += [("scope", s) for s in scope]
        creds = self._credentials()
        headers = {}
        form: dict[str, str] | None = None
        if creds is not None:
            self._check_plain(creds, realm)
            if creds.identity_token is not None:  # OAuth2: a refresh token, POSTed
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "puzzlefs",
                    "scope": " ".join(scope),
                }
                if "service" in self._bearer.params:
                    form["service"] = self._bearer.params["service"]
            else:
                headers["Authorization"] = creds.basic()

        def once() -> tuple[str, float]:
            try:
                if form is not None:  # a redirect would carry the token elsewhere: none
                    r = self._http().post(realm, data=form, follow_redirects=False)
                else:
                    r = self._http().get(
                        realm, params=params, headers=headers, follow_redirects=True
                    )
            except httpx.TransportError as e:
                raise _Transient(f"token from {realm}: {_describe(e)}") from None
            if r.status_code in _RETRY_STATUS:
                raise _Transient(f"token from {realm}: HTTP {r.status_code}", _retry_after(r))
            if r.status_code in (401, 403):
                who = f"the credentials from {creds.source}" if creds else "anonymous access"
                raise RegistryAuthError(
                    f"the token service {realm} refused {who} for {' '.join(scope)}"
                    + ("" if creds else self._helpers_note())
                )
            if form is not None and r.is_redirect:
                raise RegistryAuthError(
                    f"the token service {realm} sent the identity token's request on to "
                    f"{r.headers.get('location', '?')[:200]}: not followed"
                )
            if r.status_code != 200:
                raise RegistryAuthError(f"the token service {realm} answered {r.status_code}")
            try:
                body = r.json()
            except ValueError:
                raise RegistryAuthError(f"the token service {realm} sent no JSON") from None
            token = (
                body.get("token") or body.get("access_token") if isinstance(body, dict) else None
            )
            if not isinstance(token, str) or not token:
                raise RegistryAuthError(f"the token service {realm} sent no token")
            lifetime = body.get("expires_in", 60)
            lifetime = lifetime if isinstance(lifetime, int | float) and lifetime > 0 else 60
            return token, time.monotonic() + max(lifetime - 10, lifetime / 2)

        result: tuple[str, float] = self._retry(once, f"token from {realm}")
        return result

    def _check_plain(self, creds: Credentials, url: str) -> None:
        """Credentials travel over plain http only to loopback, or when asked."""
        target = httpx.URL(url)
        if target.scheme == "http" and not (
            is_loopback(target.host) or self.options.insecure or self.options.plain_http
        ):
            raise RegistryAuthError(
                f"refusing to send the credentials from {creds.source} over plain http to "
                f"{target.host} (--insecure allows it)"
            )

    def _no_credentials(self) -> str:
        from puzzlefs.registry._auth import auth_files

        where = ", ".join(str(p) for p in auth_files(self.options.authfile))
        return (
            f"{self.host} asks for credentials and none were found for it (looked in {where})"
            + self._helpers_note()
        )

    def _helpers_note(self) -> str:
        return "; " + "; ".join(self._missing_helpers) if self._missing_helpers else ""

    def _refused(self, resp: httpx.Response) -> str:
        creds = self._credentials()
        who = f"the credentials from {creds.source}" if creds else "anonymous access"
        return f"{self.host} refused {who}: HTTP {resp.status_code}{_error_text(resp)}"

    # -- blobs -------------------------------------------------------------------------
    def blob_size(self, repo: str, digest: Digest) -> int | None:
        """The blob's size if the repository has it, else None."""

        def once() -> int | None:
            r = self._once("HEAD", f"/v2/{repo}/blobs/{digest}", _pull(repo), follow=True)
            if r.status_code == 404:
                return None
            _expect(r, (200,), f"blob {digest} in {self.host}/{repo}")
            return int(r.headers.get("content-length", "-1"))

        result: int | None = self._retry(once, f"HEAD blob {digest.hex[:12]} in {repo}")
        return result

    def get_blob(
        self,
        repo: str,
        digest: Digest,
        consume: Callable[[Iterator[bytes]], Any] | None = None,
        *,
        limit: int | None = None,
    ) -> Any:
        """The blob's bytes, verified against its digest. With ``consume``, the body's
        pieces are passed to it instead (it must check the digest; it is called again
        from the start on a retry) and its result returned."""

        def once() -> Any:
            r = self._once(
                "GET", f"/v2/{repo}/blobs/{digest}", _pull(repo), stream=True, follow=True
            )
            try:
                if r.status_code == 404:
                    r.read()
                    raise RemoteNotFound(f"blob {digest} not found in {self.host}/{repo}")
                _expect(r, (200,), f"blob {digest} in {self.host}/{repo}", stream=True)
                try:
                    if consume is not None:
                        return consume(self._counted(r.iter_bytes(1 << 20)))
                    data = b"".join(self._counted(r.iter_bytes(1 << 20), limit))
                except httpx.TransportError as e:
                    raise _Transient(f"GET blob {digest.hex[:12]}: {_describe(e)}") from None
            finally:
                r.close()
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest.hex:
                raise DigestMismatch(
                    f"blob {digest.hex} from {self.host}/{repo}", digest.hex, actual
                )
            return data

        return self._retry(once, f"GET blob {digest.hex[:12]} from {self.host}/{repo}")

    def _counted(self, pieces: Iterator[bytes], limit: int | None = None) -> Iterator[bytes]:
        total = 0
        for piece in pieces:
            total += len(piece)
            self.bytes_in += len(piece)
            if limit is not None and total > limit:
                raise ImageError(f"a blob from {self.host} is larger than its {limit} bytes")
            yield piece

    def upload_blob(
        self,
        repo: str,
        digest: Digest,
        size: int,
        read: Callable[[int, int], bytes],
        *,
        mount_from: str | None = None,
        chunk_size: int = 8 << 20,
    ) -> str:
        """Upload a blob (``read(offset, length)`` gives its bytes): ``"mounted"`` when
        the registry mounted it from ``mount_from``, ``"present"`` when ``mount_from``
        is ``repo`` itself and the registry says it has the blob there, else
        ``"uploaded"``. Blobs up to ``chunk_size`` go in one PUT, larger ones as
        PATCHes of that size.

        Mounting from the repository itself is an existence check and the start of
        an upload in one request (a HEAD and a POST otherwise): a registry that has
        the blob answers 201, one that lacks it (or does not mount) opens the upload
        session (202), as the distribution spec has it. Only worth asking where
        :meth:`mounts_own_blobs` said the registry answers so."""
        scope = _push(repo) + (_pull(mount_from) if mount_from and mount_from != repo else ())

        def once() -> str:
            params = {"mount": str(digest), "from": mount_from} if mount_from else None
            r = self._once(
                "POST", f"/v2/{repo}/blobs/uploads/", scope, params=params, content=b"",
                headers={"Content-Length": "0"},
            )  # fmt: skip
            r.read()
            if r.status_code == 201 and mount_from:
                return "present" if mount_from == repo else "mounted"
            _expect(r, (202,), f"starting the upload of {digest} to {self.host}/{repo}")
            location = _location(r)
            if size <= chunk_size:
                body = read(0, size)
            else:
                offset = 0
                while offset < size:
                    piece = read(offset, min(chunk_size, size - offset))
                    r = self._once(
                        "PATCH", location, scope, content=piece,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Content-Range": f"{offset}-{offset + len(piece) - 1}",
                        },
                    )  # fmt: skip
                    r.read()
                    _expect(r, (202,), f"uploading {digest} to {self.host}/{repo}")
                    location = _location(r)
                    offset += len(piece)
                body = b""
            r = self._once(
                "PUT", location, scope, params={"digest": str(digest)}, content=body,
                headers={"Content-Type": "application/octet-stream"},
            )  # fmt: skip
            r.read()
            _expect(r, (201,), f"uploading {digest} to {self.host}/{repo}")
            return "uploaded"

        result: str = self._retry(once, f"upload of blob {digest.hex[:12]} to {self.host}/{repo}")
        return result

    def mounts_own_blobs(self, repo: str, digest: Digest) -> bool:
        """Whether the registry answers a mount of ``digest`` from ``repo`` into
        ``repo`` itself with 201, given that ``repo`` has that blob (the distribution
        server does; a registry that does not mount opens an upload session instead,
        which is then cancelled)."""

        def once() -> bool:
            r = self._once(
                "POST", f"/v2/{repo}/blobs/uploads/", _push(repo),
                params={"mount": str(digest), "from": repo}, content=b"",
                headers={"Content-Length": "0"},
            )  # fmt: skip
            r.read()
            if r.status_code == 201:
                return True
            if r.status_code == 202 and r.headers.get("location"):
                # An upload session nobody will use: cancel it (a registry that
                # cannot is left to expire it).
                with contextlib.suppress(_Transient, RegistryError):
                    self._once("DELETE", _location(r), _push(repo)).read()
            return False

        result: bool = self._retry(once, f"mount of blob {digest.hex[:12]} in {repo}")
        return result

    # -- manifests ---------------------------------------------------------------------
    def get_manifest(self, repo: str, reference: str) -> tuple[str, bytes, Digest]:
        """A manifest or index by tag or digest: its media type, bytes and digest
        (checked against the digest asked for, and the registry's own header)."""
        what = f"{self.host}/{repo}:{reference}" if ":" not in reference else (
            f"{self.host}/{repo}@{reference}"
        )  # fmt: skip

        def once() -> tuple[str, bytes, Digest]:
            r = self._once(
                "GET", f"/v2/{repo}/manifests/{reference}", _pull(repo),
                headers={"Accept": MANIFEST_ACCEPT}, stream=True, follow=True,
            )  # fmt: skip
            try:
                if r.status_code == 404:
                    r.read()
                    raise RemoteNotFound(f"{what} not found{_error_text(r)}")
                _expect(r, (200,), what, stream=True)
                try:
                    data = b"".join(self._counted(r.iter_bytes(), MAX_MANIFEST))
                except httpx.TransportError as e:
                    raise _Transient(f"GET manifest {reference}: {_describe(e)}") from None
            finally:
                r.close()
            digest = Digest.of(data)
            if ":" in reference and str(digest) != reference:
                raise DigestMismatch(f"manifest {what}", reference, str(digest))
            header = r.headers.get("docker-content-digest")
            if header and header != str(digest):
                raise DigestMismatch(
                    f"manifest {what} (Docker-Content-Digest)", header, str(digest)
                )
            media = r.headers.get("content-type", "").split(";")[0].strip()
            if media not in MANIFEST_TYPES + INDEX_TYPES:
                media = _json_media_type(data) or media
            return media, data, digest

        result: tuple[str, bytes, Digest] = self._retry(once, f"GET manifest {what}")
        return result

    def put_manifest(self, repo: str, reference: str, media_type: str, data: bytes) -> Digest:
        digest = Digest.of(data)

        def once() -> Digest:
            r = self._once(
                "PUT", f"/v2/{repo}/manifests/{reference}", _push(repo), content=data,
                headers={"Content-Type": media_type},
            )  # fmt: skip
            r.read()
            _expect(r, (200, 201), f"storing manifest {reference} in {self.host}/{repo}")
            header = r.headers.get("docker-content-digest")
            if header and header != str(digest):
                raise DigestMismatch(f"manifest {reference} stored in {repo}", str(digest), header)
            return digest

        result: Digest = self._retry(once, f"PUT manifest {reference} to {self.host}/{repo}")
        return result

    def manifest_exists(self, repo: str, digest: Digest) -> bool:
        def once() -> bool:
            r = self._once(
                "HEAD", f"/v2/{repo}/manifests/{digest}", _pull(repo),
                headers={"Accept": MANIFEST_ACCEPT},
            )  # fmt: skip
            r.read()
            if r.status_code == 404:
                return False
            _expect(r, (200,), f"manifest {digest} in {self.host}/{repo}")
            return True

        result: bool = self._retry(once, f"HEAD manifest {digest.hex[:12]} in {repo}")
        return result


class _NoTLS(Exception):
    """The port answered, but not with TLS."""


def _pull(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull",)


def _push(repo: str) -> tuple[str, ...]:
    return (f"repository:{repo}:pull,push",)


def _location(r: httpx.Response) -> str:
    loc = r.headers.get("location")
    if not loc:
        raise RegistryError(f"{_short(r.request.url)}: the registry gave no upload location")
    return str(r.request.url.join(loc))


def _expect(r: httpx.Response, ok: tuple[int, ...], what: str, *, stream: bool = False) -> None:
    if r.status_code in ok:
        return
    if stream:
        r.read()
    text = _error_text(r)
    if r.status_code == 404:
        raise RemoteNotFound(f"{what}: not found{text}")
    if r.status_code == 403:
        raise RegistryAuthError(f"{what}: denied (HTTP 403){text}")
    raise RegistryError(f"{what}: HTTP {r.status_code}{text}")


def _error_text(r: httpx.Response) -> str:
    """The distribution API's error body, as ``: CODE: message``."""
    try:
        body = json.loads(r.content)
        first = body["errors"][0]
        code, message = first.get("code", ""), first.get("message", "")
        return f": {code}: {message}" if code or message else ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, httpx.StreamError):
        return ""


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _json_media_type(data: bytes) -> str | None:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    media = obj.get("mediaType") if isinstance(obj, dict) else None
    if isinstance(media, str):
        return media
    if isinstance(obj, dict) and isinstance(obj.get("manifests"), list):
        return MEDIA_TYPE_INDEX
    return MEDIA_TYPE_MANIFEST


def _tls_error(e: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _describe(e: httpx.TransportError) -> str:
    if isinstance(e, httpx.TimeoutException):
        return f"timed out ({type(e).__name__})"
    cause: BaseException | None = e.__cause__ or e.__context__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    text = str(cause or e) or type(e).__name__
    return text


def _short(url: httpx.URL) -> str:
    return str(url.copy_with(query=None))


def _ssl_context(host: str, ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise RegistryError(f"--ca-cert {ca_file}: {e}") from None
    for base in _CERTS_D:
        directory = Path(base) / host
        try:
            names = sorted(directory.iterdir())
        except OSError:
            continue
        for path in names:
            if path.suffix == ".crt":
                try:
                    ctx.load_verify_locations(cafile=str(path))
                except (OSError, ssl.SSLError) as e:
                    log.warning("ignoring %s: %s", path, e)
    return ctx
