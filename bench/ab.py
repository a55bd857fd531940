"""A/B two versions of the sidecar on the same machine at the same time.

    python bench/ab.py HEAD~3                 # that commit against the working tree
    python bench/ab.py main my-branch --rounds 6 --concurrency 16 64
    python bench/ab.py main . --forward-proxy # absolute-form request lines, as behind HTTP_PROXY

On a shared VM the machine's speed drifts by 10-20% within an hour, more than most
single changes are worth, so two full benchmark runs cannot be compared. This
starts both versions side by side (route mode, or forward-proxy mode with
--forward-proxy; file backend, one nginx upstream on 127.0.0.1) and interleaves
short wrk rounds, A then B, then B then A, so both see the same machine. It prints
CPU microseconds per request (utime + stime from /proc) and req/s per round and the
medians. An A/A run (the same ref twice) differs by about 2%. Every run is bounded
(--rounds x --duration per concurrency); every process is stopped at the end.
Needs Debian's nginx and wrk, like bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import harness as bench  # noqa: E402  (bench/harness.py: processes, ports, wrk, /proc)


def tree_for(ref: str, tmp: Path) -> Path:
    """The source tree of ``ref``: the working tree for ".", else a detached worktree."""
    if ref == ".":
        return REPO
    if (Path(ref) / "sidecar").is_dir():
        return Path(ref).resolve()  # a prepared tree (a compiled build, say), used as it is
    path = tmp / f"tree-{len(list(tmp.glob('tree-*')))}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), ref], check=True)
    return path


#: wrk script for --forward-proxy: every request line in absolute form, as an app sends it to
#: its HTTP proxy (HTTP_PROXY), with the upstream's Host; any request() below keeps both.
FORWARD_PROXY = """
wrk.path = "%s"
wrk.headers["Host"] = "%s"
"""

#: wrk script for --clients: each request names the next of N clients, in turn.
ROTATE_CLIENTS = """
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, {["X-Client-Id"] = "client-" .. (n %% %d)})
end
"""


def upstream_connections(pids: list[int], port: int) -> int:
    """Established connections from ``pids`` to 127.0.0.1:``port`` (ss -tnp)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( dport = :{port} )"],
                         capture_output=True, text=True, timeout=10, check=False).stdout
    return sum(1 for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids))


def start(children: bench.Children, name: str, tree: Path, tmp: Path, upstream: int,
          workers: int = 1, clients: int = 0, token: str | None = None,
          forward_proxy: bool = False) -> tuple[bench.Child, int]:
    port, admin = bench.free_ports(2)
    keys = tmp / "keys.json"
    names = ["alice", bench.CLIENT_ID, *(f"client-{i}" for i in range(clients))]
    keys.write_text(json.dumps({f"mcp/polygon/{n}": "k-" + "x" * 32 for n in names}), encoding="utf-8")
    config = tmp / f"{name}.yaml"
    document: dict[str, object] = {
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}", "log": {"level": "warning"},
        "secrets": {"backend": "file", "file": {"path": str(keys)}}, "workers": workers,
        "upstreams": {"polygon": {"url": f"http://127.0.0.1:{upstream}", "secret": "mcp/polygon/{client_id}",
                                  "inject": {"query": "apiKey"}, "allow_private": True}},
    }
    if forward_proxy:
        document["forward_proxy"] = {"enabled": True}
    if token is not None:
        # bench.make_jwt wrote the JWKS to files/, which the nginx upstream serves.
        document["identity"] = {"jwt": {"issuer": bench.JWT_ISSUER,
                                        "jwks_url": f"http://127.0.0.1:{upstream}/files/jwks.json"}}
    config.write_text(json.dumps(document), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    print(f"{name}: {tree} ({bench.sidecar_build(tree)})", flush=True)
    child = children.start(name, [sys.executable, "-m", "sidecar", "run", "--config", str(config)], env=env)
    bench.wait_until(lambda: bench.port_open(port), child, "listening port", 20)
    identity = {"Authorization": f"Bearer {token}"} if token is not None else {"X-Client-Id": "alice"}
    if forward_proxy:
        authority = f"127.0.0.1:{upstream}"
        status, _ = bench.http_get(port, f"http://{authority}/warm", {**identity, "Host": authority})
    else:
        status, _ = bench.http_get(port, "/polygon/warm", identity)
    if status != 200:
        raise RuntimeError(f"{name}: warm-up answered {status}")
    return child, port


def interleave(
    sides: dict[str, tuple[bench.Child, int]], path: str, headers: list[str], script: Path | None,
    concurrency: list[int], rounds: int, duration: int, note: Callable[[list[int]], str] | None = None,
) -> dict[int, dict[str, list[dict[str, float]]]]:
    """Short wrk rounds against sides A and B in turn (ABBA); prints each round, the medians, the paired ratios.

    ``sides`` maps "A" and "B" to a sidecar and its port; ``note(pids)`` adds a word to a
    side's column after its round. Returns every round's wrk result by concurrency and side.
    """
    results: dict[int, dict[str, list[dict[str, float]]]] = {}
    for c in concurrency:
        got: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        results[c] = got
        for i in range(rounds):
            line = f"c={c:<3} round {i + 1}:"
            # A then B, then B then A: whatever the VM does between the two runs of a
            # round (a side that runs second tends to find the caches warmer, or colder)
            # falls on each side equally.
            order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
            for name, (child, port) in order:
                pids = [child.pid, *bench.children_of(child.pid)]
                r = bench.run_wrk(f"http://127.0.0.1:{port}{path}", c, duration, headers, pids, script=script)
                got[name].append(r)
                line += f"  {name} {r['cpu_us_per_req']:6.1f} us/req {r['rps']:8.0f} req/s"
                if r["non2xx"]:  # refused or failed requests: not what the round meant to measure
                    line += f" ({r['non2xx']:.0f} non-2xx)"
                if note is not None:
                    line += note(pids)
            print(line, flush=True)
        med = {n: (statistics.median(r["cpu_us_per_req"] for r in rs), statistics.median(r["rps"] for r in rs))
               for n, rs in got.items()}
        print(f"c={c:<3} median:   A {med['A'][0]:6.1f} us/req {med['A'][1]:8.0f} req/s"
              f"   B {med['B'][0]:6.1f} us/req {med['B'][1]:8.0f} req/s"
              f"   B/A CPU {med['B'][0] / med['A'][0]:.3f}, req/s {med['B'][1] / med['A'][1]:.3f}")
        # Each round's A and B ran back to back: their ratio does not pair a fast minute
        # of the VM with a slow one, as a ratio of two medians can.
        pairs = list(zip(got["A"], got["B"], strict=True))
        cpu = [b["cpu_us_per_req"] / a["cpu_us_per_req"] for a, b in pairs if a["cpu_us_per_req"]]
        rps = [b["rps"] / a["rps"] for a, b in pairs if a["rps"]]
        if cpu and rps:
            print(f"c={c:<3} paired:   median of the per-round B/A ratios: CPU {statistics.median(cpu):.3f},"
                  f" req/s {statistics.median(rps):.3f}")
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="git ref of A, . for the working tree, or a directory holding a sidecar/ tree")
    p.add_argument("b", nargs="?", default=".", help="git ref of B (default: the working tree)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk round")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16])
    p.add_argument("--workers", type=int, default=1,
                   help="the sidecar's workers setting; CPU then counts the supervisor and every worker")
    p.add_argument("--body-bytes", type=int, default=0,
                   help="answer with a static file of this size instead of the ~300-byte JSON (0: the JSON)")
    p.add_argument("--clients", type=int, default=0,
                   help="requests name N clients in turn instead of one (the pool keeps connections per "
                        "client); prints the upstream connections each side holds after each round")
    p.add_argument("--jwt", action="store_true",
                   help="JWT identity: every request carries one RS256 token (verified once, then cached)")
    p.add_argument("--forward-proxy", action="store_true",
                   help="forward-proxy mode (forward_proxy.enabled): requests name the upstream in absolute form, "
                        "GET http://127.0.0.1:PORT/x, instead of route mode's GET /polygon/x")
    args = p.parse_args()
    if args.jwt and args.clients:
        p.error("--jwt and --clients do not combine (one token names one client)")
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-ab-"))
    os.chmod(tmp, 0o755)  # nginx's worker reads the files below
    children = bench.Children(tmp)
    trees: list[Path] = []
    try:
        # bench/run.py's upstream: the ~300-byte JSON at /, static files under /files/.
        upstream, tls_port = bench.free_ports(2)
        bench.make_tls(tmp)
        conf = bench.render_nginx("upstream.conf", tmp, HTTP_PORT=upstream, TLS_PORT=tls_port)
        path = "/x"
        (tmp / "files").mkdir(mode=0o755)
        token = None
        if args.jwt:
            token = bench.make_jwt(tmp)
            (tmp / "jwks.json").rename(tmp / "files" / "jwks.json")
            os.chmod(tmp / "files" / "jwks.json", 0o644)
        if args.body_bytes:
            (tmp / "files" / "body.json").write_bytes(b"x" * args.body_bytes)
            path = "/files/body.json"
        nginx = children.start("nginx", ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-startup.log"),
                                         "-c", str(conf)])
        bench.wait_until(lambda: bench.port_open(upstream), nginx, "nginx", 15)
        sides = {}
        for name, ref in (("A", args.a), ("B", args.b)):
            tree = tree_for(ref, tmp)
            if tree.is_relative_to(tmp):  # a worktree made here: removed at the end
                trees.append(tree)
            sides[name] = start(children, name, tree, tmp, upstream, args.workers, args.clients, token,
                                args.forward_proxy)
        headers = [f"Authorization: Bearer {token}"] if token is not None else ["X-Client-Id: alice"]
        lua = []
        if args.forward_proxy:
            # wrk's URL names the sidecar; the script puts the upstream in the request line.
            authority = f"127.0.0.1:{upstream}"
            lua.append(FORWARD_PROXY % (f"http://{authority}{path}", authority))
            path = "/"
        else:
            path = "/polygon" + path
        if args.clients:
            lua.append(ROTATE_CLIENTS % args.clients)
            headers = []
        script = None
        if lua:
            script = tmp / "requests.lua"
            script.write_text("".join(lua), encoding="utf-8")
        print(f"A = {args.a}, B = {args.b}; {args.rounds} rounds of {args.duration} s per concurrency"
              + ("; forward-proxy mode (absolute-form request lines)" if args.forward_proxy else "")
              + (f"; {args.clients} clients in turn" if args.clients else ""))

        def conns(pids: list[int]) -> str:
            return f" {upstream_connections(pids, upstream):4d} conns"

        interleave(sides, path, headers, script, args.concurrency, args.rounds, args.duration,
                   conns if args.clients else None)
    finally:
        children.stop_all()
        for tree in trees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)  # configs, keys file, logs
    return 0


if __name__ == "__main__":
    sys.exit(main())
