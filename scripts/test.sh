#!/usr/bin/env bash
# The project's checks: lint, types, then the whole test suite (real FUSE mounts
# included when run as root with /dev/fuse).
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check src tests benchmarks
mypy
exec python3 -m pytest "$@"
