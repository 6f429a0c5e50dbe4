"""Evaluate stage: score the trained classifier on the held-out test split.

Writes the metrics (accuracy, precision, recall, F1, ROC AUC; the positive class is
``classes[1]``), the confusion matrix and ROC curve as dvclive plots, and the list of
misclassified files with their scores. The metrics are also added to the training run
in MLflow.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
from dvclive import Live
from sklearn import metrics

from stages.params import load_params
from stages.tracking import use_project_store
from stages.train import MODEL_FILE, RUN_FILE

MISCLASSIFIED_FILE = "misclassified.csv"


def score_predictions(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Binary classification metrics for ``scores`` = P(class 1)."""
    predicted = (scores >= threshold).astype(int)
    return {
        "accuracy": metrics.accuracy_score(labels, predicted),
        "precision": metrics.precision_score(labels, predicted, zero_division=0),
        "recall": metrics.recall_score(labels, predicted, zero_division=0),
        "f1": metrics.f1_score(labels, predicted, zero_division=0),
        # AUC is undefined on a single-class test set; report it as missing, not as 0.
        "roc_auc": metrics.roc_auc_score(labels, scores) if len(set(labels)) == 2 else None,
    }


def misclassified_rows(paths, labels, scores, classes: list[str], threshold: float) -> list[dict]:
    rows = []
    for path, label, score in zip(paths, labels, scores, strict=True):
        predicted = int(score >= threshold)
        if predicted != label:
            rows.append(
                {
                    "path": str(path),
                    "label": classes[label],
                    "predicted": classes[predicted],
                    "score": round(float(score), 6),
                }
            )
    return rows


def log_to_training_run(model_dir: Path, test_metrics: dict) -> None:
    """Add the test metrics to the MLflow run that trained the model, if that run exists."""
    run_id = json.loads((model_dir / RUN_FILE).read_text())["run_id"]
    use_project_store()
    try:
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"test_{k}": v for k, v in test_metrics.items() if v is not None})
    except mlflow.exceptions.MlflowException as exc:
        # The model may come from a DVC cache whose MLflow store is not on this machine.
        print(f"evaluate: not logged to MLflow run {run_id}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("test_npz", type=Path)
    parser.add_argument("live_dir", type=Path, help="dvclive metrics and plots")
    args = parser.parse_args(argv)

    params = load_params()
    classes, threshold = params["classes"], params["evaluate"]["threshold"]
    test = np.load(args.test_npz)
    model = keras.models.load_model(args.model_dir / MODEL_FILE, compile=False)
    scores = model.predict(test["images"], batch_size=32, verbose=0).ravel()
    labels = test["labels"]
    test_metrics = score_predictions(labels, scores, threshold)

    with Live(str(args.live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        for name, value in test_metrics.items():
            if value is not None:
                live.log_metric(name, value, plot=False)
        predicted = (scores >= threshold).astype(int)
        live.log_sklearn_plot(
            "confusion_matrix",
            [classes[i] for i in labels],
            [classes[i] for i in predicted],
            name="confusion_matrix.json",
        )
        live.log_sklearn_plot("roc", labels, scores, name="roc.json")

    with open(args.live_dir / MISCLASSIFIED_FILE, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "predicted", "score"])
        writer.writeheader()
        writer.writerows(misclassified_rows(test["paths"], labels, scores, classes, threshold))

    log_to_training_run(args.model_dir, test_metrics)
    print(
        "evaluate: "
        + ", ".join(
            f"{name} {value:.3f}" for name, value in test_metrics.items() if value is not None
        )
    )


if __name__ == "__main__":
    main()
