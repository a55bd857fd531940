"""The Grafana dashboard the chart ships: every panel's query returns data from a real Prometheus.

A real Prometheus (Debian's package) scrapes a running sidecar (the real CLI, on a
Secrets Manager the test can make fail, beside an echo upstream) every second,
with the namespace and pod labels a ServiceMonitor would add. The sidecar gets a
few hundred requests: most proxied, some refused for each of several reasons, some
to an upstream that refuses connections, and a store outage in the middle (keys
served stale, a new client answered 503). Then each panel's query, with the
dashboard's template variables filled in, goes through Prometheus's HTTP API and
must parse and return numbers.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import requests
import yaml

from tests.support.aws import AWS_ENV
from tests.support.leaks import output_file
from tests.support.process import SidecarProcess, metric
from tests.support.store_faults import FakeSecretsManager
from tests.support.upstream import EchoUpstream, closed_port, free_ports

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "credential-sidecar"
DASHBOARD = CHART_DIR / "files" / "grafana-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
NAMESPACE, POD = "mcp-test", "fin-credential-sidecar-0"
#: What the test puts in for $__rate_interval. Grafana's would be four scrape intervals (4 s),
#: but on a busy machine a 1 s scrape slips or times out, and a series born late in the
#: run (the outage's) then has no two samples 4 s apart: the question here is whether each
#: panel's query has data, not Grafana's exact window.
RATE_INTERVAL = "30s"
#: Panels whose metric has no series yet, and why; their queries must still parse.
MAY_BE_EMPTY = {
    "Token requests by upstream, grant and result": "sidecar_token_requests_total comes with OAuth credentials",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def metric_of(expr: str) -> str:
    """The metric a panel query reads (the first sidecar_* name in it)."""
    match = re.search(r"sidecar_\w+", expr)
    assert match is not None, expr
    return match.group(0)


def substitute(expr: str) -> str:
    """A panel query as Grafana sends it, with every variable this dashboard uses filled in."""
    out = (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$namespace", NAMESPACE)
        .replace("$pod", POD)
    )
    assert "$" not in out, f"a variable the test does not know: {out}"
    return out


# --------------------------------------------------------------------------- the file and the chart


def test_dashboard_has_the_panels_and_variables_operators_expect() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= set(variables)
    assert variables["pod"]["multi"] and variables["pod"]["includeAll"]
    text = json.dumps([p["targets"] for p in panels()])
    for metric_name in (
        "sidecar_requests_total", "sidecar_request_duration_seconds_bucket", "sidecar_denied_total",
        "sidecar_secret_lookups_total", "sidecar_secret_fetch_duration_seconds_bucket",
        "sidecar_inflight_requests", "sidecar_token_requests_total",
    ):
        assert metric_name in text, metric_name
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels():
        assert panel["description"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            # every query is scoped to the chosen namespace and pods
            assert 'namespace="$namespace", pod=~"$pod"' in target["expr"], panel["title"]


def test_operations_lists_every_panel_with_its_queries() -> None:
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    for panel in panels():
        assert f"| {panel['title']} |" in text, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].replace("|", "\\|") in text, target["expr"]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def test_chart_ships_the_dashboard_in_a_configmap_for_grafanas_sidecar(chart: helm.Chart) -> None:
    def render(values: dict[str, Any]) -> dict[str, Any]:
        out = chart.render(copy.deepcopy(values), name="fin", namespace="mcp")
        return {Path(p).name: yaml.safe_load(t) for p, t in out.items() if not p.endswith(".txt")}

    assert render({}).get("grafana-dashboard.yaml") is None
    config_map = render(
        {"metrics": {"grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                                          "annotations": {"grafana_folder": "MCP"}}}}
    )["grafana-dashboard.yaml"]
    for version in ("1.29", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(config_map, version, strict=True)
    meta = config_map["metadata"]
    assert meta["labels"]["grafana_dashboard"] == "1"
    assert meta["namespace"] == "monitoring" and meta["annotations"] == {"grafana_folder": "MCP"}
    assert json.loads(config_map["data"]["credential-sidecar.json"]) == dashboard()
    # a loader configured with another label value
    relabelled = render({"metrics": {"grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": "mcp"}}}})
    assert relabelled["grafana-dashboard.yaml"]["metadata"]["labels"]["grafana_dashboard"] == "mcp"
    assert relabelled["grafana-dashboard.yaml"]["metadata"]["namespace"] == "mcp"


def test_chart_lints_clean_with_rules_and_dashboard_on() -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}}
    report = helm.lint(CHART_DIR, values, strict=True, namespace="mcp", kube_version="v1.29.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


# --------------------------------------------------------------------------- a real Prometheus




def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Prometheus:
    """``prometheus`` scraping one target every second, with a ServiceMonitor's namespace and pod labels."""

    def __init__(self, target: str, workdir: Path) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "credential-sidecar",
                            "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}],
                        }
                    ],
                }
            ),
            encoding="utf-8",
        )
        log = output_file(f"prometheus-{self.port}.log").open("ab")
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [
                PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        _wait(self._ready, "Prometheus to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return requests.get(self.url + "/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def api(self, path: str, **params: Any) -> Any:
        answer = requests.get(self.url + "/api/v1/" + path, params=params, timeout=10).json()
        assert answer["status"] == "success", (params, answer)
        return answer["data"]

    def latest(self, query: str) -> float | None:
        result = self.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def store() -> Iterator[FakeSecretsManager]:
    fake = FakeSecretsManager(values={"mcp/echo/alice": "key-alice", "mcp/echo/bob": "key-bob",
                                      "mcp/echo/carol": "key-carol"}).start()
    yield fake
    fake.stop()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus; .ci/run installs it)")
def test_every_panel_returns_data_from_a_real_prometheus(
    start_sidecar: Callable[..., SidecarProcess], echo: EchoUpstream, store: FakeSecretsManager, tmp_path: Path
) -> None:
    private = {"allow_private": True}
    sc = start_sidecar(
        {
            "secrets": {
                "backend": "aws",
                "lookup_timeout_seconds": 2,
                "aws": {"region": "us-east-1", "endpoint_url": store.url},
                # keys expire at once, so the outage below is met by refreshes (stale serving)
                "cache": {"ttl_seconds": 1, "stale_if_error_seconds": 300, "negative_ttl_seconds": 30},
            },
            "upstreams": {
                "echo": {"url": echo.url, "secret": "mcp/echo/{client_id}", "inject": {"query": "apiKey"}, **private},
                "dead": {"url": f"http://127.0.0.1:{closed_port()}", "secret": "mcp/echo/{client_id}",
                         "inject": {"query": "apiKey"}, **private},
            },
        },
        env=AWS_ENV,
    )
    prometheus = Prometheus(sc.admin_url.split("//", 1)[1], tmp_path)
    try:
        started = time.time()
        _wait(lambda: prometheus.latest(f'sidecar_ready{{pod="{POD}"}}') == 1, "the first scrape")
        session = requests.Session()

        def call(path: str, client: str | None = "alice", **kwargs: Any) -> int:
            headers = {"X-Client-Id": client} if client else {}
            return session.get(sc.url + path, headers=headers, timeout=10, **kwargs).status_code

        statuses = [call("/echo/quote", client) for client in ("alice", "bob") * 125]
        assert set(statuses) == {200}
        # refused: no key stored, no such upstream, a destination outside the perimeter, a dead upstream
        assert {call("/echo/quote", "mallory") for _ in range(10)} == {403}
        assert {call("/nowhere/quote") for _ in range(10)} == {404}
        assert {
            session.get("http://exfil.example.com/upload", proxies={"http": sc.url}, timeout=10).status_code
            for _ in range(10)
        } == {403}
        assert {call("/dead/quote") for _ in range(5)} == {502}

        # the store fails: alice's expired key is served stale while its refresh fails; carol,
        # never cached, gets 503
        for name in ("mcp/echo/alice", "mcp/echo/carol"):
            store.faults[name] = "internal"

        def stale_served() -> bool:
            assert call("/echo/quote", "alice") == 200
            return metric(sc, "sidecar_secret_refreshes_total", {"result": "error"}) >= 1

        _wait(stale_served, "a failed refresh while alice is served stale")
        assert call("/echo/quote", "carol") == 503
        store.faults.clear()
        assert call("/echo/quote", "carol") == 200

        # Prometheus has ingested the end of the load: its latest sample equals the sidecar's count
        total = metric(sc, "sidecar_requests_total")
        _wait(
            lambda: prometheus.latest(f'sum(sidecar_requests_total{{pod="{POD}"}})') == total,
            "Prometheus to scrape the last requests",
        )
        # and every series, the outage's new ones too, has the two samples a rate needs within
        # one rate window now (on a busy machine a 1 s scrape times out now and then, and two
        # samples minutes apart give a rate nothing)
        def two_samples_each() -> bool:
            matrix = prometheus.api("query", query=f'{{pod="{POD}"}}[{RATE_INTERVAL}]')["result"]
            return bool(matrix) and min(len(series["values"]) for series in matrix) >= 2

        _wait(two_samples_each, "two samples of every series within one rate window", timeout=90)
        assert metric(sc, "sidecar_denied_total", {"reason": "secret_store_unavailable"}) == 1
        assert metric(sc, "sidecar_secret_lookups_total", {"result": "stale"}) >= 1

        # the template variables' own queries find this namespace and pod
        for variable in dashboard()["templating"]["list"]:
            query = variable.get("definition", "")
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
            if match:
                values = prometheus.api(f"label/{match.group(2)}/values", **{"match[]": substitute(match.group(1))})
                assert values == [NAMESPACE if variable["name"] == "namespace" else POD], variable["name"]

        def empty_panels() -> dict[str, str]:
            """Panel title -> a query of it that returned no number over the run."""
            empty = {}
            for panel in panels():
                for target in panel["targets"]:
                    data = prometheus.api(
                        "query_range", query=substitute(target["expr"]), start=started, end=time.time(), step=1
                    )
                    numbers = [
                        float(v) for series in data["result"] for _, v in series["values"] if math.isfinite(float(v))
                    ]
                    if not numbers:
                        empty[panel["title"]] = target["expr"]
            return empty

        # Asked again until it holds (once in a few CI runs a rate over the outage's new series
        # came back empty right after the waits above, for a cause not yet placed); the failure
        # says which query and what Prometheus held for its metric.
        last: dict[str, str] = {}

        def every_panel_has_data() -> bool:
            nonlocal last
            last = empty_panels()
            return set(last) == set(MAY_BE_EMPTY)

        try:
            _wait(every_panel_has_data, "every panel to return data", timeout=60)
        except AssertionError:
            held = {
                title: prometheus.api("query", query=f'{{__name__=~"{metric_of(expr)}", pod="{POD}"}}[120s]')["result"]
                for title, expr in last.items()
                if title not in MAY_BE_EMPTY
            }
            raise AssertionError(f"panels without data: {last}; their samples: {held}") from None
    finally:
        prometheus.stop()
