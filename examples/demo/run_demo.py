"""The whole chain on one machine, offline: MCP client -> fininfo -> sidecar -> Polygon stub.

    python examples/demo/run_demo.py [--mode route|proxy|both] [--show-logs]

Starts the Polygon stub, the real ``credential-sidecar run`` (file backend,
``keys.yaml`` beside this file) and the fininfo MCP server, each as a child
process on a free port of 127.0.0.1. Then an MCP client calls
``get_stock_aggregates`` as ``alice``, as ``agent-reporting`` and as ``mallory``,
who has no key on file, the way a gateway would: the client ID travels in the
``X-Client-Id`` header of the MCP request. fininfo holds no key; it passes the
caller's identity to the sidecar, which injects that caller's key.

Prints, for each caller, the data returned and the label of the key the stub saw
(the stub never reveals a key), or the sidecar's refusal. Exits 1 if any
expectation fails, and always stops its children.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STUB = REPO / "examples" / "polygon-stub" / "stub.py"
FININFO = REPO / "examples" / "fininfo" / "server.py"
SIDECAR_CONFIG = HERE / "sidecar.yaml"
SIDECAR_KEYS = HERE / "keys.yaml"
STUB_KEYS = HERE / "stub-keys.yaml"

READY_TIMEOUT_SECONDS = 30.0
CALL_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# Variables a child must not inherit: a proxy setting would divert its traffic
# off 127.0.0.1, and a Polygon key is exactly what fininfo must not hold.
SCRUBBED_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "POLYGON_API_KEY", "SIDECAR_CONFIG")

QUERY = {"ticker": "AAPL", "multiplier": 1, "timespan": "day", "from_date": "2024-01-02", "to_date": "2024-01-12"}


@dataclass(frozen=True)
class Caller:
    client_id: str
    expected_label: str | None  # None: the sidecar must refuse with no_credential


CALLERS = (
    Caller("alice", "alice-personal"),  # user-based identity: the person using the agent
    Caller("agent-reporting", "reporting-team"),  # agent-based identity: the agent's own client ID
    Caller("mallory", None),  # unknown: no key on file
)


@dataclass
class Outcome:
    caller: Caller
    data: dict[str, Any] | None = None
    refusal: str | None = None


class Checks:
    """Expectations, printed as they are checked; the demo fails if any fails."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.count = 0

    def expect(self, ok: bool, description: str) -> None:
        self.count += 1
        print(f"  {'ok  ' if ok else 'FAIL'} {description}")
        if not ok:
            self.failed.append(description)


class Children:
    """Child processes with their logs in one folder; stop() ends every one of them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(argv, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def free_ports(count: int) -> list[int]:
    """Ports the kernel calls free right now, all bound at once so they differ."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def sidecar_command() -> list[str]:
    """The installed ``credential-sidecar`` beside this interpreter, else ``python -m sidecar``."""
    script = Path(sys.executable).parent / "credential-sidecar"
    if script.exists():
        return [str(script)]
    found = shutil.which("credential-sidecar")
    return [found] if found else [sys.executable, "-m", "sidecar"]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without proxies or keys, plus extra."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in SCRUBBED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_until(children: Children, name: str, url: str, ready: Callable[[httpx.Response], bool]) -> None:
    """Poll url until ready(response) holds; fail early if the child died, late after a bound."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    with httpx.Client(trust_env=False, timeout=2.0) as http:
        while time.monotonic() < deadline:
            if children.procs[name].poll() is not None:
                raise DemoError(f"{name} exited with status {children.procs[name].returncode} while starting")
            try:
                if ready(http.get(url)):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise DemoError(f"{name} was not ready at {url} within {READY_TIMEOUT_SECONDS:.0f} s")


class DemoError(Exception):
    """The demo could not run (as opposed to an expectation that failed)."""


async def call_tool_as(mcp_url: str, client_id: str, tool: str, arguments: dict[str, Any]) -> Any:
    """One MCP session that presents client_id, as a gateway would, and one tool call."""
    import httpx2  # the mcp SDK's HTTP client
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    headers = {"X-Client-Id": client_id}
    async with (
        httpx2.AsyncClient(headers=headers, trust_env=False, timeout=CALL_TIMEOUT_SECONDS) as http,
        Client(streamable_http_client(mcp_url, http_client=http), read_timeout_seconds=CALL_TIMEOUT_SECONDS) as mcp,
    ):
        return await mcp.call_tool(tool, arguments)


def text_of(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


def call_as(mcp_url: str, caller: Caller) -> Outcome:
    """get_stock_aggregates as caller: the data, or the refusal the tool passed on."""
    result = asyncio.run(call_tool_as(mcp_url, caller.client_id, "get_stock_aggregates", QUERY))
    if result.is_error:
        return Outcome(caller, refusal=text_of(result))
    data = result.structured_content
    return Outcome(caller, data=data if isinstance(data, dict) else json.loads(text_of(result)))


def summary(data: Mapping[str, Any]) -> str:
    """One line about the bars returned."""
    bars = data.get("results") or []
    if not bars:
        return f"{data.get('ticker')}: no bars"
    first, last = bars[0], bars[-1]
    return (
        f"{data.get('ticker')} {QUERY['from_date']}..{QUERY['to_date']}: {len(bars)} daily bars, "
        f"close {first['c']:.2f} -> {last['c']:.2f}, high {max(b['h'] for b in bars):.2f}, "
        f"volume {sum(b['v'] for b in bars):,}"
    )


def secret_values() -> list[str]:
    """Every key value of the demo's store, to prove none leaks."""
    store = yaml.safe_load(SIDECAR_KEYS.read_text(encoding="utf-8"))
    return [str(v) for v in store.values()]


def run_mode(mode: str, mcp_url: str, stub_log: Callable[[], str], checks: Checks, *, show_table: bool) -> None:
    """Call as every caller through one fininfo server and check what came back."""
    print(f"\n--- SIDECAR_MODE={mode}: get_stock_aggregates {json.dumps(QUERY)}")
    requests_before = stub_log().count("GET /v2/")
    outcomes = [call_as(mcp_url, caller) for caller in CALLERS]
    for o in outcomes:
        print(f"\n  as {o.caller.client_id}:")
        if o.data is not None:
            print(f"    data:                {summary(o.data)}")
            print(f"    key the stub saw:    {o.data.get('paid_by')}")
        else:
            print(f"    refused:             {o.refusal}")
    table = None
    if show_table:
        table = asyncio.run(call_tool_as(mcp_url, CALLERS[0].client_id, "print_stock_data", {**QUERY, "limit": 3}))
        print(f"\n  print_stock_data as {CALLERS[0].client_id}, limit 3:")
        print("\n".join(f"    {line}" for line in text_of(table).splitlines()))

    print(f"\n  checks ({mode} mode):")
    labels = []
    for o in outcomes:
        who = o.caller.client_id
        if o.caller.expected_label is None:
            checks.expect(
                o.data is None and "no_credential" in (o.refusal or ""),
                f"{who} is refused with the sidecar's no_credential error",
            )
            continue
        got = (o.data or {}).get("paid_by")
        labels.append(got)
        checks.expect(bool(o.data and o.data.get("results")), f"{who} gets aggregate bars")
        checks.expect(got == o.caller.expected_label, f"{who}'s call is paid by key {o.caller.expected_label!r}")
    checks.expect(len(set(labels)) == len(labels), "each client's call is paid by a different key")
    if table is not None:
        checks.expect(not table.is_error and "Results Count: 3" in text_of(table), "print_stock_data formats the bars")
    expected_calls = len(labels) + (table is not None)
    served = stub_log().count("GET /v2/") - requests_before
    checks.expect(
        served == expected_calls, f"the stub saw {expected_calls} calls: the refused caller never reached the API"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every expectation holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=("route", "proxy", "both"),
        default="both",
        help="how fininfo reaches the sidecar (default both, one fininfo server each)",
    )
    parser.add_argument("--show-logs", action="store_true", help="print every child's log at the end")
    args = parser.parse_args(argv)
    modes = ["route", "proxy"] if args.mode == "both" else [args.mode]

    stub_port, sidecar_port, admin_port, *fininfo_ports = free_ports(3 + len(modes))
    sidecar_url = f"http://127.0.0.1:{sidecar_port}"
    stub_url = f"http://127.0.0.1:{stub_port}"
    checks = Checks()
    log_dir = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    children = Children(log_dir)
    try:
        children.start(
            "polygon-stub",
            [sys.executable, str(STUB), "--port", str(stub_port), "--keys-file", str(STUB_KEYS)],
            child_env(),
        )
        children.start(
            "sidecar",
            [*sidecar_command(), "run", "--config", str(SIDECAR_CONFIG)],
            child_env(
                DEMO_SIDECAR_PORT=str(sidecar_port), DEMO_ADMIN_PORT=str(admin_port), DEMO_STUB_PORT=str(stub_port)
            ),
        )
        mcp_urls = {}
        for mode, port in zip(modes, fininfo_ports, strict=True):
            if mode == "route":
                env = child_env(SIDECAR_MODE="route", POLYGON_BASE_URL=f"{sidecar_url}/polygon")
            else:
                # The app's code is unchanged: it calls the API's own address (here the
                # stub's, in production http://api.polygon.io) and HTTP_PROXY sends the
                # request to the sidecar.
                env = child_env(SIDECAR_MODE="proxy", POLYGON_BASE_URL=stub_url, HTTP_PROXY=sidecar_url)
            children.start(f"fininfo-{mode}", [sys.executable, str(FININFO), "--port", str(port)], env)
            mcp_urls[mode] = f"http://127.0.0.1:{port}/mcp"

        wait_until(children, "polygon-stub", f"{stub_url}/healthz", lambda r: r.status_code == 200)
        wait_until(children, "sidecar", f"http://127.0.0.1:{admin_port}/readyz", lambda r: r.status_code == 200)
        for mode in modes:
            # Any HTTP answer means uvicorn is serving; a GET without a session is refused.
            wait_until(children, f"fininfo-{mode}", mcp_urls[mode], lambda r: r.status_code < 500)

        print("Running, all on 127.0.0.1 and all offline:")
        print(f"  Polygon stub        {stub_url}   accepts the keys in {STUB_KEYS.relative_to(REPO)}")
        print(f"  credential-sidecar  {sidecar_url}   file backend {SIDECAR_KEYS.relative_to(REPO)}")
        for mode in modes:
            print(f"  fininfo MCP server  {mcp_urls[mode]}   SIDECAR_MODE={mode}, no key in its environment")

        for mode in modes:
            run_mode(mode, mcp_urls[mode], lambda: children.log("polygon-stub"), checks, show_table=mode == modes[0])
    except DemoError as exc:
        checks.expect(False, f"the demo runs: {exc}")
    finally:
        children.stop()

    logs = {name: children.log(name) for name in children.procs}
    leaked = [name for name, text in logs.items() for value in secret_values() if value in text]
    for value in secret_values():  # a failing demo shows logs, and must not show a key even then
        logs = {name: text.replace(value, "[LEAKED KEY REDACTED]") for name, text in logs.items()}
    print("\n  checks (all modes):")
    checks.expect(not leaked, f"no key value appears in any log ({', '.join(sorted(logs))})")
    if args.show_logs or checks.failed:
        for name, text in logs.items():
            shown = text if args.show_logs else "\n".join(text.splitlines()[-30:])
            print(f"\n===== {name} log{'' if args.show_logs else ' (last lines)'} =====\n{shown.rstrip()}")
    shutil.rmtree(log_dir, ignore_errors=True)

    if checks.failed:
        print(f"\nDEMO FAILED: {len(checks.failed)} of {checks.count} checks failed")
        return 1
    print(f"\nDemo complete: all {checks.count} checks passed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
