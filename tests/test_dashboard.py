"""deploy/'s Grafana dashboard and Prometheus alerts: valid, and only about metrics we export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from harness import Harness
from system_tools import require

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "prometheus-alerts.yml"
RULES_TESTS = DEPLOY / "prometheus-alerts.test.yml"
# Made by Prometheus itself for every scrape target, not by the gateway.
PROMETHEUS_OWN = frozenset({"up"})
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on",
                             "ignoring", "group_left", "group_right", "inf", "nan"})
ALERTS = {"GatewayDown", "GatewayNotReady", "GatewayEventQueueNearFull", "GatewayDatabaseErrors",
          "GatewayToolCallLatencyHigh", "GatewayDevicesDroppingSharply",
          "GatewayRetentionFallingBehind"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\$\{?\w+\}?", "1", e)  # Grafana variables: $__rate_interval, ${job}
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\boffset\s+\w+", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", e):
        if e[match.end():].lstrip().startswith("("):
            continue  # a function
        if match.group(0).lower() not in PROMQL_KEYWORDS:
            names.add(match.group(0))
    return names


def test_metric_names_finds_what_an_expression_reads() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{x="y{z}"}[5m]))) > 5 '
            'and on (instance) b_total offset 10m > bool 1e3 * c / ${d} + $__rate_interval')
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} shows nothing"
        exprs += [target["expr"] for target in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs += re.findall(r"label_values\(([^,)]+)", variable["query"])
    return exprs


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def exported_names(exposition: str) -> set[str]:
    names = set(re.findall(r"^([A-Za-z_:][\w:]*)[{ ]", exposition, re.M))
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)", exposition, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
    return names


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert {
        "gateway_devices_connected", "gateway_connections_opened_total",
        "gateway_connections_closed_total", "gateway_tool_calls_total",
        "gateway_tool_call_duration_seconds_bucket", "gateway_runs_total",
        "gateway_events_stored_total", "gateway_event_queue_depth", "gateway_db_errors_total",
        "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
    } <= used


async def test_every_metric_the_dashboard_and_alerts_use_is_exported(gateway: Harness) -> None:
    async with gateway.public.get("/metrics") as response:
        assert response.status == 200
        exported = exported_names(await response.text())
    used: dict[str, set[str]] = {}
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", rule_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(source)
    missing = {name: sorted(where) for name, where in used.items()
               if name not in exported and name not in PROMETHEUS_OWN}
    assert missing == {}, "used but not exported by the gateway"
    assert len(used) > 15


def test_the_rules_cover_each_alert_and_point_to_the_runbook() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = {rule["alert"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == ALERTS
    readme = (DEPLOY.parent / "README.md").read_text()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        assert rule["annotations"]["runbook"] == f"README.md#alerts: {name}"
        assert f"**{name}**" in readme, f"no runbook line for {name} in README.md"
    tested = {case["alertname"] for test in yaml.safe_load(RULES_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert tested == ALERTS


def promtool() -> str:
    return require("promtool", "apt-get install prometheus")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=DEPLOY, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_promtool_checks_the_rules() -> None:
    done = run_promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(ALERTS)} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = run_promtool("test", "rules", RULES_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A rule that never fires makes the unit tests fail: they really test something."""
    broken: dict[str, Any] = yaml.safe_load(RULES.read_text())
    for group in broken["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "GatewayDown":
                rule["expr"] = "up == 2"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(broken))
    shutil.copy(RULES_TESTS, tmp_path / RULES_TESTS.name)
    done = subprocess.run([promtool(), "test", "rules", RULES_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert "GatewayDown" in done.stdout + done.stderr
