"""Alerts start retraining: deploy/monitoring/alertmanager.yml (amtool), the relay
(alert_relay) against a stand-in for GitHub's API, and the whole chain with real Alertmanager,
and real Prometheus evaluating the project's rules.

GitHub itself cannot be reached from here: tests/support/github.py answers as its
repository_dispatch endpoint does (204), and the workflow's side is checked in
test_workflows.py (the trigger, and its summary step run on the payload the relay sends).
"""

from __future__ import annotations

import http.client
import http.server
import json
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from alert_relay.dispatch import EVENT_TYPE, MAX_PAYLOAD_ALERTS, MAX_SUMMARY_CHARS
from alert_relay.relay import (
    DEFAULT_PORT,
    HEALTH_PATH,
    MAX_BODY_BYTES,
    REPOSITORY_ENV,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    WEBHOOK_PATH,
    Config,
    ConfigError,
)
from tests.support.alerting import (
    ALERTMANAGER_CONFIG,
    REPOSITORY,
    TOKEN,
    alertmanager_config,
    config_for_relay,
    post_alert,
    relay_in_process,
    relay_process,
    retrain_webhook,
    running_alertmanager,
)
from tests.support.github import github_stand_in
from tests.support.http import free_port, serve_http
from tests.support.monitoring import RULES_FILE, rules, scrape_job
from tests.support.needs import require_tools
from tests.support.processes import running_server

DISPATCHES = f"/repos/{REPOSITORY}/dispatches"
DRIFT_ALERTS = {
    "ClassifierPredictedShareBelowTestRange",
    "ClassifierPredictedShareAboveTestRange",
    "ClassifierManyLowConfidenceAnswers",
}


def notification(*alerts: dict, status: str = "firing") -> dict:
    """A webhook body as Alertmanager 0.25 sends it."""
    return {
        "version": "4",
        "groupKey": '{}/{action="retrain"}:{job="dandelion-vs-grass"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "retrain",
        "groupLabels": {"job": "dandelion-vs-grass"},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


def alert(name: str = "ClassifierManyLowConfidenceAnswers", status: str = "firing", **labels):
    return {
        "status": status,
        "labels": {"alertname": name, "job": "dandelion-vs-grass", "action": "retrain", **labels},
        "annotations": {"summary": f"{name} is firing.", "description": "..."},
        "startsAt": "2026-05-04T10:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": "0123456789abcdef",
    }


# --- alertmanager.yml ----------------------------------------------------------------------


def amtool(*args: str) -> subprocess.CompletedProcess:
    (binary,) = require_tools("amtool")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)


def test_alertmanager_config_passes_amtool_check_config():
    checked = amtool("check-config", str(ALERTMANAGER_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "2 receivers" in checked.stdout


def routed_to(labels: dict[str, str]) -> str:
    pairs = [f"{key}={value}" for key, value in sorted(labels.items())]
    routed = amtool("config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *pairs)
    assert routed.returncode == 0, routed.stdout + routed.stderr
    return routed.stdout.strip()


def test_every_alert_labelled_action_retrain_and_only_those_go_to_the_retrain_receiver():
    job = scrape_job()["job_name"]
    receivers = {}
    for rule in rules():
        if "alert" in rule:
            labels = {"alertname": rule["alert"], "job": job, **rule["labels"]}
            receivers[rule["alert"]] = (routed_to(labels), rule["labels"].get("action"))
    for name, (receiver, action) in receivers.items():
        assert receiver == ("retrain" if action == "retrain" else "default"), name
    retraining = {name for name, (receiver, _) in receivers.items() if receiver == "retrain"}
    assert DRIFT_ALERTS <= retraining
    assert {"ClassifierDown", "ClassifierHighErrorRatio"}.isdisjoint(retraining)
    # Anything else, from any other rule file, goes to the default receiver.
    assert routed_to({"alertname": "Anything", "severity": "critical"}) == "default"


def duration_hours(text: str) -> float:
    (amount, unit) = re.fullmatch(r"(\d+)([smhd])", text).groups()
    return int(amount) * {"s": 1 / 3600, "m": 1 / 60, "h": 1, "d": 24}[unit]


def test_one_degradation_starts_one_retraining_and_a_repeat_only_days_later():
    config = alertmanager_config()
    (route,) = config["route"]["routes"]
    assert route["receiver"] == "retrain" and route["matchers"] == ['action="retrain"']
    assert route["group_by"] == ["job"]  # all of a service's degradation alerts together
    retrain = yaml.safe_load((RULES_FILE.parents[3] / ".github/workflows/retrain.yml").read_text())
    run_hours = retrain["jobs"]["retrain"]["timeout-minutes"] / 60
    # Not again while a retraining may still run, nor past Alertmanager's default 120 h
    # notification log, after which a notification is no longer known as sent.
    assert duration_hours(route["group_interval"]) > run_hours
    assert 24 <= duration_hours(route["repeat_interval"]) < 120
    webhook = retrain_webhook(config)
    assert webhook["send_resolved"] is False
    url = urlsplit(webhook["url"])
    assert (url.port, url.path) == (DEFAULT_PORT, WEBHOOK_PATH)


# --- The relay, against the stand-in for GitHub ----------------------------------------------


def relay_config(github_url: str, **overrides) -> Config:
    return Config(repository=REPOSITORY, token=TOKEN, api_url=github_url, **overrides)


def post(relay_url: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{relay_url}{WEBHOOK_PATH}", data=data, timeout=30, **kwargs)


def test_a_firing_notification_becomes_one_repository_dispatch():
    with github_stand_in() as github, relay_in_process(relay_config(github.url)) as relay:
        firing = alert(model_version="1bdc7ae564d4e793", severity="warning")
        response = post(relay, notification(firing, alert("Gone", status="resolved")))
        assert response.status_code == 200, response.text
        assert response.json() == {"dispatched": True, "event_type": EVENT_TYPE}
        (dispatch,) = github.wait_for(1, timeout=5)
    assert dispatch.path == DISPATCHES
    assert dispatch.headers["Authorization"] == f"Bearer {TOKEN}"
    assert dispatch.headers["Accept"] == "application/vnd.github+json"
    assert dispatch.headers["User-Agent"]  # GitHub refuses requests without one
    assert dispatch.body == {
        "event_type": EVENT_TYPE,
        "client_payload": {
            "alerts": [
                {
                    "name": "ClassifierManyLowConfidenceAnswers",
                    "labels": {
                        "job": "dandelion-vs-grass",
                        "action": "retrain",
                        "model_version": "1bdc7ae564d4e793",
                        "severity": "warning",
                    },
                    "startsAt": "2026-05-04T10:00:00Z",
                    "summary": "ClassifierManyLowConfidenceAnswers is firing.",
                }
            ],
            "alerts_total": 1,  # the resolved one is not named
            "alertmanager": "http://alertmanager:9093",
        },
    }


def test_a_resolved_only_notification_starts_nothing():
    with github_stand_in() as github, relay_in_process(relay_config(github.url)) as relay:
        resolved = notification(alert(status="resolved"), status="resolved")
        response = post(relay, resolved)
        assert response.status_code == 200
        assert response.json() == {"dispatched": False, "reason": "no firing alert"}
        assert post(relay, notification()).json()["dispatched"] is False  # no alert at all
    assert github.attempts == 0


def test_a_large_group_is_named_up_to_the_limit_and_counted():
    alerts = [alert(f"Alert{i}", summary="x") for i in range(MAX_PAYLOAD_ALERTS + 5)]
    alerts[0]["annotations"]["summary"] = "s" * (MAX_SUMMARY_CHARS + 100)
    with github_stand_in() as github, relay_in_process(relay_config(github.url)) as relay:
        assert post(relay, notification(*alerts)).status_code == 200
        (dispatch,) = github.wait_for(1, timeout=5)
    payload = dispatch.body["client_payload"]
    assert len(payload) <= 10  # GitHub's limit on client_payload's top-level keys
    assert [a["name"] for a in payload["alerts"]] == [f"Alert{i}" for i in range(10)]
    assert payload["alerts_total"] == MAX_PAYLOAD_ALERTS + 5
    assert len(payload["alerts"][0]["summary"]) == MAX_SUMMARY_CHARS


def test_when_github_fails_the_relay_answers_5xx_so_that_alertmanager_retries():
    with (
        github_stand_in(fail_next=1) as github,
        relay_in_process(relay_config(github.url)) as relay,
    ):
        failed = post(relay, notification(alert()))
        assert failed.status_code == 502
        assert failed.json()["error"] == 'GitHub answered 500: {"message": "Server Error"}'
        assert post(relay, notification(alert())).status_code == 200  # the retry
        assert len(github.wait_for(1, timeout=5)) == 1 and github.attempts == 2

    # Too slow: 504 once the relay's timeout is over, well before Alertmanager gives up.
    with (
        github_stand_in(delay=2) as github,
        relay_in_process(relay_config(github.url, timeout=0.5)) as relay,
    ):
        started = time.monotonic()
        late = post(relay, notification(alert()))
        assert late.status_code == 504 and "within 0.5 s" in late.json()["error"]
        assert time.monotonic() - started < 2

    # Unreachable (nothing listens on the port).
    unreachable = relay_config(f"http://127.0.0.1:{free_port()}")
    with relay_in_process(unreachable) as relay:
        refused = post(relay, notification(alert()))
        assert refused.status_code == 502
        assert refused.json()["error"].startswith("GitHub cannot be reached")


def raw_request(relay_url: str, method: str, path: str, body: bytes, headers: dict) -> tuple:
    """(status, JSON answer) of a request sent as given (requests would fix the headers)."""
    address = urlsplit(relay_url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    try:
        connection.putrequest(method, path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_bad_requests_get_a_clear_4xx_and_start_nothing():
    with github_stand_in() as github, relay_in_process(relay_config(github.url)) as relay:
        cases = [
            (b"not json", 400, "the body is not JSON"),
            (b"[1, 2]", 422, "not a JSON object"),
            (json.dumps(notification() | {"version": "5"}).encode(), 422, "version '5'"),
            (json.dumps(notification() | {"alerts": {}}).encode(), 422, "'alerts' must be a list"),
            (json.dumps(notification({"status": "firing"})).encode(), 422, "alertname"),
            (json.dumps(notification(alert(status="x"))).encode(), 422, "alerts[0].status"),
        ]
        for body, status, message in cases:
            response = post(relay, body)
            assert response.status_code == status, body
            assert message in response.json()["error"], body

        body = json.dumps(notification(alert())).encode()
        too_big = {"Content-Length": str(MAX_BODY_BYTES + 1)}
        status, answer = raw_request(relay, "POST", WEBHOOK_PATH, b"", too_big)
        assert status == 413 and str(MAX_BODY_BYTES) in answer["error"]
        status, answer = raw_request(relay, "POST", WEBHOOK_PATH, b"", {})
        assert status == 411
        chunked = {"Transfer-Encoding": "chunked"}
        status, _ = raw_request(relay, "POST", WEBHOOK_PATH, b"0\r\n\r\n", chunked)
        assert status == 411
        status, answer = raw_request(relay, "POST", "/elsewhere", body, {"Content-Length": "2"})
        assert status == 404 and WEBHOOK_PATH in answer["error"]
        assert requests.put(f"{relay}{WEBHOOK_PATH}", data=body, timeout=10).status_code == 405
        assert requests.get(f"{relay}{HEALTH_PATH}", timeout=10).json() == {"status": "ok"}
    assert github.attempts == 0


def test_a_body_that_stalls_gets_408(monkeypatch):
    monkeypatch.setattr("alert_relay.relay.RelayHandler.timeout", 0.5)
    with github_stand_in() as github, relay_in_process(relay_config(github.url)) as relay:
        status, answer = raw_request(relay, "POST", WEBHOOK_PATH, b"{", {"Content-Length": "100"})
    assert status == 408 and "did not arrive" in answer["error"]
    assert github.attempts == 0


def test_the_configuration_comes_from_the_environment_and_is_refused_when_incomplete(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    config = Config.from_env({REPOSITORY_ENV: REPOSITORY, TOKEN_FILE_ENV: str(token_file)})
    assert (config.repository, config.token, config.api_url) == (
        REPOSITORY,
        TOKEN,
        "https://api.github.com",
    )
    assert TOKEN not in repr(config)
    assert Config.from_env({REPOSITORY_ENV: REPOSITORY, TOKEN_ENV: TOKEN}).token == TOKEN
    refused = {
        REPOSITORY_ENV: {TOKEN_ENV: TOKEN},
        "is not owner/name": {REPOSITORY_ENV: "just-a-name", TOKEN_ENV: TOKEN},
        "no GitHub token": {REPOSITORY_ENV: REPOSITORY, TOKEN_ENV: ""},
        "cannot read the token file": {
            REPOSITORY_ENV: REPOSITORY,
            TOKEN_FILE_ENV: str(tmp_path / "missing"),
        },
        "keep one": {REPOSITORY_ENV: REPOSITORY, TOKEN_ENV: TOKEN, TOKEN_FILE_ENV: "x"},
        "not an http(s) URL": {
            REPOSITORY_ENV: REPOSITORY,
            TOKEN_ENV: TOKEN,
            "RELAY_GITHUB_API_URL": "api.github.com",
        },
    }
    for message, env in refused.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            Config.from_env(env)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        Config.from_env({REPOSITORY_ENV: REPOSITORY, TOKEN_FILE_ENV: str(tmp_path / "empty")})


def test_the_relay_refuses_to_start_without_its_configuration():
    env = {"PATH": "/usr/bin:/bin"}
    for command in (
        [sys.executable, "-m", "alert_relay"],
        [str(Path(sys.executable).parent / "dandelion-alert-relay")],
    ):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            f"dandelion-alert-relay: not started: {REPOSITORY_ENV} is not set: the GitHub "
            "repository (owner/name) whose retrain workflow the alerts start"
        )


# --- The chain: Prometheus -> Alertmanager -> relay -> "GitHub" ------------------------------


def assert_dispatch_of(dispatch, name: str, **labels: str) -> dict:
    assert dispatch.path == DISPATCHES
    assert dispatch.headers["Authorization"] == f"Bearer {TOKEN}"
    assert dispatch.body["event_type"] == EVENT_TYPE
    (described,) = [a for a in dispatch.body["client_payload"]["alerts"] if a["name"] == name]
    assert labels.items() <= described["labels"].items()
    assert described["startsAt"] and described["summary"]
    return described


@pytest.mark.slow  # Alertmanager's retries: about 5 s
def test_a_github_failure_is_retried_by_alertmanager_until_the_dispatch_arrives(tmp_path):
    with (
        github_stand_in(fail_next=2) as github,
        relay_process(github.url, tmp_path) as relay,
        running_alertmanager(config_for_relay(tmp_path / "am.yml", relay), tmp_path) as am,
    ):
        labels = {
            "alertname": "ClassifierManyLowConfidenceAnswers",
            "job": "dandelion-vs-grass",
            "action": "retrain",
            "severity": "warning",
            "model_version": "1bdc7ae564d4e793",
        }
        # Firing for 10 minutes already: past group_wait, so Alertmanager sends at once.
        summary = {"summary": "50% of answers have confidence at most 0.7."}
        post_alert(am, labels, summary, age=timedelta(minutes=10))
        (dispatch,) = github.wait_for(1, timeout=60)
        described = assert_dispatch_of(
            dispatch, labels["alertname"], model_version="1bdc7ae564d4e793"
        )
        assert described["summary"] == summary["summary"]
        assert github.attempts == 3  # two 500s, each answered 502 to Alertmanager, then 204
        # Delivered: the same alert posted again (as Prometheus resends it) is not sent again.
        post_alert(am, labels, summary, age=timedelta(minutes=10))
        time.sleep(3)
        assert github.attempts == 3 and len(github.received) == 1
    log = (tmp_path / "relay.log").read_text()
    assert log.count("failed, Alertmanager will retry: GitHub answered 500") == 2


class DriftingTarget:
    """A /metrics page as the service's would be while users send grass only: one answer in
    a hundred is dandelion, against a test split's 36-61 %."""

    def __init__(self):
        self.started = time.monotonic()

    def page(self) -> bytes:
        seconds = time.monotonic() - self.started
        lines = [
            "# TYPE classifier_predictions_total counter",
            f'classifier_predictions_total{{label="dandelion"}} {1 * seconds:.3f}',
            f'classifier_predictions_total{{label="grass"}} {99 * seconds:.3f}',
            "# TYPE classifier_expected_predicted_share_ratio gauge",
            'classifier_expected_predicted_share_ratio{label="dandelion",bound="lower"} 0.36',
            'classifier_expected_predicted_share_ratio{label="dandelion",bound="upper"} 0.61',
        ]
        return ("\n".join(lines) + "\n").encode()


class MetricsHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args, target: DriftingTarget, **kwargs):
        self.target = target
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802
        page = self.target.page()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, format, *args):  # noqa: A002
        pass


def prometheus_config(root, target_url: str, alertmanager_url: str) -> Path:
    """deploy/monitoring/prometheus.yml pointed at the target and Alertmanager on loopback,
    evaluating every second a copy of the rules whose `for:` durations are 0 (an hour of
    drift in a test would be an hour)."""
    groups = yaml.safe_load(RULES_FILE.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"
    rules_copy = root / "classifier.rules.yml"
    rules_copy.write_text(yaml.safe_dump(groups, sort_keys=False))
    config = yaml.safe_load((RULES_FILE.parents[1] / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules_copy)]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [urlsplit(target_url).netloc]}]
    job.pop("authorization")  # the stand-in target asks for no API key
    (alertmanagers,) = config["alerting"]["alertmanagers"]
    alertmanagers["static_configs"] = [{"targets": [urlsplit(alertmanager_url).netloc]}]
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow  # Alertmanager's group_wait (30 s) is kept: about 40 s
def test_a_drift_alert_in_prometheus_starts_retraining_through_alertmanager(tmp_path):
    (prometheus,) = require_tools("prometheus")
    with (
        github_stand_in() as github,
        serve_http(MetricsHandler, target=DriftingTarget()) as target,
        relay_process(github.url, tmp_path) as relay,
        running_alertmanager(config_for_relay(tmp_path / "am.yml", relay), tmp_path) as am,
    ):
        port = free_port()
        command = [
            prometheus,
            f"--config.file={prometheus_config(tmp_path, target, am)}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "prometheus.log"
        with running_server(command, url, log, ready_path="/-/ready", timeout=60):
            (dispatch,) = github.wait_for(1, timeout=90)
            time.sleep(2)
            assert len(github.received) == 1  # one degradation, one dispatch
    described = assert_dispatch_of(
        dispatch,
        "ClassifierPredictedShareBelowTestRange",
        job=scrape_job()["job_name"],
        label="dandelion",
        action="retrain",
        severity="warning",
    )
    assert described["summary"].endswith("of answers are dandelion, below the test split's range.")
    assert dispatch.body["client_payload"]["alertmanager"]
