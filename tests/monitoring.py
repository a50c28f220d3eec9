"""Shared by the monitoring tests: the files under etc/, promtool, and the metric names PromQL refers to.

Import it as ``from tests.monitoring import ...`` (pytest's importlib mode makes ``tests`` a namespace package).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "etc" / "prometheus" / "drgw-alerts.yml"
PROMETHEUS_EXAMPLE = ROOT / "etc" / "prometheus" / "prometheus.example.yml"
ALERTS_TEST = ROOT / "tests" / "unit" / "drgw_alerts_test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "dashboards" / "drgw.json"
PROVISIONING = ROOT / "etc" / "grafana" / "provisioning"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian/Ubuntu package 'prometheus'; .ci/run installs it)"
)

# PromQL words that are not metric names: operators, modifiers and literals.
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS |= {"offset", "bool", "inf", "nan", "atan2", "start", "end"}


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args`` (and ``stdin``); return what it did."""
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


def metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression selects (Grafana's $variables allowed)."""
    e = re.sub(r"\$\{?\w+(?::\w+)?\}?", "0", expr)  # Grafana variables: $__rate_interval, ${instance}
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', e)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range and subquery selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if not call and word.lower() not in _KEYWORDS:
            names.add(word)
    return names


def exposed_names(text: str) -> set[str]:
    """Return the sample names in a Prometheus text exposition."""
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def sample(text: str, name: str, **labels: str) -> float | None:
    """Return the value of the sample ``name`` with exactly ``labels`` in an exposition, or None."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def dashboard() -> dict[str, Any]:
    """Return the Grafana dashboard, parsed."""
    return dict(json.loads(DASHBOARD.read_text()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield every panel of a dashboard, those folded inside rows too."""
    for p in board.get("panels", []):
        yield p
        yield from p.get("panels", [])


def dashboard_exprs(board: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (where, PromQL) for every query of the dashboard: each panel's targets and each query variable."""
    out = [(f"panel {p.get('title')!r}", str(t["expr"])) for p in panels(board) for t in p.get("targets", [])]
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query)
            m = re.fullmatch(r"\s*(?:label_values|query_result)\((.*)\)\s*", text, re.S)
            out.append((f"variable {var.get('name')!r}", m.group(1).rsplit(",", 1)[0] if m else text))
    return out


def alert_rules() -> list[dict[str, Any]]:
    """Return every rule of the alert rules file."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]
