"""Running cases: long-lived worker processes, each under a memory cap, that run the
CLI in-process (one Python start-up per worker, not per case); the parent hands out
cases, enforces the timeout, and classifies what it gets back, or the worker's death.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import shutil
import signal
import stat
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import mutate, seeds, tars
from .layout import CaseLayout, copy_layout

# Outcome classes, the acceptable first.
ACCEPTED = "accepted"
CLEAN = "clean error"
INTERNAL = "internal error"
HANG = "hang"
CRASH = "crash"
MEMORY = "memory-capped"
OUTSIDE = "write outside the target"
LOST_TAG = "lost tags"
MISSING_BLOB = "missing blobs"
STORE_CHANGED = "store changed"
FD_LEAK = "leaked descriptors"
EXTRACT_REFUSED = "imported, then extract refused"
LEFTOVER = "processes left behind"
OUTCOMES = [
    ACCEPTED,
    CLEAN,
    INTERNAL,
    HANG,
    CRASH,
    MEMORY,
    OUTSIDE,
    LOST_TAG,
    MISSING_BLOB,
    STORE_CHANGED,
    FD_LEAK,
    LEFTOVER,
    EXTRACT_REFUSED,
]
BAD = set(OUTCOMES) - {ACCEPTED, CLEAN}
_RANK = {o: i for i, o in enumerate(OUTCOMES)}

MEMORY_BUDGET = 768 << 20  # address space a worker may grow by (RLIMIT_AS)
CASE_TIMEOUT = 30.0
MOUNT_CASE_TIMEOUT = 60.0
IMPORT_MAX_LAYER = "32M"
SRC = str(Path(seeds.__file__).resolve().parents[2] / "src")


@dataclass(frozen=True)
class Task:
    index: int
    seed: int
    family: str  # "reader" or "import"
    target: str  # a key of mutate.TARGETS, or "import"
    image: str  # a seeds.KINDS entry (reader cases)
    mount: bool


@dataclass
class Result:
    task: Task
    what: str = ""
    outcome: str = ACCEPTED  # the worst of the runs
    runs: dict[str, str] = field(default_factory=dict)  # command -> outcome
    messages: dict[str, str] = field(default_factory=dict)  # command -> first line
    seconds: float = 0.0

    def add(self, command: str, outcome: str, message: str = "") -> None:
        self.runs[command] = outcome
        if message:
            self.messages[command] = message[:2000]
        if _RANK[outcome] > _RANK[self.outcome]:
            self.outcome = outcome


def plan(seed: int, cases: int, *, mount_every: int, import_share: float) -> list[Task]:
    tasks = []
    can_mount = os.geteuid() == 0 and os.path.exists("/dev/fuse") and mount_every > 0
    for i in range(cases):
        rng = random.Random(f"{seed}/plan/{i}")
        if rng.random() < import_share:
            tasks.append(Task(i, seed, "import", "import", "", False))
            continue
        target = mutate.pick_target(rng)
        image = rng.choice(seeds.KINDS)
        mount = can_mount and i % mount_every == mount_every - 1
        tasks.append(Task(i, seed, "reader", target, image, mount))
    return tasks


# -- inside a worker --------------------------------------------------------------------


@dataclass
class Env:
    work: Path
    seeds: dict[str, seeds.Seed]
    tar_seed_ids: list[str]


def prepare(work: Path) -> Env:
    work.mkdir(parents=True, exist_ok=True)
    if (work / "seeds").exists():
        shutil.rmtree(work / "seeds")
    built = seeds.build_seeds(work / "seeds")
    (work / "cases").mkdir(exist_ok=True)
    tars._bomb()  # made once, before the workers fork
    return Env(work, built, [])


def run_cli(argv: list[str]) -> tuple[int | None, str, str, BaseException | None]:
    from puzzlefs.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        return main(argv), out.getvalue(), err.getvalue(), None
    except BaseException as e:  # escaped main: always a bug
        return None, out.getvalue(), err.getvalue() + traceback.format_exc(), e
    finally:
        sys.stdout, sys.stderr = old


def classify(
    command: str, code: int | None, out: str, err: str, exc: BaseException | None
) -> tuple[str, str]:
    if isinstance(exc, MemoryError) or "MemoryError" in err:
        return MEMORY, err.strip()
    if exc is not None:
        return INTERNAL, err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    others = [line for line in lines if not line.startswith("warning: ")]
    if code == 0:
        return (ACCEPTED, "") if not others else (INTERNAL, "\n".join(others))
    if code in (1, 2) and len(others) == 1 and others[0].startswith("Error: "):
        if "internal error" in others[0]:
            return INTERNAL, others[0]
        return CLEAN, others[0]
    if command.startswith("verify") and code == 1 and not others:
        return CLEAN, out.strip().splitlines()[0] if out.strip() else ""
    return INTERNAL, f"exit {code}: " + "\n".join(others)[-2000:]


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    out: dict[str, tuple[int, int, int, int]] = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (
                stat.S_IFMT(st.st_mode),
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
            )
    return out


def _tags(oci: Path) -> Any:
    """index.json's bytes, if it is a regular file (opened as the readers must: it
    may be a FIFO)."""
    try:
        fd = os.open(oci / "index.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def check_store(result: Result, oci: Path, before: dict[str, Any], tags: Any) -> None:
    after = snapshot(oci)
    if after == before:
        return
    missing = [k for k in before if k.startswith("blobs/") and k not in after]
    if missing:
        result.add("store", MISSING_BLOB, f"gone: {missing[:5]}")
    if _tags(oci) != tags:
        result.add("store", LOST_TAG, "index.json changed")
    changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
    result.add("store", STORE_CHANGED, f"changed: {sorted(changed)[:5]}")


def check_outside(result: Result, case: Path, allowed: set[str], canary: Path) -> None:
    extra = sorted(set(os.listdir(case)) - allowed)
    if extra:
        result.add("outside", OUTSIDE, f"new entries beside the target: {extra}")
    if os.listdir(canary):
        result.add("outside", OUTSIDE, f"written into the canary: {os.listdir(canary)}")


def run_task(task: Task, env: Env, *, keep: bool = False, verbose: bool = False) -> Result:
    start = time.monotonic()
    result = Result(task)
    case = env.work / "cases" / f"case-{task.seed}-{task.index}"
    if case.exists():
        cleanup(case)
    canary = case / "canary"
    canary.mkdir(parents=True)
    fds = _open_fds()
    try:
        if task.family == "import":
            _import_case(task, case, canary, result, verbose)
        else:
            _reader_case(task, env, case, canary, result, verbose)
    except Exception:
        result.add("fuzzer", INTERNAL, "the fuzzer itself failed:\n" + traceback.format_exc())
    leaked = _open_fds() - fds
    if leaked:
        targets = []
        for fd in sorted(leaked):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        result.add("fds", FD_LEAK, f"{len(leaked)} descriptors left open: {targets[:5]}")
        for fd in leaked:
            with contextlib.suppress(OSError):
                os.close(fd)
    if not keep:
        cleanup(case)
    result.seconds = time.monotonic() - start
    return result


def _reader_case(
    task: Task, env: Env, case: Path, canary: Path, result: Result, verbose: bool
) -> None:
    seed = env.seeds[task.image]
    oci = case / "oci"
    copy_layout(seed.oci, oci)
    layout = CaseLayout(oci, seed.tag)
    rng = random.Random(f"{task.seed}/{task.index}")
    result.what = f"{task.image}: " + mutate.TARGETS[task.target][1](layout, rng, canary)
    if rng.random() < 0.15:  # a second change, anywhere (it may find the first in its way)
        second = mutate.pick_target(rng)
        try:
            result.what += "; then " + mutate.TARGETS[second][1](layout, rng, canary)
        except Exception as e:
            result.what += f"; then {second}: not applicable ({type(e).__name__})"
    if verbose:
        print(f"case {task.index}: {result.what}", flush=True)
    before, tags = snapshot(oci), _tags(oci)
    ref = f"{oci}:{seed.tag}"
    digest = layout.verity or seed.verity
    use_digest = rng.random() < 0.4
    commands: list[tuple[str, list[str]]] = [
        ("verify", ["verify", ref] + (["--digest", digest] if use_digest else [])),
        (
            "extract",
            ["extract", ref, str(case / "out")] + (["--digest", digest] if use_digest else []),
        ),
        ("export", ["export", ref, str(case / "out.tar")]),
        # and what reads the whole store: nothing may change it (gc only says)
        ("tags", ["tags", "--json", str(oci)]),
        ("du", ["du", str(oci)]),
        ("gc", ["gc", "--dry-run", str(oci)]),
    ]
    for name, argv in commands:
        if verbose:
            print(f"  running puzzlefs {' '.join(argv)}", flush=True)
        code, out, err, exc = run_cli(argv)
        result.add(name, *classify(name, code, out, err, exc))
    check_store(result, oci, before, tags)
    check_outside(result, case, {"oci", "out", "out.tar", "canary"}, canary)
    if task.mount:
        from .mounting import mount_and_read

        mount_and_read(ref, case, result, digest if use_digest else None)
        check_store(result, oci, before, tags)


def _import_case(task: Task, case: Path, canary: Path, result: Result, verbose: bool) -> None:
    src = case / "src"
    rng = random.Random(f"{task.seed}/{task.index}")
    result.what = tars.make_case(src, rng)
    if verbose:
        print(f"case {task.index}: {result.what}", flush=True)
    before, tags = snapshot(src), _tags(src)
    spool = case / "spool"
    spool.mkdir()
    dest = f"{case / 'dest'}:t"
    argv = ["import", "--max-layer-size", IMPORT_MAX_LAYER, "--tmpdir", str(spool)]
    code, out, err, exc = run_cli([*argv, f"{src}:{tars.TAG}", dest])
    outcome, message = classify("import", code, out, err, exc)
    result.add("import", outcome, message)
    check_store(result, src, before, tags)
    if os.listdir(spool):
        result.add("spool", OUTSIDE, f"left in the spool: {os.listdir(spool)[:5]}")
    if outcome == ACCEPTED:
        code, out, err, exc = run_cli(["extract", dest, str(case / "out")])
        got, message = classify("extract", code, out, err, exc)
        result.add("extract", EXTRACT_REFUSED if got == CLEAN else got, message)
    check_outside(result, case, {"src", "spool", "dest", "out", "canary"}, canary)


def cleanup(case: Path) -> None:
    """Remove a case directory: first whatever is still mounted in it (a hung or
    crashed mount) and the daemons serving it, which this run started."""
    from .mounting import force_unmount_under

    force_unmount_under(case)
    for dirpath, dirs, _ in os.walk(case):  # read-only directories from an extract
        for d in dirs:
            path = os.path.join(dirpath, d)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)
    shutil.rmtree(case, ignore_errors=True)


def _worker(conn: multiprocessing.connection.Connection, env: Env) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + MEMORY_BUDGET, vm + MEMORY_BUDGET))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            os._exit(0)
        if task is None:
            os._exit(0)
        conn.send(run_task(task, env))


# -- the parent -------------------------------------------------------------------------


class _Worker:
    def __init__(self, ctx: Any, env: Env) -> None:
        parent, child = ctx.Pipe()
        self.conn = parent
        self.proc = ctx.Process(target=_worker, args=(child, env), daemon=True)
        self.proc.start()
        child.close()
        self.task: Task | None = None
        self.deadline = 0.0

    def give(self, task: Task) -> None:
        self.task = task
        timeout = MOUNT_CASE_TIMEOUT if task.mount else CASE_TIMEOUT
        self.deadline = time.monotonic() + timeout
        self.conn.send(task)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join()
        self.conn.close()


def run_all(tasks: list[Task], env: Env, jobs: int, progress: bool = False) -> list[Result]:
    ctx = multiprocessing.get_context("fork")
    queue = list(reversed(tasks))
    workers = [_Worker(ctx, env) for _ in range(max(1, jobs))]
    results: list[Result] = []
    last_report = time.monotonic()
    try:
        while queue or any(w.task for w in workers):
            for w in workers:
                if w.task is None and queue:
                    w.give(queue.pop())
            busy = [w for w in workers if w.task is not None]
            ready = multiprocessing.connection.wait(
                [w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.5
            )
            for i, w in enumerate(workers):
                if w.task is None:
                    continue
                task = w.task
                if w.conn in ready:
                    try:
                        results.append(w.conn.recv())
                        w.task = None
                        continue
                    except (EOFError, OSError):
                        pass  # died while answering: below
                died = w.proc.sentinel in ready or not w.proc.is_alive()
                late = time.monotonic() > w.deadline
                if died or late:
                    w.kill()
                    code = w.proc.exitcode
                    r = Result(task, what="(the worker died or was stopped before saying)")
                    if late and not died:
                        limit = MOUNT_CASE_TIMEOUT if task.mount else CASE_TIMEOUT
                        r.add("case", HANG, f"no answer within {limit:.0f} s")
                    else:
                        r.add("case", CRASH, f"worker exit code {code}")
                    results.append(r)
                    cleanup(env.work / "cases" / f"case-{task.seed}-{task.index}")
                    workers[i] = _Worker(ctx, env)
            if progress and time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                print(f"  {len(results)}/{len(tasks)} cases", file=sys.stderr, flush=True)
    finally:
        for w in workers:
            if w.task is None:
                with contextlib.suppress(OSError, BrokenPipeError):
                    w.conn.send(None)
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.kill()
    results.sort(key=lambda r: r.task.index)
    return results


# -- the report -------------------------------------------------------------------------


def _class(r: Result) -> str:
    if r.task.family == "import":
        return "import: " + r.what.split(":")[0]
    return r.task.target


def table(results: list[Result]) -> str:
    rows: dict[str, Counter[str]] = {}
    for r in results:
        rows.setdefault(_class(r), Counter())[r.outcome] += 1
        if r.task.mount:
            mount = r.runs.get("mount-worst", "")
            if mount:
                rows.setdefault("(mount, of the above)", Counter())[mount] += 1
    cols = OUTCOMES
    head = "| class | cases | " + " | ".join(cols) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(cols)]
    total: Counter[str] = Counter()
    for name in sorted(rows):
        c = rows[name]
        if not name.startswith("("):
            total.update(c)
        lines.append(
            f"| {name} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in cols) + " |"
        )
    lines.append(
        f"| **all** | {sum(total.values())} | " + " | ".join(str(total[o]) for o in cols) + " |"
    )
    return "\n".join(lines)


def findings(results: list[Result]) -> Iterator[str]:
    for r in results:
        if r.outcome in BAD:
            bad = {k: v for k, v in r.runs.items() if v in BAD}
            msgs = {k: r.messages.get(k, "") for k in bad}
            yield (
                f"case {r.task.index} (seed {r.task.seed}, {r.task.family}/{r.task.target}"
                f"{', mount' if r.task.mount else ''}): {r.what}\n  {bad}\n"
                + "".join(f"  {k}: {m}\n" for k, m in msgs.items())
                + f"  reproduce: python3 -m tests.fuzz --seed {r.task.seed} --case {r.task.index}"
                " --keep /tmp/puzzlefs-case"
            )


def to_json(results: list[Result]) -> str:
    return json.dumps([dict(asdict(r), task=asdict(r.task)) for r in results], indent=1)


__all__ = ["Env", "Result", "Task", "plan", "prepare", "run_all", "run_task", "table"]
