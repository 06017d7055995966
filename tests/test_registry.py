"""Images through standard OCI tools: skopeo, and a real registry (Debian's
docker-registry, the CNCF distribution server) started on 127.0.0.1 by the tests.

Push, pull back, extract to the same tree; a second version built on the first
uploads only the blobs the registry lacks, counted in the registry's own storage.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_import import E, make_tar, write_image
from treeutil import assert_same_tree

from puzzlefs import build, extract, open_image
from puzzlefs.importer import import_image

REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
needs_skopeo = pytest.mark.skipif(
    SKOPEO is None, reason="skopeo is not installed (scripts/install-system-deps.sh)"
)
needs_registry = pytest.mark.skipif(
    REGISTRY is None or SKOPEO is None,
    reason="docker-registry or skopeo is not installed (scripts/install-system-deps.sh)",
)
START_TIMEOUT = 30.0
# Only ever 127.0.0.1, whatever proxy the environment names.
LOCAL_ENV = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    storage: Path

    def blobs(self) -> set[str]:
        """Every blob the registry stores (layers, configs and manifests alike)."""
        root = self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
        return {p.name for p in root.glob("*/*") if (p / "data").is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture()
def registry(tmp_path: Path) -> Iterator[Registry]:
    assert REGISTRY is not None
    port = _free_port()
    storage = tmp_path / "registry-storage"
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log_path = tmp_path / "registry.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [REGISTRY, "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=LOCAL_ENV,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(f"http://127.0.0.1:{port}/v2/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Registry(f"127.0.0.1:{port}", storage)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    assert SKOPEO is not None
    proc = subprocess.run(
        [SKOPEO, "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=LOCAL_ENV,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def puzzlefs(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "puzzlefs", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def push(registry: Registry, oci: Path, tag: str, repo: str = "repo") -> None:
    dest = f"docker://{registry.host}/{repo}:{tag}"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{oci}:{tag}", dest)


def pull(registry: Registry, oci: Path, tag: str, repo: str = "repo") -> None:
    src = f"docker://{registry.host}/{repo}:{tag}"
    skopeo("copy", "--src-tls-verify=false", src, f"oci:{oci}:{tag}")


def image_blobs(oci: Path, tag: str) -> set[str]:
    """The manifest, the config and every layer of a tag: what a push uploads."""
    image = open_image(oci, tag)
    manifest = image.manifest
    index = json.loads((oci / "index.json").read_text())
    (desc,) = [
        d
        for d in index["manifests"]
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    ]
    digests = {desc["digest"], str(manifest.config.digest)}
    digests |= {str(d.digest) for d in manifest.layers}
    return {d.removeprefix("sha256:") for d in digests}


def manifest_digest(oci: Path, tag: str) -> str:
    index = json.loads((oci / "index.json").read_text())
    for d in index["manifests"]:
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(d["digest"])
    raise AssertionError(f"no tag {tag} in {oci}")


def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "big").write_bytes(os.urandom(3 << 20))
    (root / "text").write_bytes(b"some text\n" * 5000)
    (root / "sub" / "deeper" / "small").write_bytes(b"small")
    os.symlink("../text", root / "sub" / "link")
    os.link(root / "text", root / "sub" / "hard")
    os.chmod(root / "sub" / "deeper" / "small", 0o4750)


@needs_registry
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zstd"])
def test_push_pull_then_push_only_new_blobs(
    registry: Registry, tmp_path: Path, compress: bool
) -> None:
    src, oci, pulled = tmp_path / "src", tmp_path / "oci", tmp_path / "pulled"
    make_tree(src)
    build(src, oci, "v1", compress=compress)
    push(registry, oci, "v1")
    assert registry.blobs() == image_blobs(oci, "v1")
    pull(registry, pulled, "v1")
    assert manifest_digest(pulled, "v1") == manifest_digest(oci, "v1")  # byte for byte
    puzzlefs("verify", f"{pulled}:v1")
    extract(open_image(pulled, "v1"), tmp_path / "x1")
    assert_same_tree(tmp_path / "x1", src)

    # A second version: one file changed in the middle, one added.
    with open(src / "big", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"a small change")
    (src / "sub" / "new").write_bytes(b"a new file\n" * 100)
    puzzlefs("build", "-b", "v1", *(["-c"] if compress else []), str(src), f"{oci}:v2")
    new = image_blobs(oci, "v2") - image_blobs(oci, "v1")
    assert 0 < len(new) < len(image_blobs(oci, "v2")) / 2
    before = registry.blobs()
    push(registry, oci, "v2")
    moved = registry.blobs() - before
    assert moved == new, "only the blobs the first version lacks were uploaded"

    pull(registry, pulled, "v2")
    puzzlefs("verify", f"{pulled}:v2")
    extract(open_image(pulled, "v2"), tmp_path / "x2")
    assert_same_tree(tmp_path / "x2", src)


@needs_registry
def test_tar_image_through_registry_then_import(registry: Registry, tmp_path: Path) -> None:
    """The usual way in: an OCI image of tar layers pulled from a registry, imported."""
    layers = [
        (make_tar([E("etc", "dir"), E("etc/hosts", data=b"127.0.0.1 localhost\n")]), "gzip"),
        (make_tar([E(".wh.etc"), E("usr/bin/tool", data=os.urandom(100_000))]), "gzip"),
    ]
    write_image(tmp_path / "tars", "t", layers)
    push(registry, tmp_path / "tars", "t", repo="tars")
    pull(registry, tmp_path / "pulled", "t", repo="tars")
    a = import_image(tmp_path / "tars", "t", tmp_path / "a", "t")
    b = import_image(tmp_path / "pulled", "t", tmp_path / "b", "t")
    assert a.manifest.digest == b.manifest.digest
    image = open_image(tmp_path / "b", "t")
    assert [name for name, _ in image.listdir(image.root)] == [b"usr"]


@needs_skopeo
def test_skopeo_oci_to_oci(tmp_path: Path) -> None:
    src, oci, other = tmp_path / "src", tmp_path / "oci", tmp_path / "other"
    make_tree(src)
    build(src, oci, "v1", compress=True)
    (src / "text").write_bytes(b"changed\n")
    build(src, oci, "v2", base_tag="v1", compress=True)
    # The delta tag alone: its manifest lists every chunk of every layer (FORMAT.md §6).
    skopeo("copy", f"oci:{oci}:v2", f"oci:{other}:v2")
    assert manifest_digest(other, "v2") == manifest_digest(oci, "v2")
    puzzlefs("verify", f"{other}:v2")
    extract(open_image(other, "v2"), tmp_path / "x")
    assert_same_tree(tmp_path / "x", src)
