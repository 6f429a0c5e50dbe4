"""Deploy/monitoring's files as the tests read them: the scrape job, the rules, the dashboards'
queries, and PromQL comparisons made to return 0 or 1 (``with_bool``)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import requests
import yaml

from tests.support.http import free_port
from tests.support.needs import require_tools
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server

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
    "classifier_shadow_queue_images",  # set once a shadow starts
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


@contextlib.contextmanager
def scraping(
    service_url: str,
    root: Path,
    interval: str = "250ms",
    key_file: Path | None = None,
    ready: bool = True,
) -> Iterator[str]:
    """Debian's prometheus on 127.0.0.1 with the project's rules, scraping ``service_url`` as
    the project's job every ``interval``, sending the API key in ``key_file`` as the job's
    ``authorization`` says (none: the service is open); its URL, once it has scraped a first
    time (counters only grow in Prometheus's eyes after a first sample) unless not ``ready``."""
    (binary,) = require_tools("prometheus")
    job = scrape_job()
    scraped = {
        "job_name": job["job_name"],
        "metrics_path": job["metrics_path"],
        "static_configs": [{"targets": [service_url.removeprefix("http://")]}],
    }
    if key_file is not None:  # the project's authorization, but the test's file
        scraped["authorization"] = {**job["authorization"], "credentials_file": str(key_file)}
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [scraped],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        binary,
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running_server(command, url, root / "prometheus.log", ready_path="/-/ready"):
        if ready:
            wait_until(url, f'up{{job="{job["job_name"]}"}} == 1')
        yield url


def instant(url: str, expr: str) -> list[dict]:
    """The result of an instant query of the Prometheus at ``url``."""
    body = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_until(url: str, expr: str, seconds: float = 30) -> list[dict]:
    """``expr``'s first non-empty result at ``url``, within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (result := instant(url, expr)):
        assert time.monotonic() < deadline, f"no data for {expr} after {seconds} s"
        time.sleep(0.2)
    return result


def last_scrape(url: str) -> float:
    """When the project's job was last scraped: evaluated there, increase() extrapolates past
    no sample, so it counts exactly what the counters grew by."""
    (series,) = instant(url, f'timestamp(up{{job="{scrape_job()["job_name"]}"}})')
    return float(series["value"][1])
