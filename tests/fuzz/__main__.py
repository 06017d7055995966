"""``python3 -m tests.fuzz``: see the package's docstring."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import runner

CI_SEED = 1
CI_CASES = 2400
CI_MOUNT_EVERY = 40  # one reader case in 40 also mounts (when root with /dev/fuse)
CI_IMPORT_SHARE = 0.15


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.fuzz", description=__doc__)
    p.add_argument("--seed", type=int, default=CI_SEED)
    p.add_argument("--cases", type=int, default=CI_CASES)
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--mount-every", type=int, default=CI_MOUNT_EVERY, help="0: never mount")
    p.add_argument("--import-share", type=float, default=CI_IMPORT_SHARE)
    p.add_argument("--case", type=int, help="run only this case (in this process)")
    p.add_argument("--keep", metavar="DIR", help="with --case: work in DIR and keep it")
    p.add_argument("--work", metavar="DIR", help="where seeds and cases go (default: a temp dir)")
    p.add_argument("--json", metavar="FILE", help="write every result as JSON")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="puzzlefs-fuzz-") as tmp:
        work = Path(args.keep or args.work or tmp)
        start = time.monotonic()
        env = runner.prepare(work)
        tasks = runner.plan(
            args.seed,
            max(args.cases, (args.case or 0) + 1),
            mount_every=args.mount_every,
            import_share=args.import_share,
        )
        if args.case is not None:
            result = runner.run_task(tasks[args.case], env, keep=bool(args.keep), verbose=True)
            for command, outcome in result.runs.items():
                print(f"  {command}: {outcome}  {result.messages.get(command, '')}")
            if args.keep:
                print(f"kept in {work / 'cases'}")
            return 0 if result.outcome not in runner.BAD else 1
        results = runner.run_all(tasks, env, args.jobs, progress=sys.stderr.isatty())
        elapsed = time.monotonic() - start
        print(runner.table(results))
        print(
            f"\n{len(results)} cases (seed {args.seed}, {args.jobs} workers) in {elapsed:.0f} s;"
            f" {sum(r.task.mount for r in results)} with a mount"
        )
        bad = list(runner.findings(results))
        for text in bad:
            print("\n" + text)
        if args.json:
            Path(args.json).write_text(runner.to_json(results))
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
