#!/usr/bin/env bash
# Debian packages puzzlefs needs: libfuse3 and pkg-config to build pyfuse3, fuse3 for
# mounting, the peers the tests and benchmarks compare against, and the OCI tools the
# import and registry tests use (skopeo, umoci, docker-registry: started by the tests
# themselves on 127.0.0.1, never as a service; openssl makes their TLS certificate),
# and what benchmarks/registry.py shapes its link with (iproute2, curl).
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    gcc python3-dev pkg-config libfuse3-dev fuse3 \
    fsverity zstd squashfs-tools squashfuse e2fsprogs \
    skopeo umoci docker-registry openssl iproute2 curl >/dev/null
