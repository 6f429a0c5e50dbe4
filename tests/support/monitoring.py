"""Deploy/monitoring's files as the tests read them: the scrape job, the rules, the dashboards'
queries, and PromQL comparisons made to return 0 or 1 (``with_bool``)."""

from __future__ import annotations

import json

import yaml

from tests.support.paths import REPO_ROOT

MONITORING = REPO_ROOT / "deploy" / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
RULES_FILE = MONITORING / "rules" / "classifier.rules.yml"
RULES_TESTS = MONITORING / "rules" / "classifier.test.yml"
PROVISIONING = MONITORING / "grafana" / "provisioning"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")
# Series the service has only while a challenger is loaded (CHALLENGER): their labels carry
# the challenger's version, unknown before it is.
CHALLENGER_METRICS = (
    "classifier_challenger_info",
    "classifier_shadow_comparisons_total",
    "classifier_shadow_shed_total",
)


def scrape_job() -> dict:
    """The one scrape job of deploy/monitoring/prometheus.yml (the job the rules select)."""
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    return job


def rules() -> list[dict]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def needs_challenger(expr: str) -> bool:
    """Whether ``expr`` reads a challenger's series, directly or through recorded rules."""
    reads = set(CHALLENGER_METRICS)
    for rule in rules():  # recording rules read only raw series or earlier records
        if "record" in rule and any(name in rule["expr"] for name in reads):
            reads.add(rule["record"])
    return any(name in expr for name in reads)


def dashboard_queries() -> list[tuple[str, str]]:
    """(dashboard / panel title, PromQL) of every query of every dashboard."""
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                queries.append((f"{dashboard['title']} / {panel['title']}", target["expr"]))
    return queries


def top_level_comparison(expr: str) -> int:
    """Index just after the one comparison operator outside brackets and strings in ``expr``."""
    depth, quote, found, i = 0, None, [], 0
    while i < len(expr):
        char = expr[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'`":
            quote = char
        elif char in "({[":
            depth += 1
        elif char in ")}]":
            depth -= 1
        elif depth == 0:
            operator = next((op for op in COMPARISONS if expr.startswith(op, i)), None)
            if operator:
                found.append(i + len(operator))
                i += len(operator)
                continue
        i += 1
    assert len(found) == 1, f"expected one top-level comparison in: {expr}"
    return found[0]


def with_bool(expr: str) -> str:
    """``a > b`` as ``a > bool b``: 0 or 1 for every series the alert compares, firing or not."""
    at = top_level_comparison(expr)
    return f"{expr[:at]} bool{expr[at:]}"
