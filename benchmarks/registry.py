#!/usr/bin/env python3
"""Registries (issue 14): puzzlefs's own push and pull against skopeo, and container
start-up from a registry behind a limited link.

1. Scale. Images of about 2,400 and 10,000 chunks (random files cut at 8K:32K:128K),
   each pushed to a fresh docker-registry on 127.0.0.1 and pulled back, by
   ``puzzlefs push/pull`` and by ``skopeo copy`` (``--dest-tls-verify=false oci:...
   docker://...`` and back). skopeo's cost per blob grows with the count, so each of
   its runs is capped (``--skopeo-timeout``); a run cut short is extrapolated from the
   blobs it had moved by then at its average rate so far, which, its rate only falling,
   is a lower bound on its time (marked ``>=``).
2. Start-up. The Python-import workload of issue 12 (``chroot MNT python3.11 -c
   "import json, asyncio, ..."`` on /usr/lib/python3.11 and the interpreter's ``ldd``
   closure) and, if its tree exists, the Debian one (``chroot MNT sh -c 'dpkg -l
   >/dev/null; perl -MPOSIX -e 1'`` on ../shared/bench's bookworm minbase), from a
   registry in a network namespace of its own, whose loopback carries ``tc netem``
   (default 100 Mbit/s, 20 ms round trip: 10 ms each way). The registry and the
   puzzlefs processes that talk to it enter that namespace (``nsenter --net``; the
   FUSE mount stays in the host's mount namespace, where the workload runs); the only
   address used is that namespace's own 127.0.0.1, made and removed here. Three ways:
   lazy mount; lazy mount with the access list a recording run (``--record``) wrote
   (``--prefetch-list``); pull, then mount the local copy. Time from the command's
   start to the workload's end, and bytes over the namespace's loopback (TCP payload
   and headers, both directions).

Not a test: nothing asserts. Needs root, /dev/fuse, docker-registry, skopeo, iproute2
(ip, tc with sch_netem) and util-linux's nsenter.

    sudo python3 benchmarks/registry.py [--workdir DIR] [--counts 2400,10000]
        [--skopeo-timeout 300] [--rate 100mbit] [--delay 20ms] [--skip-scale]
        [--skip-startup]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PUZZLEFS = [sys.executable, "-m", "puzzlefs"]
ENV = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
PYTHON = "/usr/bin/python3.11"
PYTHON_COMMAND = [
    PYTHON,
    "-c",
    "import json, asyncio, email, http.client, sqlite3, xml.etree.ElementTree, unittest",
]
DEBIAN_COMMAND = ["sh", "-c", "dpkg -l >/dev/null; perl -MPOSIX -e 1"]
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
BOOKWORM = (
    Path(os.environ.get("BENCH", Path.home() / ".cache" / "puzzlefs-bench")) / "rootfs" / "bookworm"
)
CHUNKS = "8K:32K:128K"


def run(
    cmd: list[str], *, timeout: float = 3600, check: bool = True, **kw: object
) -> subprocess.CompletedProcess[str]:
    kw.setdefault("env", ENV)
    done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        cmd, text=True, capture_output=True, timeout=timeout, **kw
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()[-2000:]}")
    return done


def timed(cmd: list[str], **kw: object) -> float:
    start = time.perf_counter()
    run(cmd, **kw)  # type: ignore[arg-type]
    return time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- a registry --------------------------------------------------------------------------


class Registry:
    def __init__(self, root: Path, netns: str | None = None) -> None:
        self.root = root
        self.netns = netns
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_count(self) -> int:
        base = self.root / "storage" / "docker" / "registry" / "v2" / "blobs" / "sha256"
        try:
            return sum(len(os.listdir(base / d)) for d in os.listdir(base))
        except FileNotFoundError:
            return 0

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            # the descriptor cache Debian's own config.yml turns on: 5-10% off a pull
            "storage:\n  cache:\n    blobdescriptor: inmemory\n"
            f"  filesystem:\n    rootdirectory: {self.root / 'storage'}\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n"
        )
        self.proc = subprocess.Popen(
            [*in_netns(self.netns), "docker-registry", "serve", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env=ENV,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while run([*in_netns(self.netns), "curl", "-sf", "-o", "/dev/null",
                   f"http://{self.host}/v2/"], check=False).returncode != 0:  # fmt: skip
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("docker-registry did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def registry(root: Path, netns: str | None = None) -> Iterator[Registry]:
    shutil.rmtree(root, ignore_errors=True)
    reg = Registry(root, netns)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


def in_netns(name: str | None) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{name}"] if name else []


# -- 1. scale ------------------------------------------------------------------------------


def synthetic_image(workdir: Path, chunks: int) -> tuple[Path, int]:
    """A layout (tag t) with about ``chunks`` chunk blobs, made once and kept."""
    oci = workdir / f"scale-{chunks}"
    if (oci / "index.json").exists():
        return oci, count_chunks(oci)
    src = workdir / f"scale-{chunks}-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    rnd = random.Random(chunks)
    total = chunks * 38_500
    i = 0
    while total > 0:
        size = min(total, 1 << 20)
        (src / f"f{i:05}").write_bytes(rnd.randbytes(size))
        total -= size
        i += 1
    run([*PUZZLEFS, "build", "--chunk-sizes", CHUNKS, str(src), f"{oci}:t"])
    shutil.rmtree(src)
    return oci, count_chunks(oci)


def count_chunks(oci: Path) -> int:
    index = json.loads((oci / "index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((oci / "blobs" / "sha256" / digest).read_text())
    return len(manifest["layers"]) - 2  # rootfs and times


def capped(
    cmd: list[str], progress: Callable[[], int], total: int, cap: float
) -> tuple[float, bool, int]:
    """Run ``cmd`` for at most ``cap`` s: (seconds, finished, blobs done). A run cut
    short is extrapolated at its average rate so far (a lower bound)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                            stdin=subprocess.DEVNULL)  # fmt: skip
    while proc.poll() is None and time.perf_counter() - start < cap:
        time.sleep(0.5)
    elapsed = time.perf_counter() - start
    if proc.poll() is None:
        done = progress()
        proc.kill()
        proc.wait()
        return elapsed * total / max(done, 1), False, done
    assert proc.stderr is not None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.read().decode()[-2000:]}")
    return elapsed, True, total


@dataclass
class ScaleRow:
    chunks: int
    mb: float
    ours_push: float
    ours_pull: float
    sk_push: tuple[float, bool, int]
    sk_pull: tuple[float, bool, int]


def scale(workdir: Path, counts: list[int], cap: float) -> list[ScaleRow]:
    rows = []
    for n in counts:
        oci, chunks = synthetic_image(workdir, n)
        blobs = chunks + 3  # rootfs, times, config
        mb = sum(p.stat().st_size for p in (oci / "blobs" / "sha256").iterdir()) / 1e6
        print(f"# {chunks} chunks, {mb:.0f} MB", flush=True)
        with registry(workdir / "reg-ours") as reg:
            ref = f"docker://{reg.host}/ours:t"
            ours_push = timed([*PUZZLEFS, "push", f"{oci}:t", ref])
            out = workdir / "pulled-ours"
            shutil.rmtree(out, ignore_errors=True)
            ours_pull = timed([*PUZZLEFS, "pull", ref, f"{out}:t"])
            print(f"  puzzlefs push {ours_push:.1f} s, pull {ours_pull:.1f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            skout = workdir / "pulled-skopeo"
            shutil.rmtree(skout, ignore_errors=True)

            def pulled(skout: Path = skout) -> int:
                base = skout / "blobs" / "sha256"
                return len(os.listdir(base)) if base.exists() else 0

            sk_pull = capped(
                ["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false", ref,
                 f"oci:{skout}:t"],
                pulled, blobs, cap,
            )  # fmt: skip
            shutil.rmtree(skout, ignore_errors=True)
        with registry(workdir / "reg-skopeo") as reg:
            sk_push = capped(
                ["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false",
                 f"oci:{oci}:t", f"docker://{reg.host}/skopeo:t"],
                reg.blob_count, blobs, cap,
            )  # fmt: skip
        print(f"  skopeo push {sk_push}, pull {sk_pull}", flush=True)
        rows.append(ScaleRow(chunks, mb, ours_push, ours_pull, sk_push, sk_pull))
    return rows


def scale_table(rows: list[ScaleRow]) -> str:
    def sk(v: tuple[float, bool, int], total: int) -> str:
        t, finished, done = v
        return f"{t:.1f}" if finished else f">= {t:.0f} ({done:,}/{total:,} blobs in the cap)"

    def ratio(v: tuple[float, bool, int], ours: float) -> str:
        return f"{'>= ' if not v[1] else ''}{v[0] / ours:.1f}x"

    out = [
        "| chunks | MB | puzzlefs push s | skopeo push s | ratio | ms/chunk (ours) "
        "| puzzlefs pull s | skopeo pull s | ratio | ms/chunk (ours) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        total = r.chunks + 3
        out.append(
            f"| {r.chunks:,} | {r.mb:.0f} | {r.ours_push:.1f} | {sk(r.sk_push, total)} | "
            f"{ratio(r.sk_push, r.ours_push)} | {1000 * r.ours_push / r.chunks:.2f} | "
            f"{r.ours_pull:.1f} | {sk(r.sk_pull, total)} | {ratio(r.sk_pull, r.ours_pull)} | "
            f"{1000 * r.ours_pull / r.chunks:.2f} |"
        )
    return "\n".join(out)


# -- 2. start-up -----------------------------------------------------------------------------


def python_tree(workdir: Path) -> Path:
    """issue 12's tree: benchmarks/workloads.py's where it exists, else the same
    made here (the interpreter, its library, and their ldd closure)."""
    try:
        from workloads import python_tree as theirs  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return Path(theirs(workdir))
    dest = workdir / "trees" / "python3.11"
    if (workdir / "trees" / "python3.11.done").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for path in ("/usr/lib/python3.11", "/etc/python3.11", PYTHON):
        _copy(path, dest)
    elves = [PYTHON] + [str(p) for p in Path("/usr/lib/python3.11").rglob("*.so")]
    libs: set[str] = set()
    for elf in elves:
        for m in re.finditer(r"(/\S+) \(0x", run(["ldd", elf], check=False).stdout):
            # As named (a symlink, maybe) in its real directory, and what it points to.
            named = os.path.join(os.path.realpath(os.path.dirname(m.group(1))),
                                 os.path.basename(m.group(1)))  # fmt: skip
            libs.update({named, os.path.realpath(named)})
    for lib in sorted(libs):
        _copy(lib, dest)
    for top in ("bin", "lib", "lib64", "sbin"):  # merged /usr, as the host has it
        if os.path.islink(f"/{top}") and not os.path.lexists(dest / top):
            os.symlink(os.readlink(f"/{top}"), dest / top)
    (dest / "dev").mkdir()
    os.mknod(dest / "dev" / "null", 0o666 | 0o020000, os.makedev(1, 3))
    (workdir / "trees" / "python3.11.done").write_text("ok\n")
    return dest


def _copy(path: str, dest: Path) -> None:
    """``path`` to ``dest/path`` as it is (a symlink stays one; directories whole)."""
    target = dest / path.lstrip("/")
    if os.path.lexists(target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
        shutil.copytree(path, target, symlinks=True)
    else:
        shutil.copy2(path, target)


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"pzfsbench{os.getpid()}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "mtu", "1500"])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        run(["ip", "netns", "del", name], check=False)


class Link:
    """The limited link: client <-> ``port`` (in the namespace) <-> the registry.

    With sch_netem, ``port`` is the registry's own and netem on the namespace's
    loopback gives the rate and delay (each packet crosses it once, so each way gets
    half the round trip). Where the kernel has no netem (CONFIG_NET_SCH_NETEM unset,
    as on this project's machines), the delay comes from a small forwarding process
    (``--delay-proxy``: every piece of data is held for half the round trip in each
    direction, pipelined) listening on ``port``, and the rate from tc htb: one 100
    Mbit/s class per direction for traffic to or from ``port``. Bytes over the link:
    what tc counted for it."""

    def __init__(self, ns: str, registry_port: int, rate: str, rtt_ms: float) -> None:
        self.ns = ns
        self.proxy: subprocess.Popen[bytes] | None = None
        tc = ["ip", "netns", "exec", ns, "tc"]
        netem = run([*tc, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "netem",
                     "delay", f"{rtt_ms / 2}ms", "rate", rate, "limit", "100000"],
                    check=False)  # fmt: skip
        self.netem = netem.returncode == 0
        if self.netem:
            self.port = registry_port
            self.how = f"tc netem: {rate}, {rtt_ms / 2} ms each way"
            return
        self.port = free_port()
        self.proxy = subprocess.Popen(
            [*in_netns(ns), sys.executable, __file__, "--delay-proxy",
             str(self.port), str(registry_port), str(rtt_ms / 2)],
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        run([*tc, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "30"])
        for cls in ("1:10", "1:11"):
            run([*tc, "class", "add", "dev", "lo", "parent", "1:", "classid", cls, "htb",
                 "rate", rate, "ceil", rate, "burst", "64k", "cburst", "64k"])  # fmt: skip
        run([*tc, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:30", "htb",
             "rate", "10gbit"])  # fmt: skip
        for field_, cls in (("sport", "1:10"), ("dport", "1:11")):
            match = ["u32", "match", "ip", field_, str(self.port), "0xffff", "flowid", cls]
            run([*tc, "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip",
                 "prio", "1", *match])  # fmt: skip
        deadline = time.monotonic() + 10
        while run([*in_netns(ns), "curl", "-sf", "-o", "/dev/null",
                   f"http://127.0.0.1:{self.port}/v2/"], check=False).returncode != 0:  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError("the delay proxy did not start")
            time.sleep(0.1)
        self.how = f"tc htb {rate} each way, and {rtt_ms / 2} ms each way in a forwarding process"

    def bytes(self) -> int:
        if self.netem:
            text = run([*in_netns(self.ns), "cat", "/proc/net/dev"]).stdout
            for line in text.splitlines():
                if line.strip().startswith("lo:"):
                    return int(line.split(":", 1)[1].split()[8])
            raise RuntimeError("no lo in the namespace")
        text = run(
            ["ip", "netns", "exec", self.ns, "tc", "-s", "class", "show", "dev", "lo"]
        ).stdout
        total = 0
        for block in text.split("class htb ")[1:]:
            if block.startswith(("1:10 ", "1:11 ")):
                m = re.search(r"Sent (\d+) bytes", block)
                total += int(m.group(1)) if m else 0
        return total

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.terminate()
            self.proxy.wait(timeout=10)


def delay_proxy(listen: int, target: int, delay_ms: float) -> None:
    """Forward 127.0.0.1:listen to 127.0.0.1:target, holding every piece of data for
    ``delay_ms`` in each direction (order kept, pipelined: latency, not a rate)."""
    import asyncio

    delay = delay_ms / 1000

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=512)

        async def send() -> None:
            while True:
                due, data = await queue.get()
                wait = due - asyncio.get_running_loop().time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    writer.write_eof() if writer.can_write_eof() else writer.close()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await reader.read(1 << 16)
                await queue.put((asyncio.get_running_loop().time() + delay, data))
                if not data:
                    break
            await sender
        except (ConnectionError, OSError):
            sender.cancel()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pump(cr, uw), pump(ur, cw), return_exceptions=True)

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", listen)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


@dataclass
class Startup:
    workload: str
    way: str
    seconds: float
    bytes: int


def startup(workdir: Path, rate: str, delay_ms: float, repeat: int) -> list[Startup]:
    workloads: list[tuple[str, Path, list[str]]] = [
        ("python imports", python_tree(workdir), PYTHON_COMMAND)
    ]
    if BOOKWORM.is_dir():
        workloads.append(("debian dpkg+perl", BOOKWORM, DEBIAN_COMMAND))
    else:
        print(f"# no {BOOKWORM}: the Debian workload is skipped", flush=True)
    images = workdir / "startup-oci"
    for name, tree, _ in workloads:
        tag = name.split()[0]
        if tag not in _tags(images):
            run([*PUZZLEFS, "build", str(tree), f"{images}:{tag}"])
    results: list[Startup] = []
    with netns() as ns, registry(workdir / "reg-startup", ns) as reg:
        for name, _, _ in workloads:
            tag = name.split()[0]
            ref = f"docker://{reg.host}/w:{tag}"
            run([*in_netns(ns), *PUZZLEFS, "push", f"{images}:{tag}", ref])
        link = Link(ns, reg.port, rate, delay_ms)
        print(f"# the link: {link.how}", flush=True)
        try:
            for name, _, command in workloads:
                _startup_runs(name, command, link, workdir, repeat, results)
        finally:
            link.close()
    return results


def _startup_runs(
    name: str, command: list[str], link: Link, workdir: Path, repeat: int, out: list[Startup]
) -> None:
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    tag = name.split()[0]
    ref = f"docker://127.0.0.1:{link.port}/w:{tag}"
    record = workdir / f"record-{tag}.txt"
    record.unlink(missing_ok=True)
    one_run(link, ref, mnt, command, workdir, ["--record", str(record)])  # not a result
    ways: list[tuple[str, list[str] | None]] = [
        ("lazy mount", []),
        ("lazy mount, recorded prefetch list", ["--prefetch-list", str(record)]),
        ("pull, then mount", None),
    ]
    for _ in range(repeat):
        for way, extra in ways:
            secs, moved = one_run(link, ref, mnt, command, workdir, extra)
            out.append(Startup(name, way, secs, moved))
            print(f"  {name}: {way}: {secs:.2f} s, {moved / 1e6:.1f} MB", flush=True)


def one_run(
    link: Link, ref: str, mnt: Path, command: list[str], workdir: Path, extra: list[str] | None
) -> tuple[float, int]:
    ns = link.ns
    cache = workdir / "startup-cache"
    shutil.rmtree(cache, ignore_errors=True)
    local = workdir / "startup-pulled"
    shutil.rmtree(local, ignore_errors=True)
    env = {"PUZZLEFS_REGISTRY_CACHE": str(cache)}
    before = link.bytes()
    start = time.perf_counter()
    if extra is None:
        run([*in_netns(ns), *PUZZLEFS, "pull", ref, f"{local}:t"], env=dict(ENV, **env))
        run([*PUZZLEFS, "mount", "-o", "dev", f"{local}:t", str(mnt)])
    else:
        run([*in_netns(ns), *PUZZLEFS, "mount", "-o", "dev", *extra, ref, str(mnt)],
            env=dict(ENV, **env))  # fmt: skip
    try:
        run(["chroot", str(mnt), *command], env=CHROOT_ENV, timeout=600)
        secs = time.perf_counter() - start
    finally:
        run([*PUZZLEFS, "umount", str(mnt)], check=False)
        deadline = time.monotonic() + 10
        while os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
    return secs, link.bytes() - before


def _tags(oci: Path) -> set[str]:
    try:
        index = json.loads((oci / "index.json").read_text())
    except FileNotFoundError:
        return set()
    return {m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]}


def startup_table(rows: list[Startup]) -> str:
    out = [
        "| workload | way | time to the workload's end s (median) | MB over the link |",
        "|---|---|---:|---:|",
    ]
    keys = list(dict.fromkeys((r.workload, r.way) for r in rows))
    for w, way in keys:
        sel = [r for r in rows if (r.workload, r.way) == (w, way)]
        secs = statistics.median(r.seconds for r in sel)
        moved = statistics.median(r.bytes for r in sel)
        out.append(f"| {w} | {way} | {secs:.2f} | {moved / 1e6:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--counts", default="2400,10000")
    p.add_argument("--skopeo-timeout", type=float, default=300.0)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--delay", default="20ms", help="round trip")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--delay-proxy", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.delay_proxy:
        delay_proxy(int(args.delay_proxy[0]), int(args.delay_proxy[1]), float(args.delay_proxy[2]))
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces, FUSE)", file=sys.stderr)
        return 1
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return _run(args, args.workdir, argv)
    workdir = Path(tempfile.mkdtemp(prefix="puzzlefs-registry-bench-"))
    try:  # its own scratch (images, registries, caches: over 500 MB) goes with it
        return _run(args, workdir, argv)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path, argv: list[str] | None) -> int:
    delay_ms = float(args.delay.removesuffix("ms"))
    if not args.skip_scale:
        rows = scale(workdir, [int(c) for c in args.counts.split(",")], args.skopeo_timeout)
        print()
        print(f"Push and pull, 127.0.0.1 (skopeo capped at {args.skopeo_timeout:.0f} s):\n")
        print(scale_table(rows))
    if not args.skip_startup:
        rows2 = startup(workdir, args.rate, delay_ms, args.repeat)
        print()
        print(f"Container start-up from a registry behind {args.rate}, {args.delay} round trip:\n")
        print(startup_table(rows2))
    print(f"\n(command: python3 benchmarks/registry.py {' '.join(argv or sys.argv[1:])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
