#!/usr/bin/env bash
# The Debian packages: fuse3 (mounting), python3-venv (the README's commands install
# into a venv, as Debian's Python asks), the peers the tests and benchmarks compare
# against (squashfuse, squashfs-tools, erofs-utils, zstd, fsverity), the OCI tools the
# import and registry tests use (skopeo, umoci, docker-registry: started by the tests
# themselves on 127.0.0.1, never as a service; openssl makes their TLS certificate),
# what benchmarks/registry.py shapes its link with (iproute2, curl), and gcc for the
# mount benchmark's small C probe.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    python3 python3-venv fuse3 gcc libc6-dev \
    fsverity zstd squashfs-tools squashfuse erofs-utils e2fsprogs \
    skopeo umoci docker-registry openssl iproute2 curl >/dev/null
