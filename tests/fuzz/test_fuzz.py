"""The fuzz suite's fixed-seed slice, as CI runs it (see tests/fuzz/__init__.py): every
case must end accepted or in a clean error; the table is printed either way."""

from __future__ import annotations

import time
from pathlib import Path

from . import runner
from .__main__ import CI_CASES, CI_IMPORT_SHARE, CI_MOUNT_EVERY, CI_SEED


def test_fuzz_ci_slice(tmp_path: Path) -> None:
    start = time.monotonic()
    env = runner.prepare(tmp_path / "work")
    tasks = runner.plan(CI_SEED, CI_CASES, mount_every=CI_MOUNT_EVERY, import_share=CI_IMPORT_SHARE)
    results = runner.run_all(tasks, env, jobs=2)
    print(runner.table(results))
    print(f"{len(results)} cases in {time.monotonic() - start:.0f} s")
    assert len(results) == CI_CASES >= 2000
    bad = list(runner.findings(results))
    assert not bad, "\n\n".join(bad)
