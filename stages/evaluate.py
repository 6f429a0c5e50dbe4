"""Evaluate stage: score the trained classifier on the held-out test split, and on the
production test split when it holds any photo.

Writes the metrics (``test/accuracy`` with its 95 % interval, precision, recall, F1, ROC AUC,
and the share predicted positive with its 95 % interval; the positive class is
``classes[1]``; the share of test photos flagged "neither", false alarms all, and of generated
pictures that are neither class, ``unlike/neither_share``), the confusion matrix and ROC curve
as dvclive plots, and every test photo's score and predicted label (``predictions.csv``).
Labels come from the contract's decision rule at ``evaluate.threshold``, the rule the
packaged service applies too. The scores come from the export stage's model through
``serving.engines.load_engine``, exactly as the service loads it. The metrics are also added
to the MLflow run that trained the model.

The production test split holds reviewed photos from feedback (stages/split.py); it grows as
photos are accepted, so its metrics are reported apart, under ``production_test/`` with its
``photos`` count, and its scores in ``production_test_predictions.csv``: both are absent
while it is empty. The ``test/`` metrics stay those of the same original photos.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import mlflow
import numpy as np
from dvclive import Live
from PIL import Image, ImageDraw, ImageFont
from sklearn import metrics

from pipeline.hashing import file_sha256
from pipeline.intervals import wilson
from pipeline.logs import import_tensorflow_quietly
from pipeline.params import EvaluateParams, classes
from pipeline.splits import PRODUCTION_TEST, TEST
from pipeline.stage import arguments, summarised
from pipeline.tracking import training_run, use_project_store
from serving.contract import MODEL_FILE, NOVELTY, PREDICTIONS_FILE, PROBABILITY, DecisionRule
from serving.engines import engine_of, load_engine
from serving.settings import MAX_BATCH_SIZE


def score_predictions(labels: np.ndarray, scores: np.ndarray, rule: DecisionRule) -> dict:
    """Binary classification metrics for ``scores`` = P(class 1).

    ``positive_share`` is the share of photos predicted ``classes[1]``, and ``accuracy`` the
    share predicted right, each with its 95 % Wilson interval (``_low``, ``_high``): the range
    live traffic like the test split should stay in. The service exposes both intervals, and
    alerts fire when live answers leave the share's, or when the accuracy that feedback
    measures falls below the accuracy's lower bound.
    """
    predicted = rule.predict(scores)
    share = wilson(int(predicted.sum()), len(predicted))
    accuracy = wilson(int((predicted == np.asarray(labels)).sum()), len(predicted))
    return {
        "accuracy": metrics.accuracy_score(labels, predicted),
        "accuracy_low": float(accuracy.low),
        "accuracy_high": float(accuracy.high),
        "precision": metrics.precision_score(labels, predicted, zero_division=0),
        "recall": metrics.recall_score(labels, predicted, zero_division=0),
        "f1": metrics.f1_score(labels, predicted, zero_division=0),
        # AUC is undefined on a single-class test set; report it as missing, not as 0.
        "roc_auc": metrics.roc_auc_score(labels, scores) if len(set(labels)) == 2 else None,
        "positive_share": float(predicted.mean()),
        "positive_share_low": float(share.low),
        "positive_share_high": float(share.high),
    }


PREDICTION_FIELDS = ["path", "label", "predicted", "score", "novelty"]
PRODUCTION_PREDICTIONS_FILE = f"{PRODUCTION_TEST}_{PREDICTIONS_FILE}"


def unlike_pictures(size: int, seed: int = 0) -> np.ndarray:
    """Pictures that are neither class: 8 of random noise, 8 flat colours, 8 of text on white."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    colours = rng.integers(0, 256, (8, 1, 1, 3), dtype=np.uint8)
    flat = np.broadcast_to(colours, (8, size, size, 3))
    texts = []
    for index in range(8):
        page = Image.new("RGB", (size, size), "white")
        font = ImageFont.load_default(size=12 + 4 * index)
        words = " ".join(rng.choice(["report", "invoice", "total", "2026", "page", "note"], 20))
        ImageDraw.Draw(page).multiline_text((4, 4), words.replace(" ", "\n", 6), "black", font)
        texts.append(np.asarray(page))
    return np.concatenate([noise, flat, np.stack(texts)])


def score_in_chunks(score, images: np.ndarray) -> np.ndarray:
    """The engine's outputs, in batches as large as the service's engine calls at most get."""
    size = MAX_BATCH_SIZE
    return np.concatenate([score(images[i : i + size]) for i in range(0, len(images), size)])


def prediction_rows(paths, labels, outputs, rule: DecisionRule) -> list[dict]:
    """One row per photo: its file, true label, predicted label, score (P(classes[1])) and
    novelty (above 1: probably neither class)."""
    scores = outputs[:, PROBABILITY]
    return [
        {
            "path": str(path),
            "label": rule.classes[label],
            "predicted": rule.classes[predicted],
            "score": f"{float(score):.6f}",
            "novelty": f"{float(novelty):.4f}",
        }
        for path, label, predicted, score, novelty in zip(
            paths, labels, rule.predict(scores), scores, outputs[:, NOVELTY], strict=True
        )
    ]


def log_to_training_run(model_file: Path, metrics_by_split: dict[str, dict]) -> None:
    """Add the metrics (``<split>_<name>``) to the MLflow run that trained the model, if it is
    in the store."""
    use_project_store()
    run = training_run(file_sha256(model_file))
    if run is None:
        # The model may come from a DVC cache whose MLflow store is not on this machine.
        print(f"evaluate: no MLflow run trained {model_file}; metrics not logged", file=sys.stderr)
        return
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_metrics(
            {
                f"{split}_{k}": v
                for split, split_metrics in metrics_by_split.items()
                for k, v in split_metrics.items()
                if v is not None
            }
        )


def evaluate_split(score, arrays, rule: DecisionRule) -> tuple[dict, np.ndarray]:
    """The metrics of one split's photos (``neither_share`` included) and the engine's outputs."""
    outputs = score_in_chunks(score, arrays["images"])
    split_metrics = score_predictions(arrays["labels"], outputs[:, PROBABILITY], rule)
    split_metrics["neither_share"] = float(rule.neither(outputs[:, NOVELTY]).mean())
    return split_metrics, outputs


def write_predictions(path: Path, arrays, outputs: np.ndarray, rule: DecisionRule) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PREDICTION_FIELDS)
        writer.writeheader()
        writer.writerows(prediction_rows(arrays["paths"], arrays["labels"], outputs, rule))


def described(split: str, split_metrics: dict) -> str:
    return f"{split} " + ", ".join(
        f"{name} {value:.3f}" for name, value in split_metrics.items() if value is not None
    )


@summarised("evaluate")
def main(argv: list[str] | None = None) -> str:
    args = arguments(
        argv, __doc__, "model_dir", "export_dir", "test_npz", "production_test_npz", "live_dir"
    )
    rule = DecisionRule(tuple(classes()), EvaluateParams.load().threshold)
    if engine_of(args.export_dir) == "keras":
        import_tensorflow_quietly()
    test, production = np.load(args.test_npz), np.load(args.production_test_npz)
    model_file = args.model_dir / MODEL_FILE
    score = load_engine(args.export_dir)
    test_metrics, outputs = evaluate_split(score, test, rule)
    scores, labels = outputs[:, PROBABILITY], test["labels"]
    unlike = score_in_chunks(score, unlike_pictures(test["images"].shape[1]))
    unlike_share = float(rule.neither(unlike[:, NOVELTY]).mean())
    metrics_by_split = {TEST: test_metrics}
    if len(production["labels"]):
        production_metrics, production_outputs = evaluate_split(score, production, rule)
        metrics_by_split[PRODUCTION_TEST] = {"photos": len(production["labels"])}
        metrics_by_split[PRODUCTION_TEST].update(production_metrics)

    with Live(str(args.live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        for split, split_metrics in metrics_by_split.items():
            for name, value in split_metrics.items():
                if value is not None:
                    live.log_metric(f"{split}/{name}", value, plot=False)
        live.log_metric("unlike/neither_share", unlike_share, plot=False)
        live.log_sklearn_plot(
            "confusion_matrix",
            [rule.classes[i] for i in labels],
            [rule.classes[i] for i in rule.predict(scores)],
            name="confusion_matrix.json",
        )
        live.log_sklearn_plot("roc", labels, scores, name="roc.json")

    write_predictions(args.live_dir / PREDICTIONS_FILE, test, outputs, rule)
    production_file = args.live_dir / PRODUCTION_PREDICTIONS_FILE
    if PRODUCTION_TEST in metrics_by_split:
        write_predictions(production_file, production, production_outputs, rule)
    else:
        production_file.unlink(missing_ok=True)  # from an earlier run with reviewed photos

    log_to_training_run(model_file, metrics_by_split)
    return (
        described(TEST, test_metrics)
        + f"; generated pictures flagged neither: {unlike_share:.3f}"
        + "".join(f"; {described(s, m)}" for s, m in metrics_by_split.items() if s != TEST)
        + f" -> {args.live_dir}"
    )


if __name__ == "__main__":
    main()
