"""Monitoring live: a real Prometheus (Debian's `prometheus`) scraping a real `bentoml serve` of
the pipeline's bento while a bounded burst of good and bad requests, then feedback on every
test photo, arrives; every model metric moves by exactly what was sent, and every dashboard
query and rule returns data. And the bento served with API keys, scraped with the key as
deploy/monitoring/prometheus.yml sends it (and refused without)."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from serving.contract import MODEL_NAME
from serving.errors import REJECTIONS
from serving.settings import (
    API_KEY_HEADER,
    API_KEYS_ENV,
    API_KEYS_FILE_ENV,
    FEEDBACK_OUTCOMES,
    LOW_CONFIDENCE,
    MIN_API_KEY_CHARS,
    NEITHER_LABEL,
)
from tests.support.git import git
from tests.support.http import free_port
from tests.support.images import make_image
from tests.support.monitoring import (
    dashboard_queries,
    needs_challenger,
    rules,
    scrape_job,
    scraping,
    wait_until,
    with_bool,
)
from tests.support.needs import require_tools
from tests.support.paths import PIPELINE_PATHS
from tests.support.processes import stop_process_group
from tests.support.service import (
    ROUNDING,
    evaluated_predictions,
    own_metrics_home,
    served_answers,
    serving,
)

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of ``url``/metrics: (name, sorted labels) -> value."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def changes(before: dict, after: dict, name: str) -> dict[tuple, float]:
    """How much each series of ``name`` grew, by its labels; unchanged series left out."""
    grown = {
        labels: value - before.get((metric, labels), 0.0)
        for (metric, labels), value in after.items()
        if metric == name
    }
    return {labels: delta for labels, delta in grown.items() if delta}


@dataclass(frozen=True)
class FeedbackSent:
    expected: dict[tuple[str, str], int]  # (label answered, outcome) -> feedbacks sent
    before: dict
    after: dict


@dataclass(frozen=True)
class Burst:
    answers: list[dict]  # the JSON of every 200 answer, single and batch predictions together
    rejected: dict[tuple[str, str], int]  # (reason, status) -> requests sent that way
    before: dict
    after: dict
    feedback: FeedbackSent | None = None  # sent after the burst (then scraped again)


def bad_requests(url: str) -> dict[tuple[str, str], int]:
    """Send each kind of bad request; (reason, status) -> how many were sent."""
    tiny = make_image(size=(8, 8), fmt="PNG")
    sent = [
        ("not_an_image", {"files": {"image": ("notes.jpg", b"not a photo")}}),
        ("not_an_image", {"files": {"image": ("notes.jpg", b"still not a photo")}}),
        ("empty_file", {"files": {"image": ("empty.jpg", b"")}}),
        ("image_too_small", {"files": {"image": ("tiny.png", tiny)}}),
        ("missing_file", {"files": {"photo": ("a.jpg", make_image())}}),
        ("not_a_file", {"files": {"image": (None, "text")}}),
        ("not_multipart", {"data": b"raw bytes", "headers": {"Content-Type": "image/jpeg"}}),
    ]
    counts: dict[tuple[str, str], int] = {}
    for reason, request in sent:
        response = requests.post(f"{url}/predict", timeout=60, **request)
        assert response.status_code == REJECTIONS[reason], (reason, response.text)
        key = (reason, str(REJECTIONS[reason]))
        counts[key] = counts.get(key, 0) + 1
    return counts


def send_burst(url: str, photos: list[str]) -> Burst:
    """A bounded burst: every test photo twice, two batches of three, and bad requests."""
    before = scrape(url)
    answers = served_answers(url, photos * 2)
    for batch in (photos[:3], photos[-3:]):
        files = [("images", open(photo, "rb")) for photo in batch]  # noqa: SIM115
        try:
            response = requests.post(f"{url}/predict_batch", files=files, timeout=60)
        finally:
            for _, handle in files:
                handle.close()
        assert response.status_code == 200, response.text
        answers += response.json()["predictions"]
    rejected = bad_requests(url)
    return Burst(answers, rejected, before, scrape(url))


def send_feedback(url: str, photos: list[str], labels: list[str], answers: list[dict]):
    """Feedback on each photo with its true label, which confirms or corrects ``answers``
    (what /predict answered for it: its label, or neither)."""

    def give(photo_and_label: tuple[str, str]) -> None:
        photo, label = photo_and_label
        with open(photo, "rb") as handle:
            response = requests.post(
                f"{url}/feedback", files={"image": handle}, data={"label": label}, timeout=60
            )
        assert response.status_code == 202, response.text

    before = scrape(url)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(give, zip(photos, labels, strict=True)))
    expected: dict[tuple[str, str], int] = {}
    for label, answer in zip(labels, answers, strict=True):
        answered = NEITHER_LABEL if answer["neither"] else answer["label"]
        key = (answered, FEEDBACK_OUTCOMES[label != answered])
        expected[key] = expected.get(key, 0) + 1
    return FeedbackSent(expected, before, scrape(url))


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory) -> str:
    """Debian's prometheus on 127.0.0.1, scraping the service every second, with our rules."""
    with scraping(service.url, tmp_path_factory.mktemp("prometheus"), interval="1s") as url:
        yield url


def query(prometheus_url: str, expr: str) -> list[dict]:
    response = requests.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def finite_series(prometheus_url: str, expr: str) -> int:
    """How many series ``expr`` returns with a number (NaN, as from 0/0, draws nothing)."""
    return sum(math.isfinite(float(r["value"][1])) for r in query(prometheus_url, expr))


def wait_for(prometheus_url: str, expr: str, timeout: float = 30) -> list[dict]:
    """Poll ``expr`` until it returns data (bounded: ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(prometheus_url, expr)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"no data for {expr} after {timeout}s")


@pytest.fixture(scope="module")
def burst(service, prometheus) -> Burst:
    """The known requests, once Prometheus has scraped their effect and evaluated the rules."""
    predictions = evaluated_predictions(service.workspace)
    photos = [prediction.photo for prediction in predictions]
    # BentoML creates a request series on its first occurrence (the first /predict, the
    # first 415), and rate() ignores what a series counted before its first sample: the
    # service now answers a whole burst between two scrapes. So a first burst creates every
    # series, Prometheus scrapes them, and the second burst is the one measured.
    send_burst(service.url, photos)
    time.sleep(3)  # scrapes every second
    sent = send_burst(service.url, photos)
    # Feedback on every test photo, with its true label: 60 in the day, enough for the
    # production accuracy to be recorded.
    labels = [prediction.label for prediction in predictions]
    sent = replace(
        sent, feedback=send_feedback(service.url, photos, labels, sent.answers[: len(photos)])
    )
    total = sum(changes({}, sent.after, "classifier_predictions_total").values())
    wait_for(
        prometheus,
        f'sum(classifier_predictions_total{{job="{scrape_job()["job_name"]}"}}) == {total}',
    )
    for rule in rules():
        if "record" in rule and not needs_challenger(rule["expr"]):
            wait_for(prometheus, rule["record"])
    # BentoML creates a series on its first request (a /predict_batch, a 415): give those a
    # second sample, so that rate() sees them too.
    time.sleep(3)
    return sent


def test_model_metrics_count_the_known_requests(service, burst):
    answers = burst.answers
    assert len(answers) == 2 * 60 + 6
    by_label = changes(burst.before, burst.after, "classifier_predictions_total")
    sent_labels = {
        label: sum(a["label"] == label for a in answers) for label in ("grass", "dandelion")
    }
    assert {dict(labels)["label"]: delta for labels, delta in by_label.items()} == {
        label: count for label, count in sent_labels.items() if count
    }

    confidence = "classifier_prediction_confidence_ratio"
    assert changes(burst.before, burst.after, f"{confidence}_count") == {(): len(answers)}
    low = changes(burst.before, burst.after, f"{confidence}_bucket").get(
        (("le", str(LOW_CONFIDENCE)),), 0
    )
    # The metrics take the unrounded confidence; answers show it to ANSWER_DECIMALS decimals,
    # so each shown value is within half a unit of the last decimal of the one counted.
    shown = [a["confidence"] for a in answers]
    assert sum(c <= LOW_CONFIDENCE - ROUNDING for c in shown) <= low
    assert low <= sum(c <= LOW_CONFIDENCE + ROUNDING for c in shown)
    assert changes(burst.before, burst.after, f"{confidence}_sum")[()] == pytest.approx(
        sum(shown), abs=len(shown) * ROUNDING
    )

    # The engine runs in the front (OpenVINO): one call per /predict, one per batch of three.
    images = "classifier_model_call_images"
    assert changes(burst.before, burst.after, f"{images}_count") == {(): 2 * 60 + 2}
    assert changes(burst.before, burst.after, f"{images}_sum") == {(): 2 * 60 + 2 * 3}

    rejected = changes(burst.before, burst.after, "classifier_rejected_uploads_total")
    assert {
        (dict(k)["reason"], dict(k)["status"]): v for k, v in rejected.items()
    } == burst.rejected


def test_info_and_expected_share_describe_the_model_served(service, burst):
    info = [
        labels for (name, labels), value in burst.after.items() if name == "classifier_model_info"
    ]
    assert len(info) == 1 and burst.after[("classifier_model_info", info[0])] == 1
    labels = dict(info[0])
    model_info = requests.get(f"{service.url}/model-info", timeout=10).json()
    assert labels["model_version"] == model_info["version"]
    head = git(service.workspace, "rev-parse", "--short", "HEAD").stdout.strip()
    assert labels["git_revision"] == model_info["git_revision"] == head
    lock = yaml.safe_load((service.workspace / "dvc.lock").read_text())
    (served,) = [
        out
        for out in lock["stages"]["export"]["outs"]
        if out["path"] == PIPELINE_PATHS["export_dir"]
    ]
    assert labels["dvc_md5"] == served["md5"]  # `git log -S <md5> -- dvc.lock` finds its commit

    share = {
        dict(k)["bound"]: v
        for (name, k), v in burst.after.items()
        if name == "classifier_expected_predicted_share_ratio"
    }
    assert share == {
        "lower": service.metrics["positive_share_low"],
        "upper": service.metrics["positive_share_high"],
    }
    assert share["lower"] < service.metrics["positive_share"] < share["upper"]

    accuracy = {
        (dict(k)["model_version"], dict(k)["bound"]): v
        for (name, k), v in burst.after.items()
        if name == "classifier_expected_accuracy_ratio"
    }
    assert accuracy == {
        (labels["model_version"], "lower"): service.metrics["accuracy_low"],
        (labels["model_version"], "upper"): service.metrics["accuracy_high"],
    }


def test_feedback_counts_the_served_answers_it_confirms_and_corrects(service, burst):
    """Feedback on each test photo counts /predict's answer for it (the served model's
    version, the label answered or neither), confirmed or corrected by the true label."""
    feedback = burst.feedback
    version = requests.get(f"{service.url}/model-info", timeout=10).json()["version"]
    counted = changes(feedback.before, feedback.after, "classifier_feedback_answers_total")
    assert {
        (dict(k)["model_version"], dict(k)["label"], dict(k)["outcome"]): v
        for k, v in counted.items()
    } == {(version, *key): count for key, count in feedback.expected.items()}
    assert sum(feedback.expected.values()) == 60
    # As accurate as on the test split, "neither" answers counted wrong.
    confirmed = sum(n for (_, outcome), n in feedback.expected.items() if outcome == "confirmed")
    right = round(service.metrics["accuracy"] * 60)
    assert right - round(service.metrics["neither_share"] * 60) <= confirmed <= right
    assert changes(feedback.before, feedback.after, "classifier_feedback_unscored_total") == {}


def test_metrics_follow_prometheus_naming_conventions(service, burst):
    (promtool,) = require_tools("promtool")
    text = requests.get(f"{service.url}/metrics", timeout=10).text
    linted = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout + linted.stderr


def test_every_dashboard_and_alert_expression_returns_data(prometheus, burst, tmp_path):
    checked: list[tuple[str, str, int]] = []
    for where, expr in dashboard_queries():
        checked.append((where, expr, finite_series(prometheus, expr)))
    for rule in rules():
        if "record" in rule:
            name = f"record {rule['record']}"
            checked.append((name, rule["expr"], finite_series(prometheus, rule["expr"])))
        else:
            # `bool` makes the comparison return 0 or 1 instead of filtering: the alert's
            # signal and bound both exist and match, whether or not it fires.
            expr = with_bool(rule["expr"])
            checked.append((f"alert {rule['alert']}", expr, finite_series(prometheus, expr)))
    report = "\n".join(
        f"{count:3d}  {where}: {' '.join(expr.split())}" for where, expr, count in checked
    )
    print(f"series per expression from the real Prometheus:\n{report}")
    # The bento is served alone: what reads a challenger's series has none here, and nothing
    # else may be empty.
    empty = [(where, needs_challenger(expr)) for where, expr, count in checked if count == 0]
    assert [where for where, challenger in empty if not challenger] == [], report
    assert {where for where, challenger in empty if challenger} == {
        where for where, expr, _ in checked if needs_challenger(expr)
    }, report


def test_prometheus_loads_and_evaluates_every_rule(prometheus, burst):
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = [rule for group in groups for rule in group["rules"]]
    assert sorted(rule["name"] for rule in loaded) == sorted(
        rule.get("alert") or rule["record"] for rule in rules()
    )
    assert [rule["name"] for rule in loaded if rule["health"] != "ok"] == []
    # Nothing is wrong with the service under this burst: no alert fires.
    assert [rule["name"] for rule in loaded if rule.get("state") == "firing"] == []


def test_the_bento_served_with_api_keys_is_scraped_with_prometheus_s_key(
    reproduced, promoted, tmp_path
):
    """As compose serves it: the keys from API_KEYS_FILE (a user's, then Prometheus's, as
    `dandelion secrets` writes them), Prometheus sending its own from its credentials file."""
    user_key, prometheus_key = "user-" + "u" * 40, "prometheus-" + "p" * 40
    keys = tmp_path / "classifier-api-keys"
    keys.write_text(f"{user_key}\n{prometheus_key}\n")
    (tmp_path / "prometheus-api-key").write_text(f"{prometheus_key}\n")
    home = own_metrics_home(Path(reproduced.env["BENTOML_HOME"]), tmp_path / "bentoml_home")
    env = dict(
        reproduced.env,
        BENTOML_HOME=str(home),
        FEEDBACK_DIR=str(tmp_path / "feedback"),
        PREDICTION_LOG_DIR=str(tmp_path / "predictions"),
        **{API_KEYS_FILE_ENV: str(keys)},
    )
    env.pop("FEEDBACK_STORE", None)
    job = f'up{{job="{scrape_job()["job_name"]}"}}'
    with serving(f"{MODEL_NAME}:latest", reproduced.workspace, env, tmp_path) as service:
        url = service.url
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 401
        (photo, *_) = [p.photo for p in evaluated_predictions(reproduced.workspace)]
        with open(photo, "rb") as handle:
            image = handle.read()
        refused = requests.post(f"{url}/predict", files={"image": image}, timeout=60)
        assert refused.status_code == 401 and API_KEY_HEADER in refused.json()["error"]
        answered = requests.post(
            f"{url}/predict",
            files={"image": image},
            headers={API_KEY_HEADER: user_key},
            timeout=60,
        )
        assert answered.status_code == 200, answered.text
        with scraping(
            url, tmp_path / "keyed", key_file=tmp_path / "prometheus-api-key"
        ) as prometheus:
            wait_until(prometheus, f"{job} == 1")
            wait_until(prometheus, 'classifier_rejected_uploads_total{reason="unauthorized"} == 2')
        with scraping(url, tmp_path / "unkeyed", ready=False) as prometheus:
            wait_until(prometheus, f"{job} == 0")
            (target,) = requests.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"][
                "activeTargets"
            ]
            assert "401" in target["lastError"], target


def test_a_key_configuration_mistake_stops_the_served_bento_in_one_line(
    reproduced, promoted, tmp_path
):
    """BentoML respawns a worker that fails to start (in the container too): the front stops
    the whole server instead, so it exits, saying why once, rather than retrying for ever."""
    env = dict(
        reproduced.env,
        FEEDBACK_DIR=str(tmp_path / "feedback"),
        PREDICTION_LOG_DIR=str(tmp_path / "predictions"),
        **{API_KEYS_ENV: "too-short"},
    )
    env.pop(API_KEYS_FILE_ENV, None)
    command = [sys.executable, "-m", "bentoml", "serve", f"{MODEL_NAME}:latest"]
    command += ["--host", "127.0.0.1", "--port", str(free_port())]
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        process.wait(timeout=120)  # raises if the server keeps retrying
    finally:
        stop_process_group(process)
    said = log.read_text()
    assert said.count("the service cannot start") == 1, said[-3000:]
    assert f"at least {MIN_API_KEY_CHARS}" in said
