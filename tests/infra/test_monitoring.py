"""Monitoring's configuration: the alert rules (promtool checks and unit tests), the Prometheus
config and the Grafana dashboards (structure, datasource references, what they show).

Grafana cannot run on the build machines (it is in neither Debian nor PyPI): its dashboards are
checked here for structure, and every query in them is sent to a real Prometheus scraping the
served bento in tests/end_to_end/test_scrape.py.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from serving.metrics import PREDICTION_LOG_DROP_REASONS
from serving.settings import (
    FEEDBACK_OUTCOMES,
    LOW_CONFIDENCE,
    TYPED_PREDICT_BATCH_ROUTE,
    TYPED_PREDICT_ROUTE,
)
from tests.support.monitoring import (
    DASHBOARDS,
    PROMETHEUS_CONFIG,
    PROVISIONING,
    RULES_FILE,
    RULES_TESTS,
    dashboard_queries,
    rules,
    scrape_job,
    top_level_comparison,
    with_bool,
)
from tests.support.needs import require_tools


def test_top_level_comparison_ignores_label_matchers_and_nested_comparisons():
    assert with_bool('up{job="a", code!="5.."} == 0') == 'up{job="a", code!="5.."} == bool 0'
    expr = 'x{le="0.7"} < on (job) min by (job) (y{b=~"a>b"} > 1)'
    assert with_bool(expr) == 'x{le="0.7"} < bool on (job) min by (job) (y{b=~"a>b"} > 1)'
    with pytest.raises(AssertionError, match="one top-level comparison"):
        with_bool("a > 1 and b < 2")


def test_alert_rules_pass_promtool_check_and_unit_tests():
    (promtool,) = require_tools("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES_FILE)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", RULES_TESTS.name],
        cwd=RULES_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_promtool_unit_tests_cover_every_alert():
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in rules() if "alert" in rule}


def test_every_alert_compares_one_signal_and_explains_itself():
    for rule in rules():
        if "alert" in rule:
            top_level_comparison(rule["expr"])
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # The low-confidence rule reads the service's LOW_CONFIDENCE bucket.
    (low,) = [
        rule for rule in rules() if rule.get("record") == "job:classifier_low_confidence:ratio_30m"
    ]
    assert f'le="{LOW_CONFIDENCE}"' in low["expr"]
    # The degradation alert, compared per model version with its own bound, starts retraining.
    (accuracy,) = [
        rule for rule in rules() if rule.get("alert") == "ClassifierProductionAccuracyLow"
    ]
    assert accuracy["labels"]["action"] == "retrain"
    # Production accuracy counts the service's "confirmed" outcome (serving/settings.py).
    (production,) = [
        rule
        for rule in rules()
        if rule.get("record") == "model_version:classifier_production_accuracy:ratio_1d"
    ]
    assert f'outcome="{FEEDBACK_OUTCOMES[0]}"' in production["expr"]
    assert "on (job, model_version)" in accuracy["expr"]
    # The prediction log's loss alert reads the reasons the service counts drops by: all but
    # the files sink's retention (evicted) and a stopping process's (stopped).
    (losing,) = [rule for rule in rules() if rule.get("alert") == "ClassifierPredictionLogLosing"]
    (selected,) = re.findall(r'reason=~"([^"]*)"', losing["expr"])
    assert set(selected.split("|")) == set(PREDICTION_LOG_DROP_REASONS) - {"evicted", "stopped"}


def test_per_version_rules_keep_the_versions_apart_and_roll_back_rather_than_retrain():
    """A canary is a minority of answers: its signals are grouped by model_version (never
    summed with the champion's), and its alerts go to people, not to retraining."""
    versioned = [rule for rule in rules() if rule.get("record", "").startswith("model_version:")]
    for rule in versioned:
        assert "model_version" in rule["expr"].split("by (", 1)[1].split(")")[0], rule["record"]
    (low,) = [
        r for r in versioned if r["record"] == "model_version:classifier_low_confidence:ratio_30m"
    ]
    assert f'le="{LOW_CONFIDENCE}"' in low["expr"]
    recorded = {rule["record"] for rule in versioned}
    per_version = [
        rule
        for rule in rules()
        if "alert" in rule and any(name in rule["expr"] for name in recorded)
    ]
    assert {rule["alert"] for rule in per_version} >= {
        "ClassifierModelVersionErrors",
        "ClassifierModelVersionSlowScoring",
        "ClassifierModelVersionManyLowConfidenceAnswers",
        "ClassifierShadowDisagrees",
        "ClassifierShadowShedding",
        "ClassifierProductionAccuracyLow",
    }
    for rule in per_version:
        if rule["alert"] != "ClassifierProductionAccuracyLow":
            assert "action" not in rule["labels"], rule["alert"]


def test_prometheus_config_is_valid_and_its_job_is_the_one_rules_select(tmp_path):
    (promtool,) = require_tools("promtool")
    # promtool checks that the API key's file exists: the config as is, but for that file's
    # path (in compose, a secret) and the rules' (relative to the config).
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer"  # what the service accepts
    key_file = tmp_path / "prometheus-api-key"
    key_file.write_text("k" * 32)
    job["authorization"]["credentials_file"] = str(key_file)
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    checked_config = tmp_path / "prometheus.yml"
    checked_config.write_text(yaml.safe_dump(config))
    checked = subprocess.run(
        [promtool, "check", "config", str(checked_config)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout
    selector = f'job="{scrape_job()["job_name"]}"'
    recorded = [rule["record"] for rule in rules() if "record" in rule]
    for rule in rules():
        # Raw metrics are selected by job; recorded series were already.
        reads_recorded = any(name in rule["expr"] for name in recorded)
        assert selector in rule["expr"] or reads_recorded, rule.get("alert") or rule["record"]
    for where, expr in dashboard_queries():
        assert selector in expr, where


def test_dashboards_are_provisioned_grafana_json_on_the_provisioned_datasource():
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "dashboards.yml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    assert {path.stem for path in DASHBOARDS} == {"service", "model"}
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["title"] and dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        assert isinstance(dashboard["schemaVersion"], int) and dashboard["panels"]
        panel_ids = [panel["id"] for panel in dashboard["panels"]]
        assert len(panel_ids) == len(set(panel_ids)), path.name
        for panel in dashboard["panels"]:
            where = f"{path.name}: {panel['title']}"
            position = panel["gridPos"]
            assert position["x"] + position["w"] <= 24 and position["h"] > 0, where
            assert panel["type"] in {"timeseries", "stat", "table", "heatmap"}, where
            references = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
            assert all(
                ref == {"type": "prometheus", "uid": datasource["uid"]} for ref in references
            )
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert ref_ids and len(ref_ids) == len(set(ref_ids)), where


def test_the_dashboards_show_what_operators_need():
    queries = " ".join(expr for _, expr in dashboard_queries())
    for metric in [
        "bentoml_service_request_total",  # request rate and error ratio
        "bentoml_service_request_duration_seconds_bucket",  # p50/p95/p99
        "bentoml_service_request_in_progress",
        "classifier_model_call_images",  # images per engine call (the batch size)
        "classifier_model_call_retries_total",
        "classifier_process_cpu_seconds_total",
        "classifier_process_resident_memory_bytes",
        "classifier_predictions_total",
        "classifier_prediction_confidence_ratio_bucket",
        "classifier_rejected_uploads_total",
        "classifier_model_info",
        "classifier_expected_predicted_share_ratio",
        "classifier_feedback_answers_total",  # confirmed and corrected, by version and label
        "classifier_feedback_unscored_total",
        "classifier_expected_accuracy_ratio",
        "model_version:classifier_production_accuracy:ratio_1d",
        # Per model version, with a challenger (shadow or canary) or a replica canary.
        "classifier_challenger_info",
        "classifier_model_answers_total",
        "classifier_model_errors_total",
        "classifier_model_scoring_seconds_bucket",
        "classifier_shadow_comparisons_total",
        "model_version:classifier_shadow_agreement:ratio_1h",
        "model_version:classifier_shadow_shed:ratio_rate15m",
        "classifier_shadow_queue_images",
    ]:
        assert metric in queries, metric
    for quantile in ("0.5", "0.95"):
        assert f"histogram_quantile({quantile}, sum by (le, model_version, role, mode)" in queries
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, endpoint)" in queries
    # The latency panels show every prediction route: the multipart ones and their typed twins.
    routes = {"/predict", "/predict_batch", TYPED_PREDICT_ROUTE, TYPED_PREDICT_BATCH_ROUTE}
    latencies = [
        expr
        for _, expr in dashboard_queries()
        if "bentoml_service_request_duration_seconds_bucket" in expr
    ]
    assert latencies
    for expr in latencies:
        (selected,) = re.findall(r'endpoint=~"([^"]*)"', expr)
        assert set(selected.split("|")) == routes, expr
