"""What the benchmarks share: processes, ports, wrk, /proc and the fixture they serve.

bench/run.py, bench/ab.py, bench/credentials_ab.py and bench/icount.py import it (``import harness as
bench`` in the last three). It offers:

- /proc readers: ``cpu_split``/``cpu_ticks`` (utime, stime), ``rss_bytes``, ``children_of``;
- ports and processes: ``free_port``/``free_ports``, ``port_open``, ``Child``/``Children`` (every
  child stopped by ``stop_all``), ``wait_until``, ``http_get``, ``tail``, ``raise_nofile``;
- wrk: ``run_wrk`` (one run, CPU per request of the measured PIDs), ``parse_wrk``, ``median_of``;
- the fixture: ``CLIENT_ID``, ``BODY`` (the upstream's answer), ``JWT_ISSUER``, ``make_tls``
  (a trustme CA and server cert), ``make_jwt`` (JWKS file and token), ``render_nginx`` (bench/nginx/);
- the machine: ``machine()`` (CPU, versions, build) and ``sidecar_build(tree)``.

Nothing here starts anything on import; every helper binds 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
MB = 1_000_000
MIB = 1024 * 1024

CLIENT_ID = "bench-client"
# About 300 bytes, like a small market-data answer. No ' or $: it sits in an nginx string.
BODY = (
    '{"ticker":"AAPL","queryCount":1,"resultsCount":1,"adjusted":true,"results":[{"T":"AAPL",'
    '"v":70790813,"vw":131.6292,"o":130.465,"c":131.96,"h":132.42,"l":129.64,"t":1673240400000,'
    '"n":645365}],"status":"OK","request_id":"6a7e466379af0a71039d60cc78e72282","count":1,'
    '"next_url":null,"note":"bench fixture answer padded to about three hundred bytes"}'
)
# http: the keys are served over http on 127.0.0.1, and an https issuer would need
# identity.jwt.allow_http_jwks (a flag older versions, A in bench/ab.py, do not know).
JWT_ISSUER = "http://idp.bench.invalid/realms/bench"


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()


def cpu_split(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) of every process in ``pids`` (all threads), in clock ticks."""
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            user += int(fields[11])
            system += int(fields[12])
    return user, system


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of every process in ``pids`` (all threads), in clock ticks."""
    return sum(cpu_split(pids))


def rss_bytes(pids: list[int], key: str = "VmRSS") -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1]) * 1024
    return total


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(_stat_fields(int(entry))[1]) == pid:
                    out.append(int(entry))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are chosen (the kernel
    may hand out a port again as soon as the socket that had it is closed)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))



# --------------------------------------------------------------------------- processes


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    pids: list[int] = field(default_factory=list)  # what CPU and RSS are measured over

    @property
    def pid(self) -> int:
        return self.popen.pid


class Children:
    """Every child the run starts; ``stop_all`` ends them (TERM, then KILL) and their workers."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[Child] = []

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Child:
        log = self.tmp / f"{name}.out"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.tmp, preexec_fn=raise_nofile,
            )
        child = Child(name, popen, log, [popen.pid])
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 5.0) -> None:
        workers = [p for p in child.pids if p != child.pid] + children_of(child.pid)
        if child.popen.poll() is None:
            child.popen.send_signal(signal.SIGTERM)
            try:
                child.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                child.popen.kill()
                child.popen.wait(timeout)
        for pid in set(workers):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                self.stop(child)


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def http_get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], child: Child, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} exited ({child.popen.returncode}) before {what}:\n{tail(child.log)}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.05)
    raise RuntimeError(f"{child.name}: no {what} after {timeout:g}s:\n{tail(child.log)}")


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------- wrk

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests, requests/s, p50/p99 (ms) and error counts from ``wrk --latency`` output."""
    result: dict[str, float] = {"non2xx": 0, "socket_errors": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if not m:
        raise ValueError(f"wrk output without a request count:\n{out}")
    result["requests"] = int(m.group(1))
    result["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        pm = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if pm:
            result[key] = _ms(pm.group(1))
    nm = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if nm:
        result["non2xx"] = int(nm.group(1))
    sm = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sm:
        result["socket_errors"] = sum(int(g) for g in sm.groups())
    return result


def run_wrk(
    url: str, connections: int, duration: int, headers: list[str], measured: list[int],
    extra_measured: list[int] | None = None, script: Path | None = None,
) -> dict[str, float]:
    """One wrk run; CPU per request of the ``measured`` processes from /proc (utime+stime)."""
    cmd = ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    if script is not None:
        cmd += ["-s", str(script)]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    before = cpu_split(measured)
    before_extra = cpu_ticks(extra_measured or [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    after = cpu_split(measured)
    after_extra = cpu_ticks(extra_measured or [])
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr or proc.stdout}")
    result = parse_wrk(proc.stdout)
    n = max(result["requests"], 1)
    user, system = after[0] - before[0], after[1] - before[1]
    result["cpu_us_per_req"] = (user + system) / CLK_TCK / n * 1e6
    result["cpu_sys_share"] = system / (user + system) if user + system else 0.0
    if extra_measured:
        result["upstream_cpu_us_per_req"] = (after_extra - before_extra) / CLK_TCK / n * 1e6
    return result


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*(r.keys() for r in runs))
    return {k: statistics.median(r[k] for r in runs if k in r) for k in keys}



# --------------------------------------------------------------------------- fixtures


def make_tls(tmp: Path) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    tls = tmp / "tls"
    tls.mkdir()
    ca.cert_pem.write_to_path(str(tls / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tls / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(tls / "server.pem"))
    with open(tls / "server.pem", "ab") as f:
        for pem in cert.cert_chain_pems[1:]:
            f.write(pem.bytes())


def make_jwt(tmp: Path) -> str:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": "bench-1", "use": "sig", "alg": "RS256"})
    (tmp / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims = {
        "iss": JWT_ISSUER, "sub": CLIENT_ID, "client_id": CLIENT_ID, "iat": now, "exp": now + 4 * 3600,
        "scope": "market:read",
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench-1"})


def render_nginx(template: str, tmp: Path, **fields: str | int) -> Path:
    text = (HERE / "nginx" / template).read_text()
    user = "user root root;" if os.geteuid() == 0 else ""
    values = {"DIR": str(tmp), "USER": user, "BODY": BODY, **{k: str(v) for k, v in fields.items()}}
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.search(r"\{\{\w+\}\}", text)
    if leftover:
        raise RuntimeError(f"{template}: unfilled {leftover.group(0)}")
    name = template.replace(".conf", "")
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / f"{name}-tmp" / sub).mkdir(parents=True, exist_ok=True)
    path = tmp / f"nginx-{template}"
    path.write_text(text)
    return path



# --------------------------------------------------------------------------- machine


def machine() -> dict[str, str]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        mem = f.readline().split(":", 1)[1].strip()

    def version(cmd: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        return "?"

    try:
        import aiohttp

        aio = aiohttp.__version__
    except ImportError:
        aio = "?"
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    return {
        "cpu": model, "nproc": str(os.cpu_count()), "memory": mem, "kernel": platform.release(),
        "python": platform.python_version(), "aiohttp": aio, "uvloop": uv,
        "nginx": version(["nginx", "-v"]), "wrk": version(["wrk", "--version"]),
        # compiled (mypyc, scripts/compile.sh) or python: the same source, about 20% apart
        "sidecar_build": sidecar_build(REPO),
    }


def sidecar_build(tree: Path) -> str:
    """``compiled`` or ``python``: how the sidecar in ``tree`` runs under this interpreter.

    Fails if Python imports ``sidecar`` from anywhere but ``tree`` (an installed copy, say).
    """
    out = subprocess.run(
        [PY, "-c", "import sidecar, sidecar.buildinfo as b; print(sidecar.__file__); print(b.build())"],
        env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()
    where, build = out[0], out[1]
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{tree}: Python imports sidecar from {where}")
    return build

