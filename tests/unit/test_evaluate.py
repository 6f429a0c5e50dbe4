"""Evaluate stage: metric arithmetic and the per-photo predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from pipeline.export import export_model
from serving.contract import MODEL_FILE, PREDICTIONS_FILE, DecisionRule
from stages import evaluate

CLASSES = ("grass", "dandelion")


def rule(threshold: float) -> DecisionRule:
    return DecisionRule(CLASSES, threshold)


def test_scores_match_a_hand_computed_confusion_matrix():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.6, 0.2, 0.1, 0.3, 0.7, 0.4])
    # threshold 0.5: TP=3, FN=1, FP=1, TN=3
    result = evaluate.score_predictions(labels, scores, rule(0.5))
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(3 / 4)
    # Of 16 positive/negative pairs the positive scores higher in 4 + 4 + 3 + 1 = 12.
    assert result["roc_auc"] == pytest.approx(12 / 16)


def test_threshold_moves_the_decision():
    labels = np.array([1, 0])
    scores = np.array([0.6, 0.4])
    assert evaluate.score_predictions(labels, scores, rule(0.5))["accuracy"] == 1.0
    assert evaluate.score_predictions(labels, scores, rule(0.7))["accuracy"] == 0.5


def wilson_by_hand(successes: int, n: int) -> tuple[float, float]:
    """Wilson score interval, written out: centre and half-width for z = 1.959964 (95 %)."""
    share, z = successes / n, 1.959964
    centre = (share + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(share * (1 - share) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return centre - half, centre + half


def test_positive_share_comes_with_its_95_percent_wilson_interval():
    scores = np.array([0.9] * 29 + [0.1] * 31)  # 29 of 60 photos predicted dandelion
    result = evaluate.score_predictions(np.ones(60, dtype=int), scores, rule(0.5))
    low, high = wilson_by_hand(29, 60)
    assert result["positive_share"] == pytest.approx(29 / 60)
    assert result["positive_share_low"] == pytest.approx(low, abs=1e-6)
    assert result["positive_share_high"] == pytest.approx(high, abs=1e-6)


def test_accuracy_comes_with_its_95_percent_wilson_interval():
    # 30 dandelions, 30 grass; 2 dandelions and 1 grass predicted wrong: 57 of 60 right.
    labels = np.array([1] * 30 + [0] * 30)
    scores = np.array([0.9] * 28 + [0.2] * 2 + [0.1] * 29 + [0.8])
    result = evaluate.score_predictions(labels, scores, rule(0.5))
    low, high = wilson_by_hand(57, 60)
    assert result["accuracy"] == pytest.approx(57 / 60)
    assert result["accuracy_low"] == pytest.approx(low, abs=1e-6)
    assert result["accuracy_high"] == pytest.approx(high, abs=1e-6)
    assert low < 57 / 60 < high < 1


def test_a_perfect_score_has_an_upper_bound_of_one_and_a_lower_bound_below():
    result = evaluate.score_predictions(np.array([1, 0] * 10), np.array([0.9, 0.1] * 10), rule(0.5))
    assert result["accuracy"] == 1.0 and result["accuracy_high"] == pytest.approx(1.0)
    assert result["accuracy_low"] == pytest.approx(wilson_by_hand(20, 20)[0], abs=1e-6)


def test_auc_is_missing_not_zero_for_a_single_class():
    result = evaluate.score_predictions(np.array([1, 1]), np.array([0.9, 0.2]), rule(0.5))
    assert result["roc_auc"] is None
    assert result["accuracy"] == 0.5


def test_prediction_rows_list_every_photo_with_both_labels():
    outputs = np.float32([[0.2, 0.5], [0.1, 3.25], [0.75, 0.125]])  # probability, novelty
    rows = evaluate.prediction_rows(["a.jpg", "b.jpg", "c.jpg"], [1, 0, 0], outputs, rule(0.5))
    assert [list(row) for row in rows] == [evaluate.PREDICTION_FIELDS] * 3
    assert [(r["label"], r["predicted"], r["score"], r["novelty"]) for r in rows] == [
        ("dandelion", "grass", "0.200000", "0.5000"),
        ("grass", "grass", "0.100000", "3.2500"),
        ("grass", "dandelion", "0.750000", "0.1250"),
    ]


def test_generated_pictures_are_of_three_kinds_and_reproducible():
    pictures = evaluate.unlike_pictures(64)
    assert pictures.shape == (24, 64, 64, 3) and pictures.dtype == np.uint8
    np.testing.assert_array_equal(pictures, evaluate.unlike_pictures(64))
    noise, flat, text = pictures[:8], pictures[8:16], pictures[16:]
    assert noise.std(axis=(1, 2)).min() > 50  # noise everywhere
    assert flat.std(axis=(1, 2)).max() == 0  # one colour each
    assert (text == 255).mean() > 0.5 and (text < 128).any()  # dark text on white


def arrays(count: int, seed: int, prefix: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "images": rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
        "labels": np.arange(count) % 2,
        "paths": np.array([f"{prefix}/{i}.jpg" for i in range(count)], dtype=str),
    }


@pytest.fixture
def evaluated_workspace(tmp_path, mlflow_store):
    """A small Keras classifier with the contract's two outputs, exported for the keras engine,
    params.yaml's classes and threshold, and 8 test photos (mlflow_store: cwd is tmp_path)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    outputs = keras.layers.Concatenate()(
        [keras.layers.Dense(1, activation="sigmoid")(x), keras.layers.Dense(1, "softplus")(x)]
    )
    (tmp_path / "model").mkdir()
    keras.Model(inputs, outputs).save(tmp_path / "model" / MODEL_FILE)
    export_model(tmp_path / "model" / MODEL_FILE, tmp_path / "export", "keras")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"classes": list(CLASSES), "evaluate": {"threshold": 0.5}})
    )
    np.savez(tmp_path / "test.npz", **arrays(8, 0, "data/raw"))
    return tmp_path


def run_evaluate(production: dict[str, np.ndarray]) -> dict:
    np.savez("production_test.npz", **production)
    evaluate.main(["model", "export", "test.npz", "production_test.npz", "results"])
    return json.loads(Path("results/metrics.json").read_text())


def test_production_test_metrics_come_apart_and_leave_the_test_metrics_alone(
    evaluated_workspace,
):
    with_production = run_evaluate(arrays(6, 1, "data/reviewed"))
    test_predictions = Path("results", PREDICTIONS_FILE).read_bytes()
    production_file = Path("results", evaluate.PRODUCTION_PREDICTIONS_FILE)
    with open(production_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == [f"data/reviewed/{i}.jpg" for i in range(6)]
    production = with_production["production_test"]
    assert production["photos"] == 6
    correct = [row["predicted"] == row["label"] for row in rows]
    assert production["accuracy"] == pytest.approx(np.mean(correct))
    assert set(production) - {"photos"} == set(with_production["test"])

    without = run_evaluate(arrays(0, 2, "data/reviewed"))  # none reviewed (yet)
    assert set(without) == {"test", "unlike"}
    assert without["test"] == with_production["test"]
    assert Path("results", PREDICTIONS_FILE).read_bytes() == test_predictions
    assert not production_file.exists()
