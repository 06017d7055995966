"""Credentials from the files docker and podman write, and the challenges registries
send (no registry needed)."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from puzzlefs.errors import RegistryAuthError
from puzzlefs.registry._auth import auth_files, find_credentials, parse_challenge


def test_bearer_challenge_with_commas_in_quotes() -> None:
    c = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert c is not None and c.scheme == "bearer"
    assert c.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    basic = parse_challenge('Basic realm="x \\"y\\""')
    assert basic is not None and (basic.scheme, basic.realm) == ("basic", 'x "y"')
    assert parse_challenge("") is None


def _write(path: Path, auths: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))


def test_credentials_in_podmans_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    assert find_credentials("h:5000") is None
    enc = base64.b64encode(b"docker:pw:with:colons").decode()
    _write(tmp_path / "docker" / "config.json", {"https://h:5000/v1/": {"auth": enc}})
    creds = find_credentials("h:5000")
    assert creds is not None and (creds.username, creds.password) == ("docker", "pw:with:colons")
    assert find_credentials("h") is None  # another port is another registry
    podman = base64.b64encode(b"podman:pw").decode()
    _write(tmp_path / "run" / "containers" / "auth.json", {"h:5000": {"auth": podman}})
    creds = find_credentials("h:5000")
    assert creds is not None and creds.username == "podman"
    assert creds.source == str(tmp_path / "run" / "containers" / "auth.json")
    assert auth_files()[0] == tmp_path / "run" / "containers" / "auth.json"
    _write(tmp_path / "bad.json", {"h:5000": {"auth": "!!!"}})
    with pytest.raises(RegistryAuthError, match="base64"):
        find_credentials("h:5000", tmp_path / "bad.json")
    with pytest.raises(RegistryAuthError, match="does not exist"):
        find_credentials("h:5000", tmp_path / "missing.json")


def _helper(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text(f"#!{sys.executable}\nimport sys\n{script}\n")
    path.chmod(0o755)


def test_credential_helpers_that_fail_say_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    _helper(
        tmp_path / "bin", "locked", "print('the keyring is locked', file=sys.stderr); sys.exit(3)"
    )
    _helper(tmp_path / "bin", "junk", "print('{not json')")
    _helper(
        tmp_path / "bin",
        "hub",
        'print(\'{"Username": "u", "Secret": "\' + sys.stdin.read() + \'"}\')',
    )
    conf = tmp_path / "config.json"
    _helper(tmp_path / "bin", "leaky", 'print(\'{"Username": "u", "Secret": "TOP"}\'); sys.exit(1)')
    for store, match in (("locked", "failed: the keyring is locked"),
                         ("junk", "no Username and Secret"),
                         ("leaky", "failed: exit status 1")):  # fmt: skip
        conf.write_text(json.dumps({"credsStore": store}))
        with pytest.raises(RegistryAuthError, match=match) as raised:
            find_credentials("h:5000", conf)
        assert "TOP" not in str(raised.value)
    # one that is not installed is passed over (a stale credsStore), and said
    enc = base64.b64encode(b"u:p").decode()
    for store in ("desktop", "../x", ""):
        conf.write_text(json.dumps({"credsStore": store, "auths": {"h:5000": {"auth": enc}}}))
        missing: list[str] = []
        creds = find_credentials("h:5000", conf, missing)
        assert creds is not None and creds.username == "u"
        assert missing == (
            [f"docker-credential-{store} (named in {conf}) is not on PATH"] if store else []
        )
    # a store is asked for the registry as the auths key names it (Docker Hub's URL)
    hub = "https://index.docker.io/v1/"
    conf.write_text(json.dumps({"credsStore": "hub", "auths": {hub: {}}}))
    creds = find_credentials("index.docker.io", conf)
    assert creds is not None and (creds.username, creds.password) == ("u", hub)
    assert creds.source == "credential helper docker-credential-hub"


def test_docker_hub_is_one_registry_by_any_of_its_names(tmp_path: Path) -> None:
    enc = base64.b64encode(b"hubuser:pw").decode()
    conf = tmp_path / "config.json"
    conf.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": enc}}}))
    for host in ("registry-1.docker.io", "docker.io", "index.docker.io"):
        creds = find_credentials(host, conf)
        assert creds is not None and creds.username == "hubuser"
    assert find_credentials("ghcr.io", conf) is None
