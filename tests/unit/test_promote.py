"""Promotion: the champion gate on a real MLflow registry, and the `dandelion` command's own
answers (the command on the reproduced pipeline: tests/end_to_end/test_promotion.py)."""

from __future__ import annotations

import dataclasses
import os

import keras
import mlflow
import pytest
from mlflow import MlflowClient

from pipeline import promote
from pipeline.params import PromoteParams
from tests.support.live_evidence import write_prediction_log
from tests.support.paths import PARAMS_FILE
from tests.support.processes import dandelion

NAME = "gate-test"


def logged_run(accuracy: float) -> str:
    """A finished run holding a (tiny) Keras model, as `train` leaves it."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
    with mlflow.start_run() as run:
        mlflow.keras.log_model(model, name="model", pip_requirements=["keras"])
        mlflow.log_metric("test_accuracy", accuracy)
    return run.info.run_id


SET_A, SET_B = "a" * 64, "b" * 64  # two test sets' digests


def gate(
    client, run_id, accuracy, min_improvement=0.0, bento=None, test_set=SET_A, different=False
):
    return promote.promote_if_better(
        client,
        NAME,
        run_id,
        bento or f"bento-of-{run_id}",
        {"accuracy": accuracy, "f1": accuracy},
        test_set,
        PromoteParams(
            metric="accuracy",
            min_improvement=min_improvement,
            live=PromoteParams.load(PARAMS_FILE).live,
        ),
        {"git_revision": "abc123"},
        different_test_set=different,
    )


@pytest.fixture
def client(mlflow_store):
    mlflow.set_experiment("gate")
    return MlflowClient()


def versions(client) -> list[str]:
    return sorted(v.version for v in client.search_model_versions(f"name='{NAME}'"))


def test_first_model_becomes_champion(client):
    run_id = logged_run(0.80)
    champion, promoted = gate(client, run_id, 0.80)
    assert promoted and champion.run_id == run_id
    assert client.get_model_version_by_alias(NAME, "champion").version == champion.version
    assert champion.tags["test_accuracy"] == "0.8" and champion.tags["git_revision"] == "abc123"
    assert champion.tags["bento"] == f"bento-of-{run_id}"
    assert champion.tags["test_set_sha256"] == SET_A
    assert "promoted_without_comparison" not in champion.tags


def test_worse_or_equal_model_changes_nothing(client):
    first, _ = gate(client, logged_run(0.90), 0.90)
    for accuracy in (0.85, 0.90):
        champion, promoted = gate(client, logged_run(accuracy), accuracy)
        assert not promoted and champion.version == first.version
    assert versions(client) == [first.version]


def test_rerunning_with_the_same_model_changes_nothing(client):
    run_id = logged_run(0.90)
    first, _ = gate(client, run_id, 0.90)
    again, promoted = gate(client, run_id, 0.90)
    assert not promoted and again.version == first.version
    assert versions(client) == [first.version]


def test_better_model_takes_the_alias_only_past_the_margin(client):
    first, _ = gate(client, logged_run(0.90), 0.90)
    _, promoted = gate(client, logged_run(0.91), 0.91, min_improvement=0.02)
    assert not promoted
    better, promoted = gate(client, logged_run(0.95), 0.95, min_improvement=0.02)
    assert promoted and better.version != first.version
    assert client.get_model_version_by_alias(NAME, "champion").version == better.version


def test_a_new_bento_of_the_champions_run_is_judged_like_any_candidate(client):
    """Same trained model, another threshold: a new bento, promoted only if it scores better."""
    run_id = logged_run(0.90)
    first, _ = gate(client, run_id, 0.90, bento="threshold-a")
    _, promoted = gate(client, run_id, 0.88, bento="threshold-b")
    assert not promoted
    better, promoted = gate(client, run_id, 0.93, bento="threshold-c")
    assert promoted and better.version != first.version and better.run_id == run_id
    assert client.get_model_version_by_alias(NAME, "champion").tags["bento"] == "threshold-c"


def test_a_model_tested_on_another_test_set_is_not_compared_without_saying_so(client):
    first, _ = gate(client, logged_run(0.90), 0.90)
    for accuracy in (0.80, 0.99):  # better or worse: the numbers are on other photos
        with pytest.raises(promote.PromotionError) as refused:
            gate(client, logged_run(accuracy), accuracy, test_set=SET_B)
        assert str(refused.value) == (
            f"the champion (version {first.version}) was tested on test set {SET_A}, this "
            f"model on test set {SET_B}: their test metrics are not comparable. Promote it "
            "without comparing them with `dandelion promote --different-test-set` "
            "(recorded on the version)"
        )
    assert versions(client) == [first.version]
    assert client.get_model_version_by_alias(NAME, "champion").version == first.version


def test_different_test_set_promotes_without_comparison_and_says_so(client):
    first, _ = gate(client, logged_run(0.90), 0.90)
    worse, promoted = gate(client, logged_run(0.80), 0.80, test_set=SET_B, different=True)
    assert promoted and client.get_model_version_by_alias(NAME, "champion").version == (
        worse.version
    )
    assert worse.tags["test_set_sha256"] == SET_B
    assert worse.tags["promoted_without_comparison"] == (
        f"champion version {first.version} was tested on test set {SET_A}"
    )
    # From then on, models on the new champion's test set are compared as before, and the
    # flag changes nothing when the sets are the same.
    _, promoted = gate(client, logged_run(0.79), 0.79, test_set=SET_B, different=True)
    assert not promoted
    better, promoted = gate(client, logged_run(0.85), 0.85, test_set=SET_B)
    assert promoted and "promoted_without_comparison" not in better.tags


def test_a_champion_without_a_recorded_test_set_is_not_compared(client):
    """A champion registered before test sets were recorded: its set is unknown."""
    run_id = logged_run(0.90)
    version = mlflow.register_model(
        f"runs:/{run_id}/model", NAME, tags={"bento": "old", "test_accuracy": "0.9"}
    )
    client.set_registered_model_alias(NAME, "champion", version.version)
    with pytest.raises(promote.PromotionError, match="was tested on test set none recorded"):
        gate(client, logged_run(0.95), 0.95)
    newer, promoted = gate(client, logged_run(0.95), 0.95, different=True)
    assert promoted and newer.tags["promoted_without_comparison"] == (
        f"champion version {version.version} was tested on test set none recorded"
    )


def test_the_command_says_what_it_does_and_where_to_run_it(tmp_path):
    usage = dandelion(tmp_path, "--help", env=dict(os.environ))
    assert usage.returncode == 0 and "promote" in usage.stdout
    options = dandelion(tmp_path, "promote", "--help", env=dict(os.environ))
    assert options.returncode == 0 and "--different-test-set" in options.stdout
    assert dandelion(tmp_path, env=dict(os.environ)).returncode == 2  # a command is required
    elsewhere = dandelion(tmp_path, "promote", env=dict(os.environ))
    assert elsewhere.returncode == 1
    assert elsewhere.stderr == "promote: no dvc.yaml here: run it from the project's root\n"


def shadow_log(directory, champion: str, challenger: str, photos: int, disagree: int):
    """A prediction log of ``photos`` champion answers, each shadowed by the challenger,
    ``disagree`` of them on another label."""
    from datetime import UTC, datetime

    now = datetime.now(UTC).isoformat()
    lines = []
    for i in range(photos):
        base = {"time": now, "answer_id": f"a{i}", "neither": False, "latency_seconds": 0.01}
        lines.append({**base, "model_version": champion, "role": "champion", "label": "grass"})
        lines.append(
            {
                **base,
                "model_version": challenger,
                "role": "challenger",
                "shadow": True,
                "label": "dandelion" if i < disagree else "grass",
            }
        )
    write_prediction_log(directory, lines)
    return promote.LiveSource("log", str(directory))


LIVE = dataclasses.replace(PromoteParams.load(PARAMS_FILE).live, min_answers=20, min_agreement=0.9)


def test_live_evidence_that_falls_short_refuses_with_the_checks_and_is_recorded(client, tmp_path):
    first, _ = gate(client, logged_run(0.90), 0.90)
    candidate = logged_run(0.95)
    source = shadow_log(tmp_path / "log", first.tags["bento"], "v2", photos=20, disagree=3)
    with pytest.raises(promote.PromotionError) as refused:
        promote.live_gate(client, NAME, candidate, "v2", source, LIVE)
    message = str(refused.value)
    assert message.startswith(
        f"live evidence (prediction log {tmp_path / 'log'}, last 1d) does not support "
        f"promoting challenger v2 over champion {first.tags['bento']}: not promoted\n"
    )
    assert "agreement            0.8500 (17 of 20)" in message and "FAIL" in message
    run = client.get_run(candidate)
    assert run.data.tags["live_decision"] == "refused"
    assert run.data.metrics["live_agreement"] == 0.85
    assert run.data.metrics["live_challenger_answers"] == 20
    (artifact,) = client.list_artifacts(candidate, "live_evidence")
    assert artifact.path == run.data.tags["live_evidence"]
    recorded = mlflow.artifacts.load_dict(f"runs:/{candidate}/{artifact.path}")
    assert recorded["passed"] is False and recorded["evidence"]["comparisons"] == {
        "agree": 17,
        "disagree": 3,
    }
    assert recorded["thresholds"]["min_agreement"] == 0.9
    assert client.get_model_version_by_alias(NAME, "champion").version == first.version


def test_live_evidence_that_passes_leaves_the_decision_to_the_test_gate(client, tmp_path):
    first, _ = gate(client, logged_run(0.90), 0.90)
    candidate = logged_run(0.95)
    source = shadow_log(tmp_path / "log", first.tags["bento"], "v2", photos=20, disagree=2)
    decision, path = promote.live_gate(client, NAME, candidate, "v2", source, LIVE)
    assert decision.passed and client.get_run(candidate).data.tags["live_decision"] == "passed"
    assert path.startswith("live_evidence/v2-") and path.endswith(".json")
    # The candidate is not yet champion: the test gate still decides.
    _, promoted = gate(client, candidate, 0.95, bento="v2")
    assert promoted
    # Once it is champion, there is nothing to prove: no evidence is read.
    assert (
        promote.live_gate(
            client, NAME, candidate, "v2", promote.LiveSource("log", "/nowhere"), LIVE
        )
        is None
    )


def test_live_evidence_needs_a_champion_to_compare_with(client, tmp_path):
    with pytest.raises(promote.PromotionError, match="there is no champion yet"):
        promote.live_gate(client, NAME, logged_run(0.9), "v2", promote.LiveSource("log", "x"), LIVE)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--live", "log"], "--live log needs --log DIR_OR_S3, the prediction log"),
        (["--log", "dir"], "--log DIR_OR_S3 is the source of --live log"),
        (["--live", "log", "--prometheus-url", "u"], "--prometheus-url is the source of"),
        (["--live", "grafana"], "argument --live: invalid choice: 'grafana'"),
    ],
)
def test_the_live_options_go_together(tmp_path, options, error):
    refused = dandelion(tmp_path, "promote", *options, env=dict(os.environ))
    assert refused.returncode == 2 and error in refused.stderr, refused.stderr
