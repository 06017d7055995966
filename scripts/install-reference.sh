#!/usr/bin/env bash
# The reference implementation, for the compatibility tests (tests/compat): the Rust
# `puzzlefs` crate 0.2.0 from crates.io, built once into a cache directory and reused
# while its binary is there. Prints the binary's path, and nothing else, on stdout:
#
#   export PUZZLEFS_REFERENCE="$(scripts/install-reference.sh)"
#
# Needs cargo (stable Rust; RUSTC_BOOTSTRAP=1 lets it build the crate's two nightly
# features), and the Debian packages capnproto (its build script runs capnp),
# libfuse3-dev and pkg-config, installed here when missing.
# PUZZLEFS_REFERENCE_ROOT overrides the cache (default ~/.cache/puzzlefs-ref).
#
# Built --locked, from the Cargo.lock the crate was published with: unlocked, cargo
# takes the newest zstd-sys of the day, whose libzstd then replaces the one
# zstd-seekable bundles, and the reference's compressed frames change with the date
# of the build (tests/compat/test_bytes.py compares them byte for byte).
set -euo pipefail
VERSION=0.2.0
ROOT="${PUZZLEFS_REFERENCE_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/puzzlefs-ref}"
BIN="$ROOT/bin/puzzlefs"
LOCKED="$ROOT/built-locked"  # a cache built before --locked is built again
log() { echo "install-reference: $*" >&2; }

if [ -x "$BIN" ] && [ -f "$LOCKED" ] && [ "$("$BIN" --version 2>/dev/null)" = "puzzlefs $VERSION" ]; then
    log "using $BIN (cached)"
    echo "$BIN"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! dpkg -s capnproto libfuse3-dev pkg-config >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends capnproto libfuse3-dev pkg-config >&2
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
    log "cargo not found: install stable Rust (rustup) first"
    exit 1
fi
start=$SECONDS
log "building puzzlefs $VERSION into $ROOT ($(cargo --version))"
rm -f "$LOCKED"
RUSTC_BOOTSTRAP=1 cargo install --quiet --locked --force puzzlefs --version "$VERSION" --root "$ROOT" >&2
log "built in $((SECONDS - start)) s"
[ "$("$BIN" --version)" = "puzzlefs $VERSION" ]
touch "$LOCKED"
echo "$BIN"
