"""Debian's docker-registry (the CNCF distribution server), started by the tests on
127.0.0.1 with a configuration of their choosing: plain http, TLS with a self-signed
certificate, htpasswd (Basic) authentication, or token (Bearer) authentication through
a small token server written here, which signs JWTs with a key whose certificate the
registry trusts. Nothing here ever talks to another address.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REGISTRY = shutil.which("docker-registry")
START_TIMEOUT = 30.0
LOCAL_ENV = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
USER, PASSWORD = "puzzle", "s3cret:with:colons"
REFRESH_TOKEN = "refresh-3f1c"  # the identity token TokenServer trades (OAuth2 POST)
SERVICE, ISSUER = "puzzlefs-test-registry", "puzzlefs-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (openssl)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@dataclass
class RegistryServer:
    """One docker-registry process; ``stop`` and ``start`` again keep port and storage."""

    tmp: Path
    port: int = field(default_factory=free_port)
    tls: tuple[Path, Path] | None = None
    htpasswd: Path | None = None
    token: TokenServer | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.tmp / "registry-storage"

    @property
    def log(self) -> Path:
        return self.tmp / f"registry-{self.port}.log"

    def blobs(self) -> set[str]:
        """Every blob it stores (layers, configs and manifests alike), as hex."""
        root = self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
        return {p.name for p in root.glob("*/*") if (p / "data").is_file()}

    def blob_file(self, hex_digest: str) -> Path:
        root = self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
        return root / hex_digest[:2] / hex_digest / "data"

    def config(self) -> str:
        lines = [
            "version: 0.1",
            "log:\n  level: error\n  accesslog:\n    disabled: true",
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}",
            "  delete:\n    enabled: true",
            f"http:\n  addr: 127.0.0.1:{self.port}",
        ]
        if self.tls is not None:
            lines.append(f"  tls:\n    certificate: {self.tls[0]}\n    key: {self.tls[1]}")
        if self.htpasswd is not None:
            lines.append(f"auth:\n  htpasswd:\n    realm: puzzlefs-test\n    path: {self.htpasswd}")
        if self.token is not None:
            lines.append(
                "auth:\n  token:\n"
                f"    realm: http://127.0.0.1:{self.token.port}/token\n"
                f"    service: {SERVICE}\n    issuer: {ISSUER}\n"
                f"    rootcertbundle: {self.token.cert}"
            )
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        assert REGISTRY is not None
        config = self.tmp / f"registry-{self.port}.yml"
        config.write_text(self.config())
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [REGISTRY, "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=LOCAL_ENV,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        scheme = "https" if self.tls else "http"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx)
        )
        try:
            with opener.open(f"{scheme}://127.0.0.1:{self.port}/v2/", timeout=2) as r:
                return bool(r.status in (200, 401))
        except urllib.error.HTTPError as e:
            return e.code == 401
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def write_htpasswd(path: Path, user: str = USER, password: str = PASSWORD) -> None:
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"{user}:{hashed}\n")


def write_auth_file(path: Path, host: str, user: str = USER, password: str = PASSWORD) -> None:
    """The ``auths`` file docker (config.json) and podman (auth.json) write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))


class TokenServer:
    """A token service for the registry's ``auth: token``: GET /token with Basic
    credentials, or POST /token with the OAuth2 refresh-token grant of
    :data:`REFRESH_TOKEN` (an identity token), gives a JWT (RS256, its certificate in
    the x5c header) granting the actions asked for; wrong or missing credentials get
    401. Counts what it issued."""

    def __init__(self, tmp: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "puzzlefs-test-token")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert = tmp / "token.crt"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issued: list[str] = []  # the scopes of each token issued
        self.refused = 0
        self.refreshed = 0  # tokens issued for the refresh token
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if url.path != "/token" or self.headers.get("Authorization") != expected:
                    server.refused += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                scopes = query.get("scope", [])
                self._issue("token", scopes)

            def do_POST(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(size).decode())
                if (
                    urllib.parse.urlparse(self.path).path != "/token"
                    or form.get("grant_type") != ["refresh_token"]
                    or form.get("refresh_token") != [REFRESH_TOKEN]
                    or not form.get("client_id")
                ):
                    server.refused += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                server.refreshed += 1
                self._issue("access_token", form.get("scope", [""])[0].split())

            def _issue(self, field: str, scopes: list[str]) -> None:
                body = json.dumps({field: server.jwt(scopes), "expires_in": 300}).encode()
                server.issued.append(" ".join(scopes))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def jwt(self, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        for scope in scopes:
            kind, name, actions = (
                scope.split(":")[0],
                ":".join(scope.split(":")[1:-1]),
                scope.split(":")[-1],
            )
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {
            "iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 60,
            "iat": now, "jti": os.urandom(8).hex(), "access": access,
        }  # fmt: skip

        def b64(obj: Any) -> str:
            raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        signing = f"{b64(header)}.{b64(claims)}"
        signature = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{b64(signature)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run_registry(tmp: Path, **kw: Any) -> Iterator[RegistryServer]:
    """For fixtures: a started registry, stopped at the end."""
    reg = RegistryServer(tmp, **kw)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def write_credential_helper(bin_dir: Path, name: str, secrets: dict[str, tuple[str, str]]) -> Path:
    """``docker-credential-NAME``, a helper speaking docker's protocol (``get``: the
    server on stdin, ``{"Username", "Secret"}`` on stdout; exit 1 with docker's words
    when it has none). Each server it was asked for is appended to ``asked`` beside it."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    helper = bin_dir / f"docker-credential-{name}"
    asked = bin_dir / f"{name}.asked"
    helper.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"secrets = {secrets!r}\n"
        "assert sys.argv[1:] == ['get'], sys.argv\n"
        "server = sys.stdin.read().strip()\n"
        f"open({str(asked)!r}, 'a').write(server + '\\n')\n"
        "if server not in secrets:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "user, secret = secrets[server]\n"
        "print(json.dumps({'ServerURL': server, 'Username': user, 'Secret': secret}))\n"
    )
    helper.chmod(0o755)
    return asked
