"""docs/monitoring: the alert rules pass their promtool unit tests, and the rules and the
Grafana dashboard use only metrics that a live worker or API serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lending.api.config import ApiSettings
from lending.redis.embedded import free_port

from .api_support import serving
from .conftest import StartWorker
from .support import ROOT, http_get, wait_until

MONITORING = ROOT / "docs" / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERTS_TEST = MONITORING / "alerts_test.yml"
DASHBOARD = MONITORING / "dashboard.json"

#: Series that Prometheus makes itself for every target it scrapes.
SCRAPE_SERIES = {"up"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}
_KEYWORDS |= {"inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values(metric, label)``)
    reads: what is left once label matchers, strings, ranges, grouping clauses, Grafana
    variables, function names and operators are taken out."""
    expr = re.sub(r"\blabel_values\(([^,()]*),[^()]*\)", r"(\1)", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    names = re.findall(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {name for name in names if name.lower() not in _KEYWORDS}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y"}[$__rate_interval])))', {"a_bucket"}),
        ('absent(up{job="lending"} == 1)', {"up"}),
        ("sum without (instance) (b) / on (job) group_left c offset 5m > 1e3", {"b", "c"}),
        ("max(d) by (stream, group) and deriv(e[5m:1m]) > 0", {"d", "e"}),
        ('label_values(f{job=~"a|b"}, job)', {"f"}),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard_expressions() -> Iterator[str]:
    """Every query of the dashboard: panel targets, and the templating variables'."""

    def walk(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    dashboard = json.loads(DASHBOARD.read_text())
    yield from walk(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            yield query["query"] if isinstance(query, dict) else query


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian's prometheus package has it; .ci/run installs it)",
)
def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    for command in (["promtool", "check", "rules", ALERTS.name], ["promtool", "test", "rules", ALERTS_TEST.name]):
        result = subprocess.run(command, cwd=MONITORING, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    tested = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", [])}
    alerts = {rule["alert"] for rule in rules()}
    assert alerts == tested
    assert {"LendingNoLiveWorker", "LendingLagGrowing", "LendingPendingTooOld"} <= alerts
    assert {"LendingDeadLettersWaiting", "LendingRequestsFailing"} <= alerts


async def test_dashboard_and_alerts_use_only_metrics_a_worker_or_the_api_serves(
    start_worker: StartWorker, redis_url: str, namespace: str
) -> None:
    port = free_port()
    await start_worker(metrics_port=port)
    served: set[str] = set()
    async with serving(ApiSettings(redis_url=redis_url, namespace=namespace)) as live:
        await live.http.get("/v1/books/b1")  # the response counters exist from the first response
        body = (await live.http.get("/metrics")).text
        served.update(sample.name for family in text_string_to_metric_families(body) for sample in family.samples)
    assert "lending_api_responses_total" in served

    async def refreshed() -> bool:
        """The worker has read its gauges from Redis once (the labelled ones exist from then)."""
        status, body = await http_get(port, "/metrics")
        assert status == 200
        served.update(sample.name for family in text_string_to_metric_families(body) for sample in family.samples)
        return "lending_stream_lag" in served

    await wait_until(refreshed)
    in_rules = {name for rule in rules() for name in metric_names(str(rule["expr"]))}
    in_dashboard = {name for expr in dashboard_expressions() for name in metric_names(expr)}
    assert len(in_rules) >= 5 and len(in_dashboard) >= 10, (in_rules, in_dashboard)
    known = served | SCRAPE_SERIES
    assert not in_rules - known, f"the alert rules use metrics nothing serves: {sorted(in_rules - known)}"
    assert not in_dashboard - known, f"the dashboard uses metrics nothing serves: {sorted(in_dashboard - known)}"
