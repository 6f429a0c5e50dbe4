"""The live evidence of `dandelion promote --live prometheus` read from a real Prometheus
(Debian's `prometheus`) scraping a loopback exporter of the service's own per-model metrics for a
champion and a challenger version: every count comes back exactly as the exporter counted it.
(The service itself, served with a challenger, feeds a real Prometheus in the end-to-end tests.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY, MetricsHandler

from pipeline.live_evidence import (
    LiveEvidenceError,
    decide,
    prometheus_evidence,
    prometheus_queries,
)
from pipeline.params import LivePromoteParams
from serving.metrics import feedback_metrics, rollout_metrics
from serving.settings import FEEDBACK_OUTCOMES, SHADOW_OUTCOMES
from tests.support.http import free_port, serve_http
from tests.support.monitoring import instant, last_scrape, scraping, wait_until

CHAMPION, CHALLENGER = "champion-v1", "challenger-v2"
# The challenger shadows, then answers a canary share: only served answers are timed.
MODELS = (
    (CHAMPION, "champion", "served"),
    (CHALLENGER, "challenger", "shadow"),
    (CHALLENGER, "challenger", "served"),
)


class Exporter:
    """The service's own per-model and feedback metrics (serving/metrics.py, this process's
    registry), for two versions no other test uses, served on 127.0.0.1: a renamed metric or
    label breaks this test as it would break the gate."""

    def __init__(self) -> None:
        self.registry = REGISTRY
        rollout, feedback = rollout_metrics(), feedback_metrics()
        self.answers, self.errors, self.scoring = rollout.answers, rollout.errors, rollout.scoring
        self.comparisons, self.feedback = rollout.comparisons, feedback.answers
        # Every series at 0 before the first scrape, as the service creates them at start-up:
        # increase() then counts from that 0.
        for version, role, mode in MODELS:
            for label in ("grass", "dandelion"):
                self.answers.labels(version, role, mode, label)
                for outcome in FEEDBACK_OUTCOMES:
                    self.feedback.labels(version, label, outcome)
            self.errors.labels(version, role, mode)
            self.scoring.labels(version, role, mode)
        for outcome in SHADOW_OUTCOMES:
            self.comparisons.labels(CHALLENGER, outcome)

    def traffic(self) -> None:
        """300 photos: the champion serves them, in 0.008 s each, and fails once; the
        challenger shadows them, fails twice, and agrees on 270; then it answers 100 as a
        canary, in 0.02 s each; feedback on 45 of each."""
        for i in range(300):
            label = ("grass", "dandelion")[i % 2]
            self.answers.labels(CHAMPION, "champion", "served", label).inc()
            self.scoring.labels(CHAMPION, "champion", "served").observe(0.008)
            self.answers.labels(CHALLENGER, "challenger", "shadow", label).inc()
            self.scoring.labels(CHALLENGER, "challenger", "shadow").observe(0.5)  # not compared
            self.comparisons.labels(CHALLENGER, "agree" if i % 10 else "disagree").inc()
        for i in range(100):
            label = ("grass", "dandelion")[i % 2]
            self.answers.labels(CHALLENGER, "challenger", "served", label).inc()
            self.scoring.labels(CHALLENGER, "challenger", "served").observe(0.02)
        self.errors.labels(CHAMPION, "champion", "served").inc()
        self.errors.labels(CHALLENGER, "challenger", "shadow").inc(2)
        self.feedback.labels(CHAMPION, "grass", "confirmed").inc(40)
        self.feedback.labels(CHAMPION, "dandelion", "corrected").inc(5)
        self.feedback.labels(CHALLENGER, "grass", "confirmed").inc(38)
        self.feedback.labels(CHALLENGER, "dandelion", "corrected").inc(7)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[tuple[str, Exporter]]:
    """Debian's prometheus on 127.0.0.1, scraping the exporter four times a second (a first
    scrape of every series at 0 before the traffic)."""
    exporter = Exporter()
    exported = serve_http(MetricsHandler.factory(exporter.registry))
    with exported as target, scraping(target, tmp_path_factory.mktemp("prom")) as url:
        exporter.traffic()
        wait_until(
            url, f'sum(classifier_model_answers_total{{model_version="{CHALLENGER}"}}) == 400'
        )
        yield url, exporter


def test_the_evidence_is_what_the_service_counted(prometheus):
    url, _ = prometheus
    evidence = prometheus_evidence(url, CHAMPION, CHALLENGER, "1d", at=last_scrape(url))
    champion, challenger = evidence.champion, evidence.challenger
    assert champion.answers == {"served": 300}
    assert challenger.answers == {"served": 100, "shadow": 300}
    assert (champion.errors, challenger.errors) == (1, 2)
    assert evidence.comparisons == {"agree": 270, "disagree": 30}
    assert champion.feedback == {"confirmed": 40, "corrected": 5}
    assert challenger.feedback == {"confirmed": 38, "corrected": 7}
    # histogram_quantile interpolates within the bucket holding the 95th percentile.
    assert champion.p95_seconds == pytest.approx(0.005 + 0.95 * 0.005)
    assert challenger.p95_seconds == pytest.approx(0.01 + 0.95 * 0.015)
    assert evidence.source == f"Prometheus {url}" and evidence.window == "1d"

    thresholds = LivePromoteParams(
        window="1d",
        min_answers=300,
        min_agreement=0.9,
        latency_tolerance=1.6,  # 0.02425 s is within 2.6 x 0.00975 s
        error_tolerance=0.01,
        production_accuracy=True,
        min_feedback=45,
    )
    assert decide(evidence, thresholds).passed, decide(evidence, thresholds).table()
    strict = LivePromoteParams(**{**thresholds.to_dict(), "latency_tolerance": 0.1})
    assert [c.name for c in decide(evidence, strict).refused] == ["p95 scoring time"]


def test_every_evidence_query_is_valid_promql(prometheus):
    url, _ = prometheus
    for name, expr in prometheus_queries(CHAMPION, CHALLENGER, "1d").items():
        assert instant(url, expr), name  # each has data here


def test_a_version_prometheus_never_saw_is_named_with_what_it_has(prometheus):
    url, _ = prometheus
    with pytest.raises(LiveEvidenceError) as refused:
        prometheus_evidence(url, CHAMPION, "v-unknown", "1d")
    message = str(refused.value)
    prefix = (
        f"Prometheus at {url} has no classifier_model_answers_total series for version "
        "v-unknown as challenger in the last 1d; it has: "
    )
    assert message.startswith(prefix), message
    listed, rest = message.removeprefix(prefix).split(". ", 1)
    # The exporter serves this process's whole registry: in a full run it also holds the
    # versions earlier tests of the process created (tests/support/stub_service.py's).
    assert {f"{CHALLENGER} as challenger", f"{CHAMPION} as champion"} <= set(listed.split(", "))
    assert rest.startswith("Serve it beside the champion first (CHALLENGER=v-unknown"), message
    with pytest.raises(
        LiveEvidenceError, match="no classifier_model_answers_total series for version"
    ):
        prometheus_evidence(url, CHALLENGER, CHALLENGER, "1d")  # never served as champion


def test_an_unreachable_prometheus_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LiveEvidenceError) as refused:
        prometheus_evidence(url, CHAMPION, CHALLENGER, "1d")
    assert str(refused.value).startswith(f"Prometheus at {url} cannot be reached (ConnectionError)")
