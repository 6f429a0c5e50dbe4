"""Cross-validation: which training recipe generalises, measured without the test split.

Opt-in (``dvc repro crossval/dvc.yaml``), separate from the pipeline that builds the served
model. The train and val photos are pooled and split into ``crossval.folds`` stratified folds,
grouped by file hash so that copies of one picture never sit on both sides. Each recipe in
``crossval.recipes`` is trained on k-1 folds and scored on the held-out one; the metrics file
gives every recipe's fold accuracies, mean and standard deviation. The test split is never
read here: it stays the final, single check of the chosen model.

Recipes (all on the features stage's cached features):

- ``linear_probe``: logistic regression on the plain features; the reference floor.
- ``head``: the train stage's head with the train params (dropout, augmented views, early
  stopping on a stratified 15 % of the training folds, as train stops on val).
- ``head_flip``: the same head, scoring each photo as the mean over it and its mirror image.
- ``head_smoothing``: the head with ``crossval.label_smoothing``.
- ``head_no_augment``: the head on the plain features only.
- ``fine_tune``: the head, then the top ``crossval.fine_tune_layers`` backbone layers
  fine-tuned end to end on the photos with augmentation (the train stage's phase 2, with
  ``crossval.fine_tune_*``); the only recipe that reads the images, and by far the slowest.

The out-of-fold scores of ``crossval.noise_recipe`` become the label-noise report: every
photo whose score for the other class is at least ``crossval.noise_confidence``, as a CSV and
a contact sheet to review. Nothing is dropped automatically: a reviewed exclusion goes into
the catalogue, in Git, with its reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
from PIL import Image, ImageDraw
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stages.backbone import (
    assemble,
    build_augmentation,
    build_backbone,
    exits_in_one_line_without_weights,
    make_deterministic,
    resolve_weights,
)
from stages.logs import summarised
from stages.params import load_params
from stages.split import read_split
from stages.train import compile_for_training, fit_head, head_training_set

POOLED_SPLITS = ("train", "val")
THUMBNAIL = 200

# A recipe: (the training folds' features, train params, crossval params) -> a scorer of the
# held-out fold's features. Features are dicts as the features stage writes them.
Recipe = Callable[[dict, dict, dict], Callable[[dict], np.ndarray]]


def linear_probe(training: dict, train_params: dict, params: dict):
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(training["plain"], training["labels"])
    return lambda held_out: model.predict_proba(held_out["plain"])[:, 1]


def inner_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows to fit on, and a stratified 15 % to stop early on (as train stops on val)."""
    rows = np.arange(len(labels))
    return train_test_split(rows, test_size=0.15, stratify=labels, random_state=seed)


def fold_head(
    training: dict, train_params: dict, augmented: bool = True
) -> tuple[keras.Model, dict, dict]:
    """The train stage's head, stopped early on a stratified 15 % of the training photos;
    with the photos it was fitted on and those it stopped on."""
    make_deterministic(train_params["seed"])
    inner_train, inner_val = inner_split(training["labels"], train_params["seed"])
    fitting, validation = subset(training, inner_train), subset(training, inner_val)
    if not augmented:
        fitting["augmented"] = fitting["augmented"][:0]
    head, _ = fit_head(
        head_training_set(fitting),
        (validation["plain"], validation["labels"]),
        train_params,
        [early_stopping(train_params)],
    )
    return head, fitting, validation


def early_stopping(train_params: dict) -> keras.callbacks.EarlyStopping:
    """As the train stage stops: on validation loss, back to the best epoch's weights."""
    return keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=train_params["patience"], restore_best_weights=True
    )


def _head(training: dict, train_params: dict, augmented: bool = True):
    """A scorer of feature views by the fold's head."""
    head, _, _ = fold_head(training, train_params, augmented)
    # Called directly, not predict(): one trace per fold instead of one per call shape.
    return lambda view: np.asarray(head(view, training=False)).ravel()


def head(training: dict, train_params: dict, params: dict):
    score = _head(training, train_params)
    return lambda held_out: score(held_out["plain"])


def head_flip(training: dict, train_params: dict, params: dict):
    score = _head(training, train_params)
    return lambda held_out: (score(held_out["plain"]) + score(held_out["flipped"])) / 2


def head_smoothing(training: dict, train_params: dict, params: dict):
    score = _head(training, dict(train_params, label_smoothing=params["label_smoothing"]))
    return lambda held_out: score(held_out["plain"])


def head_no_augment(training: dict, train_params: dict, params: dict):
    score = _head(training, train_params, augmented=False)
    return lambda held_out: score(held_out["plain"])


# Each fold's fine-tuned model has its own predict function, traced on its first call, and
# TensorFlow counts those traces together and warns about "excessive retracing" by the third
# fold: expected here (one trace per fold), so only that message is dropped.
logging.getLogger("tensorflow").addFilter(
    lambda record: "triggered tf.function retracing" not in record.getMessage()
)


def fine_tune(training: dict, train_params: dict, params: dict):
    """Head on the frozen features, then the backbone's top layers on the photos."""
    make_deterministic(params["backbone"]["seed"])  # the backbone the features came from
    backbone = build_backbone(
        training["images"].shape[1], resolve_weights(params["backbone"]["weights"])
    )
    head, fitting, validation = fold_head(training, train_params)
    backbone.trainable = True
    for layer in backbone.layers[: -params["fine_tune_layers"]]:
        layer.trainable = False
    trainer = assemble(backbone, head, build_augmentation(train_params["seed"]))
    compile_for_training(
        trainer, params["fine_tune_learning_rate"], train_params["label_smoothing"]
    )
    trainer.fit(
        fitting["images"],
        fitting["labels"],
        validation_data=(validation["images"], validation["labels"]),
        epochs=params["fine_tune_epochs"],
        batch_size=train_params["batch_size"],
        callbacks=[early_stopping(train_params)],
        verbose=0,
    )
    classifier = assemble(backbone, head)
    return lambda held_out: classifier.predict(held_out["images"], verbose=0).ravel()


RECIPES: dict[str, Recipe] = {
    recipe.__name__: recipe
    for recipe in (linear_probe, head, head_flip, head_smoothing, head_no_augment, fine_tune)
}
IMAGE_RECIPES = {"fine_tune"}  # the others need only the cached features


def subset(features: dict, rows: np.ndarray) -> dict:
    """The photos ``rows`` of a features dict (augmented views are indexed on axis 1)."""
    return {
        key: value[:, rows] if key == "augmented" else value[rows]
        for key, value in features.items()
    }


def pooled(features: dict[str, dict]) -> dict:
    """The train and val splits' features as one set of photos."""
    return {
        key: np.concatenate(
            [features[split][key] for split in POOLED_SPLITS], axis=1 if key == "augmented" else 0
        )
        for key in features[POOLED_SPLITS[0]]
    }


def folds(labels: np.ndarray, groups: list[str], count: int, seed: int) -> list[np.ndarray]:
    """Held-out rows of each fold: stratified by label, copies (same hash) kept together."""
    splitter = StratifiedGroupKFold(n_splits=count, shuffle=True, random_state=seed)
    return [held_out for _, held_out in splitter.split(labels, labels, groups)]


def check_recipes(recipes: list[str], noise_recipe: str | None = None) -> None:
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise ValueError(f"crossval.recipes: unknown {unknown}; choose from {sorted(RECIPES)}")
    if noise_recipe is not None and noise_recipe not in recipes:
        raise ValueError(f"crossval.noise_recipe {noise_recipe!r} is not in crossval.recipes")


def cross_validate(
    photos: dict, groups: list[str], recipes: list[str], train_params: dict, params: dict, log=print
) -> tuple[dict, dict[str, np.ndarray]]:
    """Per recipe: fold accuracies, mean and sd; and its out-of-fold scores per photo."""
    check_recipes(recipes)
    held_out_rows = folds(photos["labels"], groups, params["folds"], params["seed"])
    every_row = np.arange(len(photos["labels"]))
    metrics, out_of_fold = {}, {}
    for name in recipes:
        scores = np.full(len(every_row), np.nan)
        accuracies = []
        for fold, held_out in enumerate(held_out_rows, 1):
            started = time.perf_counter()
            training = subset(photos, np.setdiff1d(every_row, held_out))
            keras.backend.clear_session()
            scorer = RECIPES[name](training, train_params, params)
            scores[held_out] = scorer(subset(photos, held_out))
            predicted = scores[held_out] >= 0.5
            accuracies.append(float(np.mean(predicted == photos["labels"][held_out])))
            log(
                f"crossval: {name}: fold {fold}/{len(held_out_rows)}: accuracy "
                f"{accuracies[-1]:.4f} ({time.perf_counter() - started:.1f} s)"
            )
        metrics[name] = {
            "accuracy": float(np.mean(accuracies)),
            "accuracy_sd": float(np.std(accuracies, ddof=1)),
            "fold_accuracies": accuracies,
        }
        out_of_fold[name] = scores
        log(
            f"crossval: {name}: accuracy {np.mean(accuracies):.4f} "
            f"+- {np.std(accuracies, ddof=1):.4f} over {len(accuracies)} folds"
        )
    return metrics, out_of_fold


def confident_contradictions(
    labels: np.ndarray, scores: np.ndarray, confidence: float
) -> np.ndarray:
    """Rows whose out-of-fold score gives the other class at least ``confidence``."""
    other_class_probability = np.where(labels == 1, 1 - scores, scores)
    rows = np.flatnonzero(other_class_probability >= confidence)
    return rows[np.argsort(-other_class_probability[rows], kind="stable")]


def contact_sheet(images: list[np.ndarray], captions: list[str], columns: int = 4) -> Image.Image:
    """Thumbnails in a grid, each with its caption underneath."""
    rows = max(1, -(-len(images) // columns))
    cell_height = THUMBNAIL + 34
    sheet = Image.new("RGB", (columns * THUMBNAIL, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (index % columns) * THUMBNAIL, (index // columns) * cell_height
        sheet.paste(Image.fromarray(pixels).resize((THUMBNAIL, THUMBNAIL)), (x, y))
        draw.multiline_text((x + 4, y + THUMBNAIL + 2), caption, fill="black", spacing=2)
    return sheet


def write_noise_report(
    out_dir: Path, photos: dict, images: np.ndarray, rows: np.ndarray, scores, classes, recipe
) -> None:
    fields = ["path", "label", "recipe", "score", "other_class_probability"]
    with open(out_dir / "label_noise.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            label = int(photos["labels"][row])
            writer.writerow(
                {
                    "path": str(photos["paths"][row]),
                    "label": classes[label],
                    "recipe": recipe,
                    "score": f"{scores[row]:.4f}",
                    "other_class_probability": f"{(1 - scores[row] if label else scores[row]):.4f}",
                }
            )
    captions = [
        f"{Path(str(photos['paths'][row])).name}: {classes[int(photos['labels'][row])]}\n"
        f"P({classes[1]}) {scores[row]:.3f}"
        for row in rows
    ]
    contact_sheet([images[row] for row in rows], captions).save(
        out_dir / "label_noise.png", optimize=False
    )


@summarised("crossval")
@exits_in_one_line_without_weights("crossval")
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("split_csv", type=Path, help="split stage output (file hashes)")
    parser.add_argument("arrays_dir", type=Path, help="preprocess stage output (thumbnails)")
    parser.add_argument("features_dir", type=Path, help="features stage output")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    all_params = load_params()
    params, train_params = all_params["crossval"], all_params["train"]
    recipe = params["noise_recipe"]
    check_recipes(params["recipes"], recipe)  # before minutes of work, not after
    features = {s: dict(np.load(args.features_dir / f"{s}.npz")) for s in POOLED_SPLITS}
    photos = pooled(features)
    hashes = {row.path: row.sha256 for row in read_split(args.split_csv)}
    groups = [hashes[str(path)] for path in photos["paths"]]
    images = np.concatenate(
        [np.load(args.arrays_dir / f"{s}.npz")["images"] for s in POOLED_SPLITS]
    )
    if IMAGE_RECIPES & set(params["recipes"]):
        photos["images"] = images
    params = dict(params, backbone=all_params["features"])

    metrics, out_of_fold = cross_validate(
        photos,
        groups,
        params["recipes"],
        train_params,
        params,
        log=lambda line: print(line, flush=True),
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    rows = confident_contradictions(
        photos["labels"], out_of_fold[recipe], params["noise_confidence"]
    )
    write_noise_report(
        args.out_dir, photos, images, rows, out_of_fold[recipe], all_params["classes"], recipe
    )
    return (
        f"{len(params['recipes'])} recipes x {params['folds']} folds; {len(rows)} of "
        f"{len(images)} photos contradicted at >= {params['noise_confidence']} by {recipe} "
        f"-> {args.out_dir}"
    )


if __name__ == "__main__":
    main()
