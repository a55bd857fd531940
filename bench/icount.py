"""Instructions and system calls per request for two versions: counts, where ab.py times.

    python bench/icount.py 9525757 .              # instructions per request (valgrind's cachegrind)
    python bench/icount.py 9525757 . --syscalls   # system calls per request, by name (strace -c -f)

On the shared 2-core VM, CPU per request moves by a few per cent from one round to the
next, and bench/ab.py's paired rounds cancel most of that, not all: a change worth 1-3%
can take 40 rounds to show, or not show. This counts instead of timing. Each version's
sidecar (route mode, file backend, one nginx upstream on 127.0.0.1, as in ab.py) runs
under valgrind or strace; a Python client sends a fixed number of keep-alive GETs over
``--concurrency`` connections and checks every answer is a 200; the count of a short run
is taken from a long run's, so start-up and shutdown drop out. Instruction counts repeat
to within about 1% (the hash seed is fixed; how many requests one event-loop turn takes
still varies).

What a count cannot see: cache and TLB misses, page faults, what a system call costs in
the kernel. So it answers "does B do more work than A?", and ab.py stays the measure of
speed. Needs valgrind or strace (Debian packages) and nginx, like bench/run.py. A run is
bounded (``--timeout`` per sidecar); every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import harness as bench  # noqa: E402  (processes, ports, nginx, TLS)
from ab import tree_for  # noqa: E402  (a git ref or a prepared tree as a source tree)

REQUEST = b"GET /polygon/x HTTP/1.1\r\nHost: sidecar\r\nX-Client-Id: alice\r\n\r\n"


async def _connection(port: int, requests: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(requests):
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"answer was not a 200: {head[:60]!r}")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if length is None:
                raise RuntimeError("answer without a Content-Length")
            await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()


async def _load(port: int, requests: int, concurrency: int) -> None:
    await asyncio.gather(*(_connection(port, requests // concurrency) for _ in range(concurrency)))


def warm(port: int, timeout: float) -> bool:
    """One request through the sidecar answered 200 (its key then cached)."""
    try:
        status, _ = bench.http_get(port, "/polygon/warm", {"X-Client-Id": "alice"}, timeout=timeout)
    except OSError:
        return False
    return status == 200


def measure(tree: Path, tmp: Path, upstream: int, requests: int, concurrency: int, syscalls: bool,
            timeout: float) -> Path:
    """Run ``tree``'s sidecar under the counting tool for ``requests`` requests; returns its output file."""
    children = bench.Children(tmp)
    port, admin = bench.free_ports(2)
    name = f"{tree.name}-{requests}"
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"mcp/polygon/alice": "k-" + "x" * 32}), encoding="utf-8")
    config = tmp / f"{name}.yaml"
    config.write_text(json.dumps({
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}", "log": {"level": "warning"},
        "secrets": {"backend": "file", "file": {"path": str(keys)}},
        "upstreams": {"polygon": {"url": f"http://127.0.0.1:{upstream}", "secret": "mcp/polygon/{client_id}",
                                  "inject": {"query": "apiKey"}, "allow_private": True}},
    }), encoding="utf-8")
    out = tmp / f"{name}.{'strace' if syscalls else 'cachegrind'}"
    tool = (["strace", "-c", "-f", "-o", str(out)] if syscalls
            else ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}"])
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    try:
        # Children run in tmp, not the repository: the tree on PYTHONPATH is the one imported.
        child = children.start(name, [*tool, sys.executable, "-m", "sidecar", "run", "--config", str(config)], env=env)
        # Under valgrind the port can open well before the first request is answered.
        bench.wait_until(lambda: warm(port, timeout), child, "a 200 to the warm-up request", timeout)
        asyncio.run(asyncio.wait_for(_load(port, requests, concurrency), timeout))
        # SIGTERM to the sidecar itself: it drains and exits, and the tool writes its count.
        target = bench.children_of(child.pid)[0] if syscalls else child.pid
        os.kill(target, signal.SIGTERM)
        child.popen.wait(timeout)
    finally:
        children.stop_all()
    return out


def instructions(path: Path) -> int:
    for line in path.read_text(encoding="ascii").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"{path}: no summary line")


def syscall_counts(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in path.read_text(encoding="ascii").splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="git ref of A, . for the working tree, or a directory holding a sidecar/ tree")
    p.add_argument("b", nargs="?", default=".", help="git ref of B (default: the working tree)")
    p.add_argument("--requests", type=int, default=6400, help="requests in the long run (the short one: a tenth)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2, help="runs per version; each count is printed")
    p.add_argument("--syscalls", action="store_true", help="count system calls (strace) instead of instructions")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for one sidecar's start, load or exit")
    args = p.parse_args()
    needed = "strace" if args.syscalls else "valgrind"
    for tool in (needed, "nginx"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-icount-"))
    os.chmod(tmp, 0o755)  # nginx's worker reads files here
    children = bench.Children(tmp)
    trees: list[Path] = []
    short = args.requests // 10
    try:
        upstream, tls_port = bench.free_ports(2)
        bench.make_tls(tmp)
        conf = bench.render_nginx("upstream.conf", tmp, HTTP_PORT=upstream, TLS_PORT=tls_port)
        (tmp / "files").mkdir(mode=0o755)
        nginx = children.start("nginx", ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-startup.log"),
                                         "-c", str(conf)])
        bench.wait_until(lambda: bench.port_open(upstream), nginx, "nginx", 15)
        sides: dict[str, Path] = {}
        for name, ref in (("A", args.a), ("B", args.b)):
            tree = tree_for(ref, tmp)
            if tree.is_relative_to(tmp):
                trees.append(tree)
            sides[name] = tree
            print(f"{name} = {ref}: {tree} ({bench.sidecar_build(tree)})", flush=True)
        print(f"{args.requests} - {short} requests at c={args.concurrency}, {args.repeat} runs per version", flush=True)
        per_request: dict[str, list[float]] = {"A": [], "B": []}
        calls: dict[str, list[Counter[str]]] = {"A": [], "B": []}
        for i in range(args.repeat):
            for name, tree in sides.items():
                runs = [measure(tree, tmp, upstream, n, args.concurrency, args.syscalls, args.timeout)
                        for n in (short, args.requests)]
                if args.syscalls:
                    low, high = (syscall_counts(r) for r in runs)
                    diff = Counter({k: (high[k] - low[k]) / (args.requests - short) for k in high})
                    calls[name].append(diff)
                    per_request[name].append(sum(diff.values()))
                else:
                    per_request[name].append((instructions(runs[1]) - instructions(runs[0])) / (args.requests - short))
                print(f"run {i + 1} {name}: {per_request[name][-1]:,.1f} "
                      f"{'system calls' if args.syscalls else 'instructions'} per request", flush=True)
        a = sum(per_request["A"]) / len(per_request["A"])
        b = sum(per_request["B"]) / len(per_request["B"])
        print(f"mean: A {a:,.1f}  B {b:,.1f}  B/A {b / a:.3f}")
        if args.syscalls:
            names = sorted({k for c in calls["A"] + calls["B"] for k in c},
                           key=lambda k: -max(c[k] for c in calls["A"] + calls["B"]))
            for k in names:
                ca = sum(c[k] for c in calls["A"]) / len(calls["A"])
                cb = sum(c[k] for c in calls["B"]) / len(calls["B"])
                if max(ca, cb) >= 0.01:
                    print(f"  {k:<16} A {ca:6.2f}  B {cb:6.2f} per request")
    finally:
        children.stop_all()
        for tree in trees:
            subprocess.run(["git", "-C", str(bench.REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
