"""The whole chain on one machine, offline: MCP client -> fininfo -> sidecar -> Polygon stub.

    python examples/demo/run_demo.py [--mode route|proxy|zero-change|all] [--show-logs]

Starts the Polygon stub, the real ``credential-sidecar run`` (file backend,
``keys.yaml`` beside this file) and the fininfo MCP server, each as a child
process on a free port of 127.0.0.1. Then an MCP client calls
``get_stock_aggregates`` as ``alice``, as ``agent-reporting`` and as ``mallory``,
who has no key on file, the way a gateway would: the client ID travels in the
``X-Client-Id`` header of the MCP request. fininfo holds no key; it passes the
caller's identity to the sidecar, which injects that caller's key. It does so
once per way fininfo reaches the sidecar: its route (``route``), and
``HTTP_PROXY`` with the API's own ``http://`` address (``proxy``).

The ``zero-change`` path needs no change to the app at all: an app that calls
``https://api.polygon.io`` with ``requests`` and a placeholder key
(``zero_change_app.py``) runs with ``HTTPS_PROXY`` and ``REQUESTS_CA_BUNDLE``
pointing at a second sidecar (``sidecar-zero-change.yaml``), which intercepts the
tunnel, swaps the placeholder for the one shared key of ``default_client_id``,
and reaches an https stand-in for Polygon through ``connect_to``. The stand-in's
certificate names ``api.polygon.io`` and comes from a private CA made at start.

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
import ssl
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
from stand_in_ca import make_stand_in_tls

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STUB = REPO / "examples" / "polygon-stub" / "stub.py"
FININFO = REPO / "examples" / "fininfo" / "server.py"
SIDECAR_CONFIG = HERE / "sidecar.yaml"
ZERO_CHANGE_CONFIG = HERE / "sidecar-zero-change.yaml"
ZERO_CHANGE_APP = HERE / "zero_change_app.py"
SIDECAR_KEYS = HERE / "keys.yaml"
STUB_KEYS = HERE / "stub-keys.yaml"

READY_TIMEOUT_SECONDS = 30.0
CALL_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# The sidecar writes access lines in batches, a few tens of milliseconds after the request.
ACCESS_LOG_WAIT_SECONDS = 5.0
# Variables a child must not inherit: a proxy setting would divert its traffic
# off 127.0.0.1, and a Polygon key is exactly what fininfo must not hold.
SCRUBBED_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "POLYGON_API_KEY", "SIDECAR_CONFIG")

# Paths through the sidecar; "all" runs every one of them.
FININFO_MODES = ("route", "proxy")
ZERO_CHANGE = "zero-change"
MODES = (*FININFO_MODES, ZERO_CHANGE)
# The zero-change path: the name the app calls, what it holds instead of a key, and
# whose key pays (sidecar-zero-change.yaml's default_client_id, its label in stub-keys.yaml).
POLYGON_HOST = "api.polygon.io"
PLACEHOLDER_KEY = "injected-by-sidecar"
SHARED_CLIENT_ID = "fininfo-shared"
SHARED_KEY_LABEL = "shared-fininfo"

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


def wait_until(
    children: Children,
    name: str,
    url: str,
    ready: Callable[[httpx.Response], bool],
    verify: ssl.SSLContext | bool = True,
) -> None:
    """Poll url until ready(response) holds; fail early if the child died, late after a bound."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    with httpx.Client(trust_env=False, timeout=2.0, verify=verify) as http:
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


def json_or_none(line: str) -> dict[str, Any] | None:
    """A line of a child's output as a JSON object, or None when it is not one."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def sidecar_access_lines(children: Children, name: str, *, method: str) -> list[dict[str, Any]]:
    """The sidecar's access lines for method, once at least one is written (or after a bound)."""
    deadline = time.monotonic() + ACCESS_LOG_WAIT_SECONDS
    while True:
        lines = [
            line
            for line in map(json_or_none, children.log(name).splitlines())
            if line and line.get("event") == "request" and line.get("method") == method
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def app_answer(output: str) -> dict[str, Any] | None:
    """The JSON answer zero_change_app.py printed (its last line), if any."""
    lines = output.strip().splitlines()
    return json_or_none(lines[-1]) if lines else None


@dataclass(frozen=True)
class ZeroChangeSetup:
    sidecar_url: str
    ca_bundle: Path  # the sidecar's ca_cert_out
    stub_tls_port: int


def run_zero_change(children: Children, setup: ZeroChangeSetup, checks: Checks) -> None:
    """Run the app that knows nothing of the sidecar once, and check who paid and how it got there."""
    print(f"\n--- zero change: an app that calls https://{POLYGON_HOST} with requests and knows nothing of the sidecar")
    print(f"  {ZERO_CHANGE_APP.relative_to(REPO)} calls Polygon as the upstream fininfo server does")
    print("  (requests.get with apiKey from POLYGON_API_KEY); nothing in it names the sidecar. Its environment:")
    print(f"    POLYGON_API_KEY={PLACEHOLDER_KEY}   a placeholder, as the app will not start without a key")
    print(f"    HTTPS_PROXY={setup.sidecar_url}   so requests sends CONNECT {POLYGON_HOST}:443 to the sidecar")
    print("    REQUESTS_CA_BUNDLE=<the sidecar's ca_cert_out>   so requests trusts the sidecar's interception CA")
    print(f"  The sidecar ({ZERO_CHANGE_CONFIG.relative_to(REPO)}) intercepts the tunnel, strips the placeholder,")
    print(f"  injects the key of default_client_id {SHARED_CLIENT_ID} (the app sends no identity, so every")
    print(f"  caller shares that key), and dials 127.0.0.1:{setup.stub_tls_port} (connect_to), the https stand-in,")
    print(f"  checking its certificate for {POLYGON_HOST} against a private CA made at start (ca_file).")

    env = child_env(
        POLYGON_API_KEY=PLACEHOLDER_KEY, HTTPS_PROXY=setup.sidecar_url, REQUESTS_CA_BUNDLE=str(setup.ca_bundle)
    )
    app = children.start("zero-change-app", [sys.executable, str(ZERO_CHANGE_APP)], env)
    try:
        status: int | None = app.wait(timeout=CALL_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        status = None
    output = children.log("zero-change-app")
    data = app_answer(output) if status == 0 else None

    print("\n  as the app (no identity, so default_client_id):")
    if data is not None:
        print(f"    data:                {summary(data)}")
        print(f"    key the stub saw:    {data.get('paid_by')}")
    else:
        last = output.strip().splitlines()[-1:] or ["(no output)"]
        print(f"    failed:              {'timed out' if status is None else f'exit {status}'}: {last[0]}")

    stub_calls = [line for line in children.log("polygon-stub-tls").splitlines() if "GET /v2/" in line]
    sidecar_calls = sidecar_access_lines(children, "sidecar-zero-change", method="GET")
    print("\n  checks (zero-change mode):")
    checks.expect(bool(data and data.get("results")), f"the app gets aggregate bars from https://{POLYGON_HOST}")
    checks.expect(
        (data or {}).get("paid_by") == SHARED_KEY_LABEL,
        f"its call is paid by the shared key {SHARED_KEY_LABEL!r} of {SHARED_CLIENT_ID}, not by the placeholder",
    )
    checks.expect(
        len(sidecar_calls) == 1
        and sidecar_calls[0].get("mode") == "mitm"
        and sidecar_calls[0].get("identity") == "default"
        and sidecar_calls[0].get("client_id") == SHARED_CLIENT_ID,
        f"the sidecar served it inside the intercepted tunnel, as default_client_id {SHARED_CLIENT_ID}",
    )
    # The stand-in refuses an unknown key (401) and a doubled apiKey (400): one
    # paid call and nothing else means the placeholder never reached it.
    checks.expect(
        len(stub_calls) == 1 and f"-> 200 paid_by={SHARED_KEY_LABEL} host={POLYGON_HOST}" in stub_calls[0],
        f"the https stand-in saw exactly that call, named {POLYGON_HOST}, and never the placeholder",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every expectation holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        choices=(*MODES, "all"),
        default="all",
        help="the path to show: fininfo through the sidecar's route or HTTP_PROXY, "
        "or an unchanged app through HTTPS_PROXY with interception (default all, one after the other)",
    )
    parser.add_argument("--show-logs", action="store_true", help="print every child's log at the end")
    args = parser.parse_args(argv)
    modes = list(MODES) if args.mode == "all" else [args.mode]
    fininfo_modes = [m for m in modes if m in FININFO_MODES]
    zero_change = ZERO_CHANGE in modes

    stub_port, sidecar_port, admin_port, stub_tls_port, zc_sidecar_port, zc_admin_port, *fininfo_ports = free_ports(
        6 + len(fininfo_modes)
    )
    sidecar_url = f"http://127.0.0.1:{sidecar_port}"
    stub_url = f"http://127.0.0.1:{stub_port}"
    checks = Checks()
    log_dir = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    children = Children(log_dir)
    zc_setup = ZeroChangeSetup(f"http://127.0.0.1:{zc_sidecar_port}", log_dir / "sidecar-ca.pem", stub_tls_port)
    mcp_urls = {}
    try:
        if fininfo_modes:
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
        for mode, port in zip(fininfo_modes, fininfo_ports, strict=True):
            if mode == "route":
                env = child_env(SIDECAR_MODE="route", POLYGON_BASE_URL=f"{sidecar_url}/polygon")
            else:
                # The app's code is unchanged: it calls the API's own address (here the
                # stub's, in production http://api.polygon.io) and HTTP_PROXY sends the
                # request to the sidecar.
                env = child_env(SIDECAR_MODE="proxy", POLYGON_BASE_URL=stub_url, HTTP_PROXY=sidecar_url)
            children.start(f"fininfo-{mode}", [sys.executable, str(FININFO), "--port", str(port)], env)
            mcp_urls[mode] = f"http://127.0.0.1:{port}/mcp"
        if zero_change:
            tls_dir = log_dir / "stand-in-tls"
            tls_dir.mkdir()
            stand_in = make_stand_in_tls(tls_dir, POLYGON_HOST)
            children.start(
                "polygon-stub-tls",
                [
                    *(sys.executable, str(STUB), "--port", str(stub_tls_port), "--keys-file", str(STUB_KEYS)),
                    *("--tls-cert", str(stand_in.cert_chain), "--tls-key", str(stand_in.key)),
                ],
                child_env(),
            )
            children.start(
                "sidecar-zero-change",
                [*sidecar_command(), "run", "--config", str(ZERO_CHANGE_CONFIG)],
                child_env(
                    DEMO_SIDECAR_PORT=str(zc_sidecar_port),
                    DEMO_ADMIN_PORT=str(zc_admin_port),
                    DEMO_STUB_TLS_PORT=str(stub_tls_port),
                    DEMO_STUB_CA=str(stand_in.ca_cert),
                    DEMO_CA_OUT=str(zc_setup.ca_bundle),
                ),
            )

        if fininfo_modes:
            wait_until(children, "polygon-stub", f"{stub_url}/healthz", lambda r: r.status_code == 200)
            wait_until(children, "sidecar", f"http://127.0.0.1:{admin_port}/readyz", lambda r: r.status_code == 200)
        for mode in fininfo_modes:
            # Any HTTP answer means uvicorn is serving; a GET without a session is refused.
            wait_until(children, f"fininfo-{mode}", mcp_urls[mode], lambda r: r.status_code < 500)
        if zero_change:
            # The stand-in's certificate names only api.polygon.io: check the chain, not the name.
            stand_in_trust = ssl.create_default_context(cafile=str(stand_in.ca_cert))
            stand_in_trust.check_hostname = False
            wait_until(
                children,
                "polygon-stub-tls",
                f"https://127.0.0.1:{stub_tls_port}/healthz",
                lambda r: r.status_code == 200,
                verify=stand_in_trust,
            )
            wait_until(
                children,
                "sidecar-zero-change",
                f"http://127.0.0.1:{zc_admin_port}/readyz",
                lambda r: r.status_code == 200,
            )

        print("Running, all on 127.0.0.1 and all offline:")
        if fininfo_modes:
            print(f"  Polygon stub        {stub_url}   accepts the keys in {STUB_KEYS.relative_to(REPO)}")
            print(f"  credential-sidecar  {sidecar_url}   {SIDECAR_CONFIG.relative_to(REPO)}, file backend")
        for mode in fininfo_modes:
            print(f"  fininfo MCP server  {mcp_urls[mode]}   SIDECAR_MODE={mode}, no key in its environment")
        if zero_change:
            print(
                f"  Polygon stub        https://127.0.0.1:{stub_tls_port}   as https://{POLYGON_HOST}, "
                "certificate from a private CA made just now"
            )
            config = ZERO_CHANGE_CONFIG.relative_to(REPO)
            print(f"  credential-sidecar  {zc_setup.sidecar_url}   {config}, interception on")

        for mode in fininfo_modes:
            run_mode(
                mode, mcp_urls[mode], lambda: children.log("polygon-stub"), checks, show_table=mode == fininfo_modes[0]
            )
        if zero_change:
            run_zero_change(children, zc_setup, checks)
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
