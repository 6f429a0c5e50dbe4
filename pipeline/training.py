"""MobileNetV2 transfer learning: a head on the cached features, optional fine-tuning, novelty.

1. Frozen backbone: a new head is trained on the features stage's cached features (each
   training photo plus its augmented views). This is the same model as running the frozen
   backbone inside every epoch, and it trains in seconds.
2. Optional fine-tuning of the top ``fine_tune_layers`` backbone layers end to end, with
   augmentation in the model and a small learning rate (Keras' transfer-learning recipe).
3. Novelty (pipeline/novelty.py), computed by the saved model beside the probability.
"""

from __future__ import annotations

import time

import keras
import mlflow
import numpy as np
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from pipeline.backbone import (
    assemble,
    build_augmentation,
    build_backbone,
    make_deterministic,
    probe_extractor,
    unfreeze_top,
)
from pipeline.novelty import novelty_projection, with_novelty
from pipeline.params import FeaturesParams, TrainParams
from pipeline.weights import resolve_weights
from serving.contract import PROBABILITY

# P(positive) at which both classes are equally likely. Training's and cross-validation's
# accuracies count a photo as positive from here, as Keras' own accuracy metric does; what is
# served and evaluated decides at evaluate.threshold instead (serving/contract.py DecisionRule).
EVEN_ODDS = 0.5


def accuracy_at_even_odds(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(np.mean((np.asarray(scores) >= EVEN_ODDS) == labels))


def build_head(feature_size: int, dropout: float) -> keras.Model:
    """Dropout and one sigmoid unit on the backbone's pooled features."""
    inputs = keras.Input((feature_size,))
    hidden = keras.layers.Dropout(dropout)(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(hidden)
    return keras.Model(inputs, outputs, name="head")


class LiveMetrics(DVCLiveCallback):
    """dvclive's Keras callback, naming validation metrics ``val/...`` (dvclive says
    ``eval/...``) so that they cannot be mistaken for evaluate's ``test/...`` metrics."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None):
        for metric, value in (logs or {}).items():
            split, name = ("val", metric[4:]) if metric.startswith("val_") else ("train", metric)
            self.live.log_metric(f"{split}/{name}", value)
        self.live.next_step()


class EpochLines(keras.callbacks.Callback):
    """One line per epoch with its metrics (Keras' ``verbose=2`` prints two)."""

    def __init__(self, log=print):
        super().__init__()
        self.log = log

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items())
        self.log(
            f"train: epoch {epoch + 1}/{self.params['epochs']}: {metrics} "
            f"({time.perf_counter() - self.started:.1f} s)"
        )


def early_stopping(patience: int) -> keras.callbacks.EarlyStopping:
    """Stop on validation loss, back to the best epoch's weights. Keras resets it at the start
    of every fit, and numbers epochs across fits."""
    return keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=patience, restore_best_weights=True
    )


def compile_for_training(model: keras.Model, learning_rate: float, label_smoothing: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
    )


# How many val photos the backbone recomputes to check the cached features. Another backbone
# (weights, seed, image size) or stale features differ on every photo, so a few tell as surely
# as all of them.
CHECKED_PHOTOS = 8


def check_features(extractor: keras.Model, images: np.ndarray, cached: np.ndarray) -> None:
    """Refuse to train a head on features this backbone does not compute, by recomputing
    those of the first ``CHECKED_PHOTOS`` photos."""
    images, cached = images[:CHECKED_PHOTOS], cached[:CHECKED_PHOTOS]
    computed = extractor.predict(images, verbose=0)
    # Relative to the features' scale: a random-init backbone's features are tiny.
    tolerance = 1e-4 * float(np.abs(cached).max(initial=0.0))
    if computed.shape != cached.shape or np.abs(computed - cached).max() > tolerance:
        raise ValueError(
            "the cached features were not computed by this backbone: rerun the features "
            "stage (`dvc repro`)"
        )


def head_training_set(features: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's plain features plus its augmented views, and the labels repeated."""
    views = np.concatenate([features["plain"][np.newaxis], features["augmented"]])
    return views.reshape(-1, views.shape[-1]), np.tile(features["labels"], len(views))


def fit_head(
    training: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    params: TrainParams,
    callbacks: list,
) -> tuple[keras.Model, keras.callbacks.History]:
    """A new head fitted on ``(features, labels)``; ``callbacks`` stop it early on validation
    (and print progress: Keras' own is off)."""
    head = build_head(training[0].shape[1], params.dropout)
    compile_for_training(head, params.learning_rate, params.label_smoothing)
    history = head.fit(
        *training,
        validation_data=validation,
        epochs=params.epochs,
        batch_size=params.batch_size,
        callbacks=callbacks,
        verbose=0,
    )
    return head, history


def train_classifier(
    images: dict[str, dict],
    features: dict[str, dict],
    params: TrainParams,
    backbone_params: FeaturesParams,
    live: Live,
) -> tuple[keras.Model, dict]:
    """Train on the ``train`` split, stop early on ``val``; return the model and a summary.

    ``images``: the preprocess stage's arrays per split (``images``, ``labels``);
    ``features``: the features stage's, computed with ``backbone_params``.
    """
    train, val = images["train"], images["val"]
    make_deterministic(backbone_params.seed)  # as the features stage built it
    backbone = build_backbone(train["images"].shape[1], resolve_weights(backbone_params.weights))
    backbone.trainable = False
    check_features(assemble(backbone), val["images"], features["val"]["plain"])
    make_deterministic(params.seed)
    augmentation = build_augmentation(params.seed)

    stop = early_stopping(params.patience)
    callbacks = [stop, LiveMetrics(live=live), EpochLines(log=lambda line: print(line, flush=True))]
    head, history = fit_head(
        head_training_set(features["train"]),
        (features["val"]["plain"], val["labels"]),
        params,
        callbacks,
    )
    epochs_run = len(history.epoch)

    if params.fine_tune_layers > 0:
        unfreeze_top(backbone, params.fine_tune_layers)
        trainer = assemble(backbone, head, augmentation)
        compile_for_training(trainer, params.fine_tune_learning_rate, params.label_smoothing)
        # A nested MLflow run: the fine-tuning fit logs its own optimizer settings.
        with mlflow.start_run(run_name="fine-tune", nested=True):
            history = trainer.fit(
                train["images"],
                train["labels"],
                validation_data=(val["images"], val["labels"]),
                initial_epoch=epochs_run,
                epochs=epochs_run + params.fine_tune_epochs,
                batch_size=params.batch_size,
                callbacks=callbacks,
                verbose=0,
            )
        epochs_run += len(history.epoch)

    layers = backbone_params.novelty_layers
    if params.fine_tune_layers > 0:  # the cached probes are the frozen backbone's
        probes = probe_extractor(backbone, layers)
        train_probes, val_probes = (
            probes.predict(split["images"], batch_size=params.batch_size, verbose=0)[1]
            for split in (train, val)
        )
    else:
        train_probes, val_probes = features["train"]["probes"], features["val"]["probes"]
    projection = novelty_projection(train_probes, val_probes, params.neither_quantile)
    classifier = with_novelty(backbone, head, projection, layers)
    # Scored without compile(): the saved model then carries no optimizer state.
    val_scores = classifier.predict(val["images"], batch_size=params.batch_size, verbose=0)[
        :, PROBABILITY
    ]
    summary = {
        "best/epoch": stop.best_epoch + 1,  # 1-based: the epoch whose weights the model holds
        "best/val_loss": float(keras.losses.BinaryCrossentropy()(val["labels"], val_scores)),
        "best/val_accuracy": accuracy_at_even_odds(val["labels"], val_scores),
        "epochs_run": epochs_run,
    }
    return classifier, summary
