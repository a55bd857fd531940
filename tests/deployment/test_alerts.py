"""The alert rules the chart ships, checked and unit-tested with Prometheus's own promtool.

``promtool check rules`` parses every expression and template; ``promtool test rules``
runs files/tests/prometheus-rules-test.yaml, where every alert has series that must
fire it and series that must not. Around that: every alert tells the operator what
to look at and links a runbook section that exists; the chart renders the file
unchanged as a PrometheusRule; and the one signal the drain alert reads,
``sidecar_draining``, is what a real draining sidecar exports.
"""

from __future__ import annotations

import copy
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import requests
import yaml

from tests.support.process import SidecarProcess, metric
from tests.support.upstream import EchoUpstream

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "credential-sidecar"
RULES = CHART_DIR / "files" / "prometheus-rules.yaml"
RULE_TESTS = CHART_DIR / "files" / "tests" / "prometheus-rules-test.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
RUNBOOK_PAGE = "https://github.com/example/mcp-credential-sidecar/blob/main/docs/operations.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus; .ci/run installs it)"
)


def rules() -> list[dict[str, Any]]:
    """Every alerting rule of the file, in order."""
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown`` (code blocks skipped)."""
    anchors: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            text = re.sub(r"[`*]", "", match.group(1).strip().lower())
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False)


# --------------------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_check_rules_is_clean() -> None:
    done = promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


@needs_promtool
def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    done = promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_case_and_a_quiet_one() -> None:
    """Each alert is expected to fire for some series and, in the same test, to stay quiet for others."""
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == ["../prometheus-rules.yaml"]
    fires: set[str] = set()
    quiet: set[str] = set()

    def who(labels: dict[str, str]) -> tuple[str, str]:
        return labels.get("pod", ""), labels.get("upstream", "")

    for case in tests["tests"]:
        given = {who(dict(re.findall(r'(\w+)="([^"]*)"', s["series"]))) for s in case["input_series"]}
        for check in case["alert_rule_test"]:
            firing = {who(a["exp_labels"]) for a in check.get("exp_alerts") or []}
            if firing:
                fires.add(check["alertname"])
            # exp_alerts is the whole list: series of the input it leaves out must not fire
            if given - firing:
                quiet.add(check["alertname"])
    names = {rule["alert"] for rule in rules()}
    assert names - fires == set(), "alerts never expected to fire"
    assert names - quiet == set(), "alerts never expected to stay quiet"


# --------------------------------------------------------------------------- what each alert says


def test_every_alert_says_what_it_is_what_to_look_at_and_where_its_runbook_is() -> None:
    anchors = github_anchors(OPERATIONS.read_text(encoding="utf-8"))
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules():
        name = rule["alert"]
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert "Look first at" in notes["description"], f"{name}: the description must say what to look at first"
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == RUNBOOK_PAGE, name
        assert anchor == name.lower(), f"{name}: its runbook section is ### {name}"
        assert anchor in anchors, f"{name}: docs/operations.md has no section #{anchor}"


def test_operations_lists_every_alert_with_its_runbook_and_no_other() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    names = {rule["alert"] for rule in rules()}
    linked = set(re.findall(r"\[`(CredentialSidecar\w+)`\]\(#(credentialsidecar\w+)\)", text))
    assert {name for name, _ in linked} == names
    assert all(anchor == name.lower() for name, anchor in linked)
    runbooks = set(re.findall(r"^### (CredentialSidecar\w+)$", text, re.M))
    assert runbooks == names


def test_rules_only_use_metrics_the_sidecar_exports_or_the_contract_names() -> None:
    exported = set(re.findall(r'"(sidecar_\w+)"', (ROOT / "sidecar" / "metrics.py").read_text(encoding="utf-8")))
    # Counters gain _total, histograms _bucket; the token requests counter comes with OAuth
    # credentials (the contract's name), before which its alerts have nothing to read.
    known = {f"{n}_total" for n in exported} | {f"{n}_bucket" for n in exported} | exported
    known.add("sidecar_token_requests_total")
    used = {name for rule in rules() for name in re.findall(r"\bsidecar_\w+", rule["expr"])}
    assert used - known == set()


# --------------------------------------------------------------------------- the chart


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, Any]:
    rendered = chart.render(copy.deepcopy(values), name="fin", namespace="mcp")
    return {Path(path).name: yaml.safe_load(text) for path, text in rendered.items() if not path.endswith(".txt")}


def test_chart_renders_the_rules_as_a_prometheusrule_only_when_asked(chart: helm.Chart) -> None:
    assert render(chart, {}).get("prometheusrule.yaml") is None
    rule = render(
        chart, {"metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}}
    )["prometheusrule.yaml"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["namespace"] == "mcp"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == "fin"
    # The file itself, unchanged: Prometheus's templates ({{ $labels.pod }}) are left to Prometheus.
    assert rule["spec"] == yaml.safe_load(RULES.read_text(encoding="utf-8"))
    elsewhere = render(chart, {"metrics": {"prometheusRule": {"enabled": True, "namespace": "monitoring"}}})
    assert elsewhere["prometheusrule.yaml"]["metadata"]["namespace"] == "monitoring"


@needs_promtool
def test_the_rendered_prometheusrule_passes_promtool(chart: helm.Chart, tmp_path: Path) -> None:
    rule = render(chart, {"metrics": {"prometheusRule": {"enabled": True}}})["prometheusrule.yaml"]
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]), encoding="utf-8")
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_chart_values_for_rules_and_dashboard_are_checked(chart: helm.Chart) -> None:
    for values in (
        {"metrics": {"prometheusRule": {"enabled": "yes"}}},
        {"metrics": {"prometheusRule": {"namespace": "Not_A_Namespace"}}},
        {"metrics": {"grafanaDashboard": {"labels": {"grafana_dashboard": 1}}}},
        {"metrics": {"alerts": True}},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name="fin", namespace="mcp")


# --------------------------------------------------------------------------- the drain signal


@pytest.mark.parametrize("workers", [1, 2])
def test_a_draining_sidecar_reports_sidecar_draining(
    start_sidecar: Callable[..., SidecarProcess], tmp_path: Path, echo: EchoUpstream, workers: int
) -> None:
    """The drain alert reads sidecar_draining: 0 while serving, 1 from SIGTERM until the process ends.

    With workers, the supervisor's /metrics says it (its gauge, over the workers' own).
    """
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"mcp/echo/alice": "k-alice"}), encoding="utf-8")
    sc = start_sidecar(
        {
            "shutdown_grace_seconds": 10,
            "workers": workers,
            "secrets": {"backend": "file", "file": {"path": str(keys)}},
            "upstreams": {
                "echo": {"url": echo.url, "secret": "mcp/echo/{client_id}", "inject": {"query": "k"}, "allow_private": True}
            },
        }
    )
    assert metric(sc, "sidecar_draining") == 0
    answer: dict[str, int] = {}

    def slow() -> None:
        answer["status"] = requests.get(
            sc.url + "/echo/slow?delay=3", headers={"X-Client-Id": "alice"}, timeout=20
        ).status_code

    caller = threading.Thread(target=slow)
    caller.start()
    # the slow request is in flight once the sidecar counts it
    _wait(lambda: metric(sc, "sidecar_inflight_requests") == 1)
    sc.signal(signal.SIGTERM)
    sc.wait_for_line(lambda line: line.get("message") == "draining")
    assert metric(sc, "sidecar_draining") == 1
    assert metric(sc, "sidecar_ready") == 0
    caller.join(20)
    assert answer == {"status": 200}
    assert sc.proc is not None and sc.proc.wait(20) == 0


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")
