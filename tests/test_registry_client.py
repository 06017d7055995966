"""puzzlefs's own registry client against a real registry (Debian's docker-registry,
started on 127.0.0.1 by the tests): push, pull, copy, a second version that uploads
only its new chunks, resumed pulls, corrupt blobs, images beyond the manifest limit,
cross-repository mounts, chunked uploads, TLS with a self-signed certificate, Basic
(htpasswd) and Bearer-token authentication, and a registry that is not there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registryutil import (
    PASSWORD,
    REFRESH_TOKEN,
    REGISTRY,
    USER,
    RegistryServer,
    TokenServer,
    free_port,
    run_registry,
    self_signed,
    write_auth_file,
    write_credential_helper,
    write_htpasswd,
)
from treeutil import assert_same_tree

from puzzlefs import build, extract, open_image
from puzzlefs.digest import Digest
from puzzlefs.errors import RegistryError, RegistryUnreachable, UsageError
from puzzlefs.oci import MEDIA_TYPE_INDEX, ImageLayout
from puzzlefs.registry import ClientOptions, Registry, parse_remote

pytestmark = pytest.mark.skipif(
    REGISTRY is None, reason="docker-registry is not installed (scripts/install-system-deps.sh)"
)
TIMEOUT = 300


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    yield from run_registry(tmp_path)


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "puzzlefs", *map(str, args)],
        capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, **(env or {})),
    )  # fmt: skip


def ok(*args: object, env: dict[str, str] | None = None) -> str:
    done = cli(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress, no warnings into a pipe
    return done.stdout


def fails(*args: object, env: dict[str, str] | None = None) -> str:
    """The one line a failure prints (no traceback)."""
    done = cli(*args, env=env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


def make_tree(root: Path, seed: int = 0) -> None:
    rnd = __import__("random").Random(seed)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "big").write_bytes(rnd.randbytes(3 << 20))
    (root / "text").write_bytes(b"some text\n" * 5000)
    (root / "sub" / "deeper" / "small").write_bytes(b"small")
    os.symlink("../text", root / "sub" / "link")
    os.link(root / "text", root / "sub" / "hard")


def tag_descriptor(oci: Path, tag: str) -> dict[str, object]:
    for d in json.loads((oci / "index.json").read_text())["manifests"]:
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(d)
    raise AssertionError(f"no tag {tag} in {oci}")


def all_blobs(oci: Path, tag: str) -> set[str]:
    """Every blob a tag leads to, manifests included (what a registry must hold)."""
    from puzzlefs.registry._transfer import local_image

    image = local_image(ImageLayout(oci), tag)
    return {d.digest.hex for d, _ in image.manifests} | {d.digest.hex for d in image.blobs}


def test_push_pull_and_a_second_version(registry: RegistryServer, tmp_path: Path) -> None:
    src, oci, pulled = tmp_path / "src", tmp_path / "oci", tmp_path / "pulled"
    make_tree(src)
    build(src, oci, "v1", compress=True)
    ref = f"docker://{registry.host}/team/image:v1"
    out = ok("push", f"{oci}:v1", ref)
    n = len(open_image(oci, "v1").manifest.layers) + 1  # and the config
    assert f"{n} of {n} blobs pushed" in out
    assert registry.blobs() == all_blobs(oci, "v1")

    ok("pull", ref, f"{pulled}:v1")
    assert tag_descriptor(pulled, "v1")["digest"] == tag_descriptor(oci, "v1")["digest"]
    ok("verify", f"{pulled}:v1")
    extract(open_image(pulled, "v1"), tmp_path / "x1")
    assert_same_tree(tmp_path / "x1", src)

    # Again: nothing moves.
    assert f"0 of {n} blobs pushed" in ok("push", f"{oci}:v1", ref)
    assert f"0 of {n} blobs pulled" in ok("pull", ref, f"{pulled}:v1")

    # A second version: only its new blobs travel, both ways.
    with open(src / "big", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"a small change")
    (src / "sub" / "new").write_bytes(b"a new file\n" * 100)
    ok("build", "-c", "-b", "v1", src, f"{oci}:v2")
    new = all_blobs(oci, "v2") - all_blobs(oci, "v1")
    before = registry.blobs()
    out = ok("push", f"{oci}:v2", f"docker://{registry.host}/team/image:v2")
    assert registry.blobs() - before == new
    assert f"{len(new) - 1} of " in out  # the manifest is not a blob of the count
    out = ok("pull", f"docker://{registry.host}/team/image:v2", f"{pulled}:v2")
    assert f"{len(new) - 1} of " in out
    ok("verify", f"{pulled}:v2")
    extract(open_image(pulled, "v2"), tmp_path / "x2")
    assert_same_tree(tmp_path / "x2", src)


def test_copy_between_transports(registry: RegistryServer, tmp_path: Path) -> None:
    src, oci = tmp_path / "src", tmp_path / "oci"
    make_tree(src)
    build(src, oci, "v1")
    a, b = f"docker://{registry.host}/a:v1", f"docker://{registry.host}/b:v1"
    ok("copy", f"oci:{oci}:v1", a)
    # Registry to registry, same host: every blob is mounted across repositories.
    cache = tmp_path / "cache"
    out = ok("copy", a, b, env={"PUZZLEFS_REGISTRY_CACHE": str(cache)})
    n = len(open_image(oci, "v1").manifest.layers) + 1
    assert f"{n} mounted from another repository" in out
    ok("copy", b, f"oci:{tmp_path / 'back'}:v1")
    ok("copy", f"{tmp_path / 'back'}:v1", f"oci:{tmp_path / 'again'}:w")
    assert tag_descriptor(tmp_path / "again", "w")["digest"] == tag_descriptor(oci, "v1")["digest"]
    ok("verify", f"{tmp_path / 'again'}:w")
    # push --mount-from, explicitly
    out = ok("push", "--mount-from", "a", f"{oci}:v1", f"docker://{registry.host}/c:v1")
    assert f"{n} mounted from another repository" in out


def test_pull_resumes_after_a_kill(registry: RegistryServer, tmp_path: Path) -> None:
    """An interrupted pull keeps every blob it completed (verified); run again, it
    fetches only the rest. The tag appears only once the image is complete."""
    src, oci, pulled = tmp_path / "src", tmp_path / "oci", tmp_path / "pulled"
    src.mkdir()
    rnd = __import__("random").Random(5)
    for i in range(40):
        (src / f"f{i}").write_bytes(rnd.randbytes(200_000))
    build(src, oci, "v1")
    ref = f"docker://{registry.host}/r:v1"
    ok("push", f"{oci}:v1", ref)
    total = len(open_image(oci, "v1").manifest.layers) + 1
    blobs = pulled / "blobs" / "sha256"
    proc = subprocess.Popen(
        [sys.executable, "-m", "puzzlefs", "pull", "-j", "1", ref, f"{pulled}:v1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (blobs.is_dir() and len(os.listdir(blobs)) >= 10):
            assert proc.poll() is None, "the pull ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    kept = {n for n in os.listdir(blobs) if not n.startswith(".")}
    assert len(kept) >= 10
    assert "v1" not in ImageLayout(pulled).tags()  # not committed
    for name in kept:  # what was kept is whole and verified
        assert Digest.of((blobs / name).read_bytes()).hex == name
    out = ok("pull", ref, f"{pulled}:v1")
    moved = int(out.split(": ", 1)[1].split(" of ")[0])
    assert moved <= total - (len(kept) - 1)  # the kept ones (bar a manifest) not again
    ok("verify", f"{pulled}:v1")


def test_a_corrupt_blob_is_never_stored(registry: RegistryServer, tmp_path: Path) -> None:
    src, oci, pulled = tmp_path / "src", tmp_path / "oci", tmp_path / "pulled"
    make_tree(src)
    build(src, oci, "v1")
    ref = f"docker://{registry.host}/bad:v1"
    ok("push", f"{oci}:v1", ref)
    victim = open_image(oci, "v1").manifest.chunk_layers[0].digest
    path = registry.blob_file(victim.hex)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    line = fails("pull", ref, f"{pulled}:v1")
    assert "digest mismatch" in line and victim.hex in line
    assert not (pulled / "blobs" / "sha256" / victim.hex).exists()
    assert "v1" not in ImageLayout(pulled).tags()


def test_beyond_the_manifest_limit(registry: RegistryServer, tmp_path: Path) -> None:
    """The registry refuses a manifest over 4 MiB; an image whose manifest would be
    larger is an index of manifest parts (here with a lowered limit), which pushes,
    pulls and reads back whole; every blob stays reachable from the tag."""
    host = registry.host
    with Registry(host) as reg:
        empty = Digest.of(b"{}")
        layers = [
            {"digest": str(Digest.of(str(i).encode())), "mediaType": "x", "size": 1}
            for i in range(40_000)
        ]
        big = json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                        "digest": str(empty), "size": 2},
             "layers": layers}
        ).encode()  # fmt: skip
        assert len(big) > 4 << 20
        with pytest.raises(RegistryError, match="MANIFEST_INVALID"):
            reg.put_manifest("big", "t", "application/vnd.oci.image.manifest.v1+json", big)

    src, oci, pulled = tmp_path / "src", tmp_path / "oci", tmp_path / "pulled"
    make_tree(src)
    result = build(src, oci, "v1", manifest_limit=2_000)
    assert result.manifest.media_type == MEDIA_TYPE_INDEX
    index = json.loads((oci / "blobs" / "sha256" / result.manifest.digest.hex).read_bytes())
    assert len(index["manifests"]) > 3
    ref = f"docker://{host}/split:v1"
    ok("push", f"{oci}:v1", ref)
    assert registry.blobs() == all_blobs(oci, "v1")
    ok("pull", ref, f"{pulled}:v1")
    assert tag_descriptor(pulled, "v1")["mediaType"] == MEDIA_TYPE_INDEX
    ok("verify", "--digest", result.manifest_verity, f"{pulled}:v1")
    extract(open_image(pulled, "v1", verity_digest=result.manifest_verity), tmp_path / "x")
    assert_same_tree(tmp_path / "x", src)


def test_chunked_upload(registry: RegistryServer) -> None:
    data = os.urandom(300_000)
    digest = Digest.of(data)
    with Registry(registry.host) as reg:
        how = reg.upload_blob(
            "chunky", digest, len(data), lambda o, n: data[o : o + n], chunk_size=64 << 10
        )
        assert how == "uploaded"
        assert reg.blob_size("chunky", digest) == len(data)
        assert reg.get_blob("chunky", digest) == data
    assert registry.blob_file(digest.hex).read_bytes() == data


def test_a_push_asks_for_each_blob_and_opens_its_upload_in_one_request(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """docker-registry mounts a repository's own blobs into it (201) and opens an
    upload for one it lacks (202): after the first blob, a push sends no HEADs."""
    from puzzlefs.registry import push

    src, oci = tmp_path / "src", tmp_path / "oci"
    make_tree(src)
    build(src, oci, "v1")
    blobs = len(open_image(oci, "v1").manifest.layers) + 1  # and the config
    dest = parse_remote(f"docker://{registry.host}/own/mount:v1")
    with Registry(registry.host) as reg:
        report = push(ImageLayout(oci), "v1", reg, dest)
        assert report.moved == blobs
        # A ping, a HEAD, a POST and a PUT for the first, the probe, then a POST and
        # a PUT per blob, and the manifest.
        assert report.requests <= 2 * blobs + 5
        assert reg.mounts_own_blobs("own/mount", Digest.of(b"never uploaded")) is False
        again = push(ImageLayout(oci), "v1", reg, dest)
        assert again.present == blobs and again.moved == 0
        assert again.requests <= blobs + 5
    assert registry.blobs() == all_blobs(oci, "v1")


def test_a_registry_that_mounts_nothing_still_skips_what_it_has(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """In front of docker-registry, a proxy that drops every mount request's
    parameters: the push finds that out on its first blob and asks by HEAD."""
    import http.client
    import threading
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posts: list[str] = []

    class NoMounts(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = [
                (k, v) for k, v in urllib.parse.parse_qsl(url.query) if k not in ("mount", "from")
            ]
            path = url.path + ("?" + urllib.parse.urlencode(query) if query else "")
            if self.command == "POST":
                posts.append(url.query)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            conn = http.client.HTTPConnection("127.0.0.1", registry.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(k, v.replace(registry.host, front_host))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args: object) -> None:
            pass

    front = ThreadingHTTPServer(("127.0.0.1", 0), NoMounts)
    front_host = f"127.0.0.1:{front.server_address[1]}"
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        src, oci = tmp_path / "src", tmp_path / "oci"
        make_tree(src)
        build(src, oci, "v1")
        n = len(open_image(oci, "v1").manifest.layers) + 1
        ref = f"docker://{front_host}/no/mounts:v1"
        assert f"{n} of {n} blobs pushed" in ok("push", f"{oci}:v1", ref)
        assert sum("mount=" in q for q in posts) == 1  # the probe, then HEADs
        posts.clear()
        assert f"0 of {n} blobs pushed" in ok("push", f"{oci}:v1", ref)
        assert registry.blobs() == all_blobs(oci, "v1")
    finally:
        front.shutdown()
        front.server_close()


def test_unreachable_registry_is_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    make_tree(tmp_path / "src")
    build(tmp_path / "src", tmp_path / "oci", "v1")
    options = ClientOptions(attempts=3, backoff=0.05)
    with Registry(f"127.0.0.1:{port}", options) as reg, pytest.raises(RegistryUnreachable) as e:
        reg.get_manifest("x", "v1")
    assert "gave up after 3 attempts" in str(e.value)
    line = fails("pull", f"docker://127.0.0.1:{port}/x:v1", f"{tmp_path / 'p'}:v1")
    assert "gave up after" in line
    line = fails("pull", f"docker://{'127.0.0.1'}:{port}/NotAName:v1", f"{tmp_path / 'p'}:v1")
    assert "invalid repository name" in line


def test_unknown_tag_is_one_line(registry: RegistryServer, tmp_path: Path) -> None:
    line = fails("pull", f"docker://{registry.host}/nothing:here", f"{tmp_path / 'p'}:v1")
    assert "not found" in line


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture()
def tls_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    yield from run_registry(tmp_path, tls=self_signed(tmp_path, "registry"))


def test_tls_self_signed(tls_registry: RegistryServer, tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    build(tmp_path / "src", tmp_path / "oci", "v1")
    ref = f"docker://{tls_registry.host}/secure:v1"
    line = fails("push", f"{tmp_path / 'oci'}:v1", ref)
    assert "not trusted" in line  # never a silent fall back to plain http
    assert tls_registry.tls is not None
    ok("push", "--ca-cert", tls_registry.tls[0], f"{tmp_path / 'oci'}:v1", ref)
    ok("pull", "--insecure", ref, f"{tmp_path / 'pulled'}:v1")
    ok("verify", f"{tmp_path / 'pulled'}:v1")


# -- Basic authentication (htpasswd) -------------------------------------------------------


@pytest.fixture()
def basic_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    htpasswd = tmp_path / "htpasswd"
    write_htpasswd(htpasswd)
    yield from run_registry(tmp_path, htpasswd=htpasswd)


def test_basic_auth(basic_registry: RegistryServer, tmp_path: Path) -> None:
    pytest.importorskip("bcrypt")
    make_tree(tmp_path / "src")
    build(tmp_path / "src", tmp_path / "oci", "v1")
    host = basic_registry.host
    ref = f"docker://{host}/private:v1"
    empty_home = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
                  "XDG_CONFIG_HOME": str(tmp_path / "config"), "REGISTRY_AUTH_FILE": "",
                  "DOCKER_CONFIG": str(tmp_path / "docker")}  # fmt: skip
    line = fails("push", f"{tmp_path / 'oci'}:v1", ref, env=empty_home)
    assert "asks for credentials and none were found" in line
    # docker's config.json
    write_auth_file(tmp_path / "docker" / "config.json", host)
    ok("push", f"{tmp_path / 'oci'}:v1", ref, env=empty_home)
    # podman's auth.json, under XDG_RUNTIME_DIR (docker's now says something else)
    write_auth_file(tmp_path / "docker" / "config.json", host, password="wrong")
    write_auth_file(tmp_path / "run" / "containers" / "auth.json", host)
    ok("pull", ref, f"{tmp_path / 'pulled'}:v1", env=empty_home)
    ok("verify", f"{tmp_path / 'pulled'}:v1")
    # wrong credentials: refused, said in one line
    (tmp_path / "run" / "containers" / "auth.json").unlink()
    line = fails("pull", ref, f"{tmp_path / 'other'}:v1", env=empty_home)
    assert "refused the credentials" in line
    assert str(tmp_path / "docker" / "config.json") in line
    # --authfile
    write_auth_file(tmp_path / "mine.json", host, USER, PASSWORD)
    ok("pull", "--authfile", tmp_path / "mine.json", ref, f"{tmp_path / 'other'}:v1",
       env=empty_home)  # fmt: skip
    # credential helpers, as docker runs them: the registry's own (credHelpers) before
    # the file's store (credsStore), which goes before the file's auths
    bin_dir = tmp_path / "bin"
    asked = write_credential_helper(bin_dir, "pass", {host: (USER, PASSWORD)})
    write_credential_helper(bin_dir, "empty", {})
    with_path = {**empty_home, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    docker = tmp_path / "docker" / "config.json"
    docker.write_text(json.dumps({"auths": {host: {}}, "credsStore": "pass"}))
    ok("pull", ref, f"{tmp_path / 'helped'}:v1", env=with_path)
    assert asked.read_text().split() == [host]
    write_auth_file(docker, host)  # its auths hold the password...
    conf = json.loads(docker.read_text())
    docker.write_text(json.dumps({**conf, "credsStore": "empty"}))  # ...its store none
    ok("pull", ref, f"{tmp_path / 'helped2'}:v1", env=with_path)
    docker.write_text(json.dumps({"credsStore": "empty", "credHelpers": {host: "pass"}}))
    ok("pull", ref, f"{tmp_path / 'helped3'}:v1", env=with_path)
    docker.write_text(json.dumps({"credHelpers": {host: "desktop"}}))
    line = fails("pull", ref, f"{tmp_path / 'x'}:v1", env=with_path)
    assert "asks for credentials and none were found" in line
    assert "docker-credential-desktop (named in" in line and "is not on PATH" in line


# -- Bearer tokens ---------------------------------------------------------------------------


@pytest.fixture()
def token_registry(tmp_path: Path) -> Iterator[RegistryServer]:
    pytest.importorskip("cryptography")
    token = TokenServer(tmp_path)
    try:
        yield from run_registry(tmp_path, token=token)
    finally:
        token.close()


def test_bearer_token_flow(token_registry: RegistryServer, tmp_path: Path) -> None:
    assert token_registry.token is not None
    make_tree(tmp_path / "src")
    build(tmp_path / "src", tmp_path / "oci", "v1")
    host = token_registry.host
    write_auth_file(tmp_path / "auth.json", host)
    write_auth_file(tmp_path / "bad.json", host, password="nope")
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    ref = f"docker://{host}/tokened/image:v1"
    ok("push", f"{tmp_path / 'oci'}:v1", ref, env=env)
    issued = list(token_registry.token.issued)
    assert "repository:tokened/image:pull,push" in issued
    assert len(issued) <= 3  # tokens are kept and reused, not fetched per request
    ok("pull", ref, f"{tmp_path / 'pulled'}:v1", env=env)
    assert "repository:tokened/image:pull" in token_registry.token.issued
    ok("verify", f"{tmp_path / 'pulled'}:v1")
    # a cross-repository mount asks for pull on the source too
    ok("push", "--mount-from", "tokened/image", f"{tmp_path / 'oci'}:v1",
       f"docker://{host}/other:v1", env=env)  # fmt: skip
    assert any("repository:tokened/image:pull" in s and "repository:other:pull,push" in s
               for s in token_registry.token.issued)  # fmt: skip
    line = fails(
        "pull", ref, f"{tmp_path / 'x'}:v1", env={"REGISTRY_AUTH_FILE": str(tmp_path / "bad.json")}
    )
    assert "token service" in line and "refused" in line


def test_a_docker_image_through_the_registry_then_import(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A Docker schema2 image (as docker push makes them) moves as it is, digests kept,
    as skopeo --preserve-digests does; import reads it from the layout."""
    from test_import import E, make_tar, write_image

    from puzzlefs.importer import import_image

    layer = make_tar([E("etc", "dir"), E("etc/os-release", data=b"ID=test\n")])
    write_image(tmp_path / "docker", "d", [(layer, "gzip")], docker=True)
    ok("push", f"{tmp_path / 'docker'}:d", f"docker://{registry.host}/dock:d")
    ok("pull", f"docker://{registry.host}/dock:d", f"{tmp_path / 'pulled'}:d")
    ours, theirs = ImageLayout(tmp_path / "pulled"), ImageLayout(tmp_path / "docker")
    mine, source = ours.resolve("d"), theirs.resolve("d")  # the same manifest, byte for byte
    assert (mine.digest, mine.media_type) == (source.digest, source.media_type)
    a = import_image(tmp_path / "docker", "d", tmp_path / "a", "t")
    b = import_image(tmp_path / "pulled", "d", tmp_path / "b", "t")
    assert a.manifest.digest == b.manifest.digest
    line = fails("extract", f"{tmp_path / 'pulled'}:d", tmp_path / "x")
    assert "not a puzzlefs image" in line  # said in one line


def test_an_index_of_platforms_gives_this_machines_image(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """As skopeo copies it: this machine's image only, its manifest tagged; --all
    copies every platform and tags the index."""
    from test_import import E, Layout, make_tar

    from puzzlefs.importer import import_image
    from puzzlefs.oci.layout import host_architecture

    src = Layout(tmp_path / "multi")
    other = "s390x" if host_architecture() != "s390x" else "amd64"
    here_tar = make_tar([E("etc", "dir"), E("etc/arch", data=host_architecture().encode())])
    there_tar = make_tar([E("etc", "dir"), E("etc/arch", data=other.encode() * 1000)])
    there = src.manifest([(there_tar, "gzip")], docker=True, arch=other)
    here = src.manifest([(here_tar, "gzip")], docker=True)
    src.tag("m", src.image_index([there, here]))
    ref = f"docker://{registry.host}/multi:m"
    ok("push", f"{tmp_path / 'multi'}:m", ref)

    ok("pull", ref, f"{tmp_path / 'one'}:m")
    one = ImageLayout(tmp_path / "one")
    assert str(one.resolve("m").digest) == here["digest"]
    assert not one.blobs.has(Digest.parse(str(there["digest"])))  # not fetched
    import_image(tmp_path / "one", "m", tmp_path / "imported", "t")

    ok("pull", "--all", ref, f"{tmp_path / 'all'}:m")
    every = ImageLayout(tmp_path / "all")
    assert every.resolve("m").media_type == MEDIA_TYPE_INDEX
    assert every.blobs.has(Digest.parse(str(there["digest"])))
    ok("gc", tmp_path / "all")  # keeps every platform the index names
    assert every.blobs.has(Digest.parse(str(there["digest"])))


def test_identity_token_from_a_credential_helper(
    token_registry: RegistryServer, tmp_path: Path
) -> None:
    """A helper's ``<token>`` user is an identity token: traded at the token service
    by the OAuth2 refresh-token grant (POST), never sent as a password."""
    assert token_registry.token is not None
    make_tree(tmp_path / "src")
    build(tmp_path / "src", tmp_path / "oci", "v1")
    host = token_registry.host
    bin_dir = tmp_path / "bin"
    write_credential_helper(bin_dir, "vault", {host: ("<token>", REFRESH_TOKEN)})
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {host: {}}, "credsStore": "vault"}))
    env = {"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json"),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}  # fmt: skip
    ref = f"docker://{host}/tokened/image:v1"
    ok("push", f"{tmp_path / 'oci'}:v1", ref, env=env)
    ok("pull", ref, f"{tmp_path / 'pulled'}:v1", env=env)
    ok("verify", f"{tmp_path / 'pulled'}:v1")
    assert token_registry.token.refreshed >= 2 and token_registry.token.refused == 0
    # the same token straight from the file (docker writes identitytoken there too)
    (tmp_path / "auth.json").write_text(
        json.dumps({"auths": {host: {"identitytoken": REFRESH_TOKEN}}})
    )
    ok("pull", ref, f"{tmp_path / 'again'}:v1", env=env)
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {host: {"identitytoken": "old"}}}))
    line = fails("pull", ref, f"{tmp_path / 'x'}:v1", env=env)
    assert "token service" in line and "refused" in line


def test_an_identity_token_never_follows_a_redirect(tmp_path: Path) -> None:
    """The refresh-token POST is not sent on where a token service redirects it (httpx
    would resend the form, token included, to any host)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[bytes] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)
    other_port = other.server_address[1]

    class Front(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the registry: a Bearer challenge
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="http://127.0.0.1:{port}/token"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:  # its token service: sends the POST on elsewhere
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{other_port}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    front = ThreadingHTTPServer(("127.0.0.1", 0), Front)
    port = front.server_address[1]
    for server in (front, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (tmp_path / "auth.json").write_text(
            json.dumps({"auths": {f"127.0.0.1:{port}": {"identitytoken": "SECRET-REFRESH"}}})
        )
        line = fails(
            "pull", f"docker://127.0.0.1:{port}/x:v1", f"{tmp_path / 'out'}:v1",
            env={"REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")},
        )  # fmt: skip
        assert "not followed" in line and "SECRET" not in line
        assert received == []
    finally:
        for server in (front, other):
            server.shutdown()
            server.server_close()


def test_references_are_checked() -> None:
    ref = parse_remote("docker://[::1]:5000/a/b-c/d__e:v1.2")
    assert (ref.host, ref.repo, ref.tag, ref.hostname) == (
        "[::1]:5000",
        "a/b-c/d__e",
        "v1.2",
        "::1",
    )
    ref = parse_remote("docker://localhost/x")
    assert ref.reference == "latest"
    ref = parse_remote(f"docker://h:1/x@sha256:{'a' * 64}")
    assert ref.reference == f"sha256:{'a' * 64}"
    # names as containers/image reads them: no registry part means Docker Hub
    for text, host, repo in [
        ("docker://alpine", "registry-1.docker.io", "library/alpine"),
        ("docker://alpine:3.19", "registry-1.docker.io", "library/alpine"),
        ("docker://bitnami/redis:7", "registry-1.docker.io", "bitnami/redis"),
        ("docker://docker.io/ubuntu", "registry-1.docker.io", "library/ubuntu"),
        ("docker://index.docker.io/a/b", "registry-1.docker.io", "a/b"),
        ("docker://localhost/x", "localhost", "x"),
        ("docker://ghcr.io/o/r", "ghcr.io", "o/r"),
    ]:
        ref = parse_remote(text)
        assert (ref.host, ref.repo) == (host, repo), text
    assert parse_remote("docker://alpine:3.19").tag == "3.19"
    for bad in ["docker://h/../x:v", "docker://h/X:v", "docker://h:99999/x", "docker://h/x:-v",
                "docker://h/x@sha256:12", "docker:///x", "docker://h/"]:  # fmt: skip
        with pytest.raises(UsageError):
            parse_remote(bad)


def test_a_tar_image_through_the_registry_then_import(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """Any OCI image moves (tar layers, an index over it): pull, then import."""
    from test_import import E, make_tar, write_image

    from puzzlefs.importer import import_image

    layers = [
        (make_tar([E("etc", "dir"), E("etc/hosts", data=b"127.0.0.1 localhost\n")]), "gzip"),
        (make_tar([E("usr/bin/tool", data=os.urandom(100_000))]), "gzip"),
    ]
    write_image(tmp_path / "tars", "t", layers)
    ok("push", f"{tmp_path / 'tars'}:t", f"docker://{registry.host}/tars:t")
    ok("pull", f"docker://{registry.host}/tars:t", f"{tmp_path / 'pulled'}:t")
    a = import_image(tmp_path / "tars", "t", tmp_path / "a", "t")
    b = import_image(tmp_path / "pulled", "t", tmp_path / "b", "t")
    assert a.manifest.digest == b.manifest.digest
