"""The monitoring files under etc/: Prometheus alert rules (checked and unit-tested with promtool), the
example Prometheus config, the Grafana dashboard and its provisioning. What they query is checked here
against the names gateway/metrics.py declares, and in tests/e2e/test_metrics_scrape.py against a real scrape.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway.metrics import HELP
from tests.monitoring import (
    ALERTS,
    ALERTS_TEST,
    PROMETHEUS_EXAMPLE,
    PROVISIONING,
    ROOT,
    alert_rules,
    dashboard,
    dashboard_exprs,
    metric_names,
    needs_promtool,
    panels,
    promtool,
)

PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself about each scrape


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    """promtool check rules accepts the alert rules file."""
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_alert_rules_fire_and_stay_quiet_where_they_should() -> None:
    """promtool test rules: every rule fires on its input series, with its labels and annotations, and stays quiet
    on the series beside it (an event not active, a blip shorter than its ``for``, signing not configured)."""
    done = promtool("test", "rules", str(ALERTS_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERTS_TEST.read_text()))
    assert tested == {r["alert"] for r in alert_rules()}, "every alert rule has a unit test"


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    """Each rule names a severity (critical or warning) and says what happened, why it matters and what to do."""
    rules = alert_rules()
    assert len(rules) >= 9
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        anchor = "docs/monitoring.md#" + rule["alert"].lower()
        assert notes["runbook"].startswith(anchor + ": "), (rule["alert"], notes["runbook"])
    runbooks = (ROOT / "docs" / "monitoring.md").read_text()
    for rule in rules:
        assert f"### {rule['alert']}" in runbooks, f"docs/monitoring.md has no runbook for {rule['alert']}"


def test_alert_rules_query_only_what_the_gateway_exports() -> None:
    """Every metric name in the rules is one gateway/metrics.py exports (or Prometheus's own ``up``)."""
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - set(HELP) - PROMETHEUS_OWN
        assert not unknown, f"{rule['alert']} queries {sorted(unknown)}, which the gateway does not export"


@needs_promtool
def test_prometheus_example_config_passes_promtool_check() -> None:
    """The example scrape config, with the rules file beside it, passes promtool check config."""
    done = promtool("check", "config", str(PROMETHEUS_EXAMPLE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "job_name: drgw" in PROMETHEUS_EXAMPLE.read_text()  # the job the rules' DrgwDown expects


def test_dashboard_takes_its_data_source_from_a_variable() -> None:
    """The dashboard parses; every panel and query reads the Prometheus data source chosen in ``$datasource``."""
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels(board):
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"panel {p['title']!r} is wider than the grid"
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert 'instance=~"$instance"' in t["expr"], f"panel {p['title']!r} ignores the gateway picked"


def test_dashboard_shows_what_the_operator_asked_for() -> None:
    """Panels for the site now, the event's chart, event state, links, audit and commands by result."""
    board = dashboard()
    titles = {p["title"] for p in panels(board)}
    for title in (
        "Facility",
        "Limit",
        "Baseline",
        "Battery discharge",
        "Battery state of charge",
        "GPU draw",
        "GPUs capped",
        "Tokens/s/W",
        "Facility: target, measured, baseline",
        "Shed: battery and GPU caps",
        "Event state and phase",
        "Links",
        "Links now",
        "Audit head",
        "Audit failures",
        "Last checkpoint",
        "Commands by result",
    ):
        assert title in titles, f"no panel {title!r}"
    assert any(t.startswith("Throughput per job") for t in titles)
    names = set().union(*(metric_names(e) for _, e in dashboard_exprs(board)))
    assert {"drgw_link_up", "drgw_link_since_timestamp_seconds", "drgw_commands_total"} <= names


def test_dashboard_queries_only_what_the_gateway_exports() -> None:
    """Every metric name a panel or variable queries is one gateway/metrics.py exports."""
    for where, expr in dashboard_exprs(dashboard()):
        unknown = metric_names(expr) - set(HELP)
        assert not unknown, f"{where} queries {sorted(unknown)}, which the gateway does not export: {expr}"


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query (as recording rules, with Grafana's variables filled in)."""
    fill = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "3h", "$instance": ".*"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs(dashboard())):
        for var, value in fill.items():
            expr = expr.replace(var, value)
        if not expr.startswith("drgw_info"):  # the instance variable's label_values() argument is a selector
            rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_provisioning_loads_the_dashboard_by_file() -> None:
    """The dashboard provider reads a folder of files; the example data source is a Prometheus one."""
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "drgw.yaml").read_text())
    assert provider["apiVersion"] == 1
    (p,) = provider["providers"]
    assert p["type"] == "file" and p["options"]["path"].startswith("/")
    source = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.example.yaml").read_text())
    (ds,) = source["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http")


def test_docs_list_every_metric() -> None:
    """docs/monitoring.md names every metric the gateway exports, so operators can find each one."""
    text = (ROOT / "docs" / "monitoring.md").read_text()
    missing = [name for name in HELP if f"`{name}`" not in text]
    assert not missing, f"docs/monitoring.md does not list {missing}"


def test_metric_names_reads_promql() -> None:
    """The name reader finds selectors, not functions, keywords, labels, strings, ranges or variables."""
    expr = (
        'sum by (device, result) (increase(drgw_commands_total{instance=~"$instance",result="ok"}[$__rate_interval]))'
        " / on(instance) group_left() drgw_audit_head_seq offset 5m and time() - drgw_x_seconds > bool 1e3"
    )
    assert metric_names(expr) == {"drgw_commands_total", "drgw_audit_head_seq", "drgw_x_seconds"}
    assert metric_names('{__name__="x"}') == set()
