"""Cross-validation of training recipes on the train and val photos (never the test split).

The photos are split into ``crossval.folds`` stratified folds, grouped by file hash so that
copies of one picture never sit on both sides. Each recipe is trained on k-1 folds and scored
on the held-out one. Recipes (all on the features stage's cached features):

- ``linear_probe``: logistic regression on the plain features; the reference floor.
- ``head``: the train stage's head with the train params (dropout, augmented views, early
  stopping on a stratified share of the training folds, as train stops on val).
- ``head_flip``: the same head, scoring each photo as the mean over it and its mirror image.
- ``head_smoothing``: the head with ``crossval.label_smoothing``.
- ``head_no_augment``: the head on the plain features only.
- ``fine_tune``: the head, then the top ``crossval.fine_tune_layers`` backbone layers
  fine-tuned end to end on the photos with augmentation (the train stage's phase 2, with
  ``crossval.fine_tune_*``); the only recipe that reads the images, and by far the slowest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.backbone import (
    assemble,
    build_augmentation,
    build_backbone,
    make_deterministic,
    unfreeze_top,
)
from pipeline.logs import dropped
from pipeline.params import CrossvalParams, FeaturesParams, ParamsError, TrainParams
from pipeline.training import (
    accuracy_at_even_odds,
    compile_for_training,
    early_stopping,
    fit_head,
    head_training_set,
)
from pipeline.weights import resolve_weights

POOLED_SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the recipes read besides the photos."""

    train: TrainParams  # the train stage's recipe
    crossval: CrossvalParams
    features: FeaturesParams  # the backbone the cached features came from
    stop_share: float  # of the training folds, held back for early stopping (split.val_ratio)


# A recipe: (the training folds' features, the setup) -> a scorer of held-out features, which
# are dicts as the features stage writes them.
Recipe = Callable[[dict, Setup], Callable[[dict], np.ndarray]]


def linear_probe(training: dict, setup: Setup):
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(training["plain"], training["labels"])
    return lambda held_out: model.predict_proba(held_out["plain"])[:, 1]


def subset(features: dict, rows: np.ndarray) -> dict:
    """The photos ``rows`` of a features dict (augmented views are indexed on axis 1)."""
    return {
        key: value[:, rows] if key == "augmented" else value[rows]
        for key, value in features.items()
    }


def fold_head(
    training: dict, setup: Setup, params: TrainParams, augmented: bool = True
) -> tuple[keras.Model, dict, dict]:
    """The train stage's head, stopped early on a stratified share of the training photos;
    with the photos it was fitted on and those it stopped on."""
    make_deterministic(params.seed)
    rows = np.arange(len(training["labels"]))
    inner_train, inner_val = train_test_split(
        rows, test_size=setup.stop_share, stratify=training["labels"], random_state=params.seed
    )
    fitting, validation = subset(training, inner_train), subset(training, inner_val)
    if not augmented:
        fitting["augmented"] = fitting["augmented"][:0]
    head, _ = fit_head(
        head_training_set(fitting),
        (validation["plain"], validation["labels"]),
        params,
        [early_stopping(params.patience)],
    )
    return head, fitting, validation


def head_scorer(training: dict, setup: Setup, params: TrainParams, augmented: bool = True):
    """A scorer of feature views by the fold's head."""
    head, _, _ = fold_head(training, setup, params, augmented)
    # Called directly, not predict(): one trace per fold instead of one per call shape.
    return lambda view: np.asarray(head(view, training=False)).ravel()


def head(training: dict, setup: Setup):
    score = head_scorer(training, setup, setup.train)
    return lambda held_out: score(held_out["plain"])


def head_flip(training: dict, setup: Setup):
    score = head_scorer(training, setup, setup.train)
    return lambda held_out: (score(held_out["plain"]) + score(held_out["flipped"])) / 2


def head_smoothing(training: dict, setup: Setup):
    smoothed = dataclasses.replace(setup.train, label_smoothing=setup.crossval.label_smoothing)
    score = head_scorer(training, setup, smoothed)
    return lambda held_out: score(held_out["plain"])


def head_no_augment(training: dict, setup: Setup):
    score = head_scorer(training, setup, setup.train, augmented=False)
    return lambda held_out: score(held_out["plain"])


def fine_tune(training: dict, setup: Setup):
    """Head on the frozen features, then the backbone's top layers on the photos."""
    make_deterministic(setup.features.seed)  # the backbone the features came from
    backbone = build_backbone(training["images"].shape[1], resolve_weights(setup.features.weights))
    head, fitting, validation = fold_head(training, setup, setup.train)
    unfreeze_top(backbone, setup.crossval.fine_tune_layers)
    trainer = assemble(backbone, head, build_augmentation(setup.train.seed))
    compile_for_training(
        trainer, setup.crossval.fine_tune_learning_rate, setup.train.label_smoothing
    )
    trainer.fit(
        fitting["images"],
        fitting["labels"],
        validation_data=(validation["images"], validation["labels"]),
        epochs=setup.crossval.fine_tune_epochs,
        batch_size=setup.train.batch_size,
        callbacks=[early_stopping(setup.train.patience)],
        verbose=0,
    )
    classifier = assemble(backbone, head)
    return lambda held_out: classifier.predict(held_out["images"], verbose=0).ravel()


RECIPES: dict[str, Recipe] = {
    recipe.__name__: recipe
    for recipe in (linear_probe, head, head_flip, head_smoothing, head_no_augment, fine_tune)
}
IMAGE_RECIPES = {"fine_tune"}  # the others need only the cached features


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


def check_recipes(params: CrossvalParams) -> None:
    unknown = sorted(set(params.recipes) - set(RECIPES))
    if unknown:
        raise ParamsError(f"crossval.recipes: unknown {unknown}; choose from {sorted(RECIPES)}")
    if params.noise_recipe not in params.recipes:
        raise ParamsError(
            f"crossval.noise_recipe {params.noise_recipe!r} is not in crossval.recipes"
        )


def retracing_expected() -> contextlib.AbstractContextManager:
    """Drop TensorFlow's "excessive retracing" warning, and only that one. Each fold's
    fine-tuned model has its own predict function, traced on its first call; TensorFlow counts
    those traces together and warns by the third fold: one trace per fold is expected here."""
    return dropped("tensorflow", lambda r: "triggered tf.function retracing" in r.getMessage())


def cross_validate(
    photos: dict, groups: list[str], setup: Setup, log=print
) -> tuple[dict, dict[str, np.ndarray]]:
    """Per recipe of ``crossval.recipes``: fold accuracies, mean and sd; and its out-of-fold
    scores per photo."""
    check_recipes(setup.crossval)
    held_out_rows = folds(photos["labels"], groups, setup.crossval.folds, setup.crossval.seed)
    every_row = np.arange(len(photos["labels"]))
    metrics, out_of_fold = {}, {}
    for name in setup.crossval.recipes:
        scores = np.full(len(every_row), np.nan)
        accuracies = []
        for fold, held_out in enumerate(held_out_rows, 1):
            started = time.perf_counter()
            training = subset(photos, np.setdiff1d(every_row, held_out))
            keras.backend.clear_session()
            with retracing_expected():
                scorer = RECIPES[name](training, setup)
                scores[held_out] = scorer(subset(photos, held_out))
            accuracies.append(accuracy_at_even_odds(photos["labels"][held_out], scores[held_out]))
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
