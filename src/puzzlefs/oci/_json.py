"""Canonical JSON (keys sorted, no whitespace, UTF-8), as the reference writes it, so
that manifests and index.json are reproducible byte for byte."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
