"""The live-evidence gate of `dandelion promote --live`: decide() on evidence built by hand, and
the prediction log's reader on a small JSON-lines log (the Prometheus reader against a real
Prometheus: tests/infra/test_live_evidence_prometheus.py)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.intervals import wilson
from pipeline.live_evidence import (
    Evidence,
    LiveEvidenceError,
    ModelEvidence,
    decide,
    log_evidence,
    read_log,
)
from pipeline.params import LivePromoteParams
from tests.support.live_evidence import write_prediction_log

THRESHOLDS = LivePromoteParams(
    window="1d",
    min_answers=100,
    min_agreement=0.9,
    latency_tolerance=0.1,
    error_tolerance=0.01,
    production_accuracy=True,
    min_feedback=30,
)


def model(role, version, served=0, shadow=0, errors=0, p95=0.010, confirmed=90, corrected=10):
    return ModelEvidence(
        version=version,
        role=role,
        answers={"served": served, "shadow": shadow},
        errors=errors,
        p95_seconds=p95,
        feedback={"confirmed": confirmed, "corrected": corrected},
    )


def evidence(champion=None, challenger=None, agree=190, disagree=10) -> Evidence:
    return Evidence(
        source="Prometheus http://127.0.0.1:9090",
        window="1d",
        champion=champion or model("champion", "v1", served=200),
        challenger=challenger or model("challenger", "v2", shadow=200),
        comparisons={"agree": agree, "disagree": disagree},
    )


def check(decision, name):
    (found,) = [c for c in decision.checks if c.name == name]
    return found


def test_a_challenger_as_good_as_the_champion_passes_every_check():
    decision = decide(evidence(), THRESHOLDS)
    assert decision.passed and decision.refused == []
    assert [c.name for c in decision.checks] == [
        "champion answers",
        "challenger answers",
        "agreement",
        "p95 scoring time",
        "error rate",
        "production accuracy",
    ]
    assert all(c.passed for c in decision.checks)
    assert check(decision, "agreement").measured == "0.9500 (190 of 200)"
    assert check(decision, "p95 scoring time").bound == "<= 11.0 ms"
    assert "supports promoting challenger v2 over champion v1" in decision.summary()


def challenger(**changes):
    return model("challenger", "v2", **{"shadow": 200, **changes})


@pytest.mark.parametrize(
    ("changes", "refused", "reason"),
    [
        ({"challenger": challenger(shadow=99)}, "challenger answers", "too few"),
        ({"champion": model("champion", "v1", served=50)}, "champion answers", "too few"),
        ({"agree": 179, "disagree": 21}, "agreement", "differently too often"),
        ({"challenger": challenger(p95=0.0111)}, "p95 scoring time", "slower"),
        (
            {"challenger": challenger(shadow=0, served=200, p95=None)},
            "p95 scoring time",
            "no scoring time observed",
        ),
        ({"challenger": challenger(errors=3)}, "error rate", "fails more often"),
        # 70 of 100: its Wilson upper bound (0.7811) is below the champion's 0.9.
        ({"challenger": challenger(confirmed=70, corrected=30)}, "production accuracy", "less"),
        ({"challenger": challenger(confirmed=20, corrected=9)}, "production accuracy", "little"),
    ],
)
def test_each_bound_refuses_alone(changes, refused, reason):
    decision = decide(evidence(**changes), THRESHOLDS)
    assert not decision.passed
    assert [c.name for c in decision.refused] == [refused]
    assert reason in decision.refused[0].reason
    assert "FAIL" in decision.table() and refused in decision.table()


def test_the_bounds_themselves_pass():
    """At or just within each bound: answers, agreement, latency and error tolerances,
    and a challenger whose accuracy's upper bound just reaches the champion's 0.9."""
    assert wilson(85, 100).high > 0.9 > wilson(84, 100).high
    champion = model("champion", "v1", served=100, errors=1, p95=0.010, confirmed=90, corrected=10)
    at_bounds = evidence(
        champion=champion,
        challenger=challenger(shadow=100, errors=2, p95=0.011, confirmed=85, corrected=15),
        agree=90,
        disagree=10,
    )
    decision = decide(at_bounds, THRESHOLDS)
    assert decision.passed, decision.table()
    worse = dataclasses.replace(at_bounds, challenger=challenger(confirmed=84, corrected=16))
    assert [c.name for c in decide(worse, THRESHOLDS).refused] == ["production accuracy"]


def test_a_canary_period_has_no_agreement_and_it_does_not_decide():
    canary = evidence(challenger=model("challenger", "v2", served=150), agree=0, disagree=0)
    decision = decide(canary, THRESHOLDS)
    assert decision.passed
    assert check(decision, "agreement").passed is None
    assert "canary" in check(decision, "agreement").reason
    shadow_uncompared = evidence(agree=0, disagree=0)
    assert [c.name for c in decide(shadow_uncompared, THRESHOLDS).refused] == ["agreement"]


def test_production_accuracy_can_be_left_out():
    worse = model("challenger", "v2", shadow=200, confirmed=10, corrected=90)
    off = dataclasses.replace(THRESHOLDS, production_accuracy=False)
    decision = decide(evidence(challenger=worse), off)
    assert decision.passed and check(decision, "production accuracy").passed is None


def test_the_decision_as_mlflow_records_it_is_json():
    decision = decide(evidence(), THRESHOLDS)
    record = json.loads(json.dumps(decision.to_dict()))
    assert record["passed"] is True
    assert record["evidence"]["challenger"]["answers"] == {"served": 0, "shadow": 200}
    assert record["thresholds"]["min_agreement"] == 0.9
    assert {c["name"] for c in record["checks"]} >= {"agreement", "error rate"}


NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def record(answer_id, version, role, label, shadow=False, neither=False, latency=0.01, age_h=1):
    return {
        "time": (NOW - timedelta(hours=age_h)).isoformat(),
        "answer_id": answer_id,
        "photo_sha256": "0" * 64,
        "model_version": version,
        "role": role,
        "shadow": shadow,
        "label": label,
        "score": 0.7,
        "novelty": 1.0,
        "neither": neither,
        "confidence": 0.7,
        "latency_seconds": latency,
        "endpoint": "predict",
    }


def test_the_log_gives_answers_agreement_and_latency(tmp_path):
    """Four champion answers, three shadowed; one shadow disagrees on the label, one on the
    neither flag; one canary answer; records of another version and before the window do not
    count. Written by
    the service's own writer (serving/prediction_log.py)."""
    champion = [
        record(f"a{i}", "v1", "champion", "dandelion", latency=0.01 * (i + 1)) for i in range(4)
    ]
    shadows = [  # their time is not compared (lowest CPU priority): see latency_check
        record("a0", "v2", "challenger", "dandelion", shadow=True, latency=0.5),
        record("a1", "v2", "challenger", "grass", shadow=True, latency=0.5),
        record("a2", "v2", "challenger", "dandelion", shadow=True, neither=True, latency=0.5),
    ]
    canary = [record("c0", "v2", "challenger", "grass", latency=0.03)]  # answered a client
    noise = [
        record("a9", "v0", "champion", "grass"),  # an older champion
        record("a8", "v2", "challenger", "grass", shadow=True, age_h=30),  # before the window
    ]
    write_prediction_log(tmp_path / "log", champion + shadows + canary + noise)
    records = list(read_log(str(tmp_path / "log")))
    assert len(records) == 10
    found = log_evidence(records, str(tmp_path / "log"), "v1", "v2", "1d", now=NOW)
    assert found.champion.answers == {"served": 4, "shadow": 0}
    assert found.challenger.answers == {"served": 1, "shadow": 3}
    assert found.comparisons == {"agree": 1, "disagree": 2}
    assert found.champion.p95_seconds == pytest.approx(0.0385)  # numpy's linear quantile
    assert found.challenger.p95_seconds == pytest.approx(0.03)
    assert found.champion.errors is None and found.champion.feedback is None
    decision = decide(found, dataclasses.replace(THRESHOLDS, min_answers=3, min_agreement=0.3))
    assert decision.passed, decision.table()
    assert {c.name for c in decision.checks if c.passed is None} == {
        "error rate",
        "production accuracy",
    }


def test_the_log_without_the_challenger_or_unreadable_is_an_error(tmp_path):
    write_prediction_log(tmp_path, [record("a0", "v1", "champion", "grass")])
    records = list(read_log(str(tmp_path)))
    with pytest.raises(LiveEvidenceError, match="no answer of version v2 as challenger in the"):
        log_evidence(records, str(tmp_path), "v1", "v2", "1d", now=NOW)
    (log_file,) = (tmp_path / "records").glob("*.jsonl")
    log_file.write_text(log_file.read_text() + "not json\n")
    with pytest.raises(LiveEvidenceError, match=r"cannot be read: .*line 2: not JSON"):
        list(read_log(str(tmp_path)))
    with pytest.raises(LiveEvidenceError, match="cannot be read: no prediction log in"):
        list(read_log(str(tmp_path / "missing")))
    log_file.write_text('{"time": "2026-12-06T11:00:00", "answer_id": "a0"}\n')
    with pytest.raises(LiveEvidenceError, match="has a record without a UTC time"):
        list(read_log(str(tmp_path)))


def test_a_shadow_s_latency_is_not_measured_and_does_not_decide():
    """Only served answers are timed: a shadow-only challenger (at the lowest CPU priority)
    has no p95, which is "not measured", not a refusal."""
    decision = decide(evidence(challenger=challenger(p95=None)), THRESHOLDS)
    latency = check(decision, "p95 scoring time")
    assert latency.passed is None and "canary" in latency.reason
    assert decision.passed
