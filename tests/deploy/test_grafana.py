"""The provisioned Grafana datasource and dashboard: they load, query only taskring's
metrics, cover all of them, and point at the Prometheus of docker-compose.yml."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import DEPLOY, Manifest, load_compose, load_yaml, promtool

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "taskring.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "taskring.yml"

# The metrics the router and executors export (issue 6; the metrics module defines them).
HISTOGRAMS = frozenset({"task_execution_duration_seconds"})
METRICS = HISTOGRAMS | {
    "task_executions_success_total",
    "task_executions_failure_total",
    "task_executions_active",
    "taskring_queue_depth",
    "taskring_submit_requests_total",
    "taskring_submit_rejections_total",
    "taskring_stream_watchers",
    "taskring_backend_healthy",
    "taskring_backend_circuit_state",
    "taskring_ring_members",
    "taskring_provider_tokens_total",
    "taskring_provider_cost_total",
}

# Removed before looking for metric names: strings, label matchers, range selectors and
# the label lists of by/without/on/ignoring/group_*.
_NOT_NAMES = re.compile(
    r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\{[^}]*\}|\[[^\]]*\]"""
    r"|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
)
# A whole identifier (not the tail of a number such as 5m) that is not a function call.
_IDENTIFIER = re.compile(r"(?<![\w:.])[A-Za-z_:][\w:]*(?![\w:]|\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
)
_LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,")


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads; a histogram's _bucket, _sum and _count
    series count as the histogram."""
    names = set()
    for name in _IDENTIFIER.findall(_NOT_NAMES.sub(" ", expr)):
        if name.lower() in _KEYWORDS:
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def test_metric_names_finds_metrics_not_functions_labels_or_variables() -> None:
    """The extractor the other tests rely on, on an expression a person can check."""
    expr = (
        "histogram_quantile(0.95, sum by (le, task_type) (rate(task_execution_duration_seconds_"
        'bucket{job=~"$job", backend="b"}[$__rate_interval]))) / on (job) group_left '
        "sum without (instance) (taskring_queue_depth offset 5m) * 3600"
    )
    assert metric_names(expr) == {"task_execution_duration_seconds", "taskring_queue_depth"}


@pytest.fixture(scope="module")
def dashboard() -> Manifest:
    with DASHBOARD.open(encoding="utf-8") as file:
        loaded: Manifest = json.load(file)
    return loaded


def panels(dashboard: Manifest) -> list[Manifest]:
    """Every panel, those inside collapsed rows included."""
    found: list[Manifest] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def queries(dashboard: Manifest) -> list[str]:
    """Every PromQL expression of every panel target."""
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def variable_metrics(dashboard: Manifest) -> set[str]:
    """Metrics the template variables' label_values() queries read."""
    found = set()
    for variable in dashboard["templating"]["list"]:
        query: Any = variable.get("query", "")
        text = query["query"] if isinstance(query, dict) else str(query)
        found.update(_LABEL_VALUES.findall(text))
    return found


def test_dashboard_queries_only_taskring_metrics(dashboard: Manifest) -> None:
    """No panel or variable reads a metric taskring does not export."""
    used = set().union(*map(metric_names, queries(dashboard))) | variable_metrics(dashboard)
    assert used - METRICS == set()


def test_dashboard_shows_every_metric(dashboard: Manifest) -> None:
    """Each exported metric has a panel."""
    used = set().union(*map(metric_names, queries(dashboard)))
    assert METRICS - used == set()


def test_dashboard_panels_have_unique_ids_and_a_title(dashboard: Manifest) -> None:
    """Grafana keys panel state by id; a duplicate makes two panels share it."""
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert all(p["title"] for p in panels(dashboard))


def test_dashboard_uses_the_provisioned_datasource(dashboard: Manifest) -> None:
    """Every panel and query names the datasource uid that provisioning creates, and that
    datasource is the compose stack's Prometheus."""
    datasource = load_yaml(DATASOURCES)["datasources"]
    assert len(datasource) == 1
    uid, url = datasource[0]["uid"], datasource[0]["url"]
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert {t["datasource"]["uid"] for t in panel["targets"]} == {uid}
    assert url == "http://prometheus:9090"
    assert "prometheus" in load_compose()["services"]


def grafana_mount(target: str) -> Path:
    """The repository path compose mounts at `target` in the Grafana container."""
    volume: str
    for volume in load_compose()["services"]["grafana"]["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return (DEPLOY.parent / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def test_compose_mounts_provisioning_where_grafana_finds_the_dashboard() -> None:
    """Provisioning is where Grafana reads it, and the dashboard provider's path is where
    compose mounts deploy/grafana/dashboards."""
    for kind in ("datasources", "dashboards"):
        provisioning = GRAFANA / "provisioning" / kind
        assert grafana_mount(f"/etc/grafana/provisioning/{kind}") == provisioning
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert grafana_mount(provider["options"]["path"]) == DASHBOARD.parent


def test_dashboard_queries_are_valid_promql(dashboard: Manifest, tmp_path: Path) -> None:
    """promtool parses every expression, with Grafana's variables filled in."""
    checker = promtool()
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$job": "taskring-router"}
    rules = []
    for i, query in enumerate(queries(dashboard)):
        expr = query
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [checker, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
