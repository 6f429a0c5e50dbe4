"""Train stage: MobileNetV2 transfer learning in two phases.

1. Frozen backbone: the new head is trained on the features stage's cached features (each
   training photo plus ``features.augment_copies`` augmented views). This is the same model
   as running the frozen backbone inside every epoch, and it reruns in seconds.
2. Optional fine-tuning of the top ``fine_tune_layers`` backbone layers end to end, with
   augmentation in the model and a small learning rate (Keras' transfer-learning recipe).
3. Novelty: how far a photo's mid-level backbone activations (``features.novelty_layers``,
   pooled) lie from the training photos' (squared Mahalanobis distance, Ledoit-Wolf
   covariance), in units of a threshold that keeps ``neither_quantile`` of the val photos
   below it. The saved model outputs it beside the
   probability (serving/contract.py ``NOVELTY``), so the service can say "probably neither".

Per-epoch metrics go to dvclive (learning curves for ``dvc plots``) and the run (params,
metrics, model) to MLflow. The model directory holds the model alone: the MLflow run finds
it by the model file's SHA-256 (tag ``model_sha256``), so no run id enters a DVC output.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback
from sklearn.covariance import LedoitWolf

from serving.contract import MODEL_FILE, MODEL_SHA256_TAG, PROBABILITY, sha256_of
from stages.backbone import (
    assemble,
    build_augmentation,
    build_backbone,
    exits_in_one_line_without_weights,
    features_and_probes,
    make_deterministic,
    probe_extractor,
    resolve_weights,
)
from stages.logs import summarised
from stages.params import load_params
from stages.tracking import use_project_store

# Stated rather than inferred: MLflow's inference re-imports the model in a subprocess.
SERVING_REQUIREMENTS = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"]


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


def compile_for_training(model: keras.Model, learning_rate: float, label_smoothing: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
    )


def check_features(extractor: keras.Model, images: np.ndarray, cached: np.ndarray) -> None:
    """Refuse to train a head on features this backbone does not compute."""
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


def novelty_projection(
    train_features: np.ndarray, val_features: np.ndarray, quantile: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` with ``||f @ W + b||^2`` = squared Mahalanobis distance of features ``f``
    from the training features, divided by the ``quantile`` of the val photos' distances."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"train.neither_quantile must be between 0 and 1, not {quantile}")
    train_features = train_features.astype(np.float64)
    mean = train_features.mean(axis=0)
    # Shrunk towards a scaled identity: about as many features (576) as photos, so the
    # sample covariance alone is (nearly) singular.
    values, vectors = np.linalg.eigh(LedoitWolf().fit(train_features).covariance_)
    whitening = vectors / np.sqrt(values)
    distances = np.square((val_features - mean) @ whitening).sum(axis=1)
    whitening /= np.sqrt(np.quantile(distances, quantile))
    return whitening.astype(np.float32), (-mean @ whitening).astype(np.float32)


def with_novelty(
    backbone: keras.Model, head: keras.Model, projection, novelty_layers: list[str]
) -> keras.Model:
    """Pixels -> (N, 2): the head's probability and the photo's novelty (contract)."""
    inputs = keras.Input(backbone.input_shape[1:])
    features, probes = features_and_probes(inputs, backbone, novelty_layers)
    whiten = keras.layers.Dense(probes.shape[-1], name="novelty_whitening")
    whitened = whiten(probes)
    whiten.set_weights(list(projection))
    squares = keras.layers.Multiply()([whitened, whitened])
    total = keras.layers.Dense(1, use_bias=False, name="novelty")
    novelty = total(squares)
    total.set_weights([np.ones((probes.shape[-1], 1), dtype=np.float32)])
    outputs = keras.layers.Concatenate()([head(features), novelty])
    return keras.Model(inputs, outputs, name="dandelion_vs_grass")


def fit_head(
    training: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    params: dict,
    callbacks: list,
) -> tuple[keras.Model, keras.callbacks.History]:
    """A new head fitted on ``(features, labels)``; ``callbacks`` stop it early on validation
    (and print progress: Keras' own is off)."""
    head = build_head(training[0].shape[1], params["dropout"])
    compile_for_training(head, params["learning_rate"], params["label_smoothing"])
    history = head.fit(
        *training,
        validation_data=validation,
        epochs=params["epochs"],
        batch_size=params["batch_size"],
        callbacks=callbacks,
        verbose=0,
    )
    return head, history


def train_classifier(
    images: dict[str, dict],
    features: dict[str, dict],
    params: dict,
    backbone_params: dict,
    live: Live,
) -> tuple[keras.Model, dict]:
    """Train on the ``train`` split, stop early on ``val``; return the model and a summary.

    ``images``: the preprocess stage's arrays per split (``images``, ``labels``);
    ``features``: the features stage's, computed with ``backbone_params`` (its params).
    """
    train, val = images["train"], images["val"]
    make_deterministic(backbone_params["seed"])  # as the features stage built it
    backbone = build_backbone(train["images"].shape[1], resolve_weights(backbone_params["weights"]))
    backbone.trainable = False
    check_features(assemble(backbone), val["images"], features["val"]["plain"])
    make_deterministic(params["seed"])
    augmentation = build_augmentation(params["seed"])
    batch_size = params["batch_size"]

    train_features, train_labels = head_training_set(features["train"])
    val_features = features["val"]["plain"]

    # Each fit's EarlyStopping restores the weights of that fit's best epoch (lowest val loss);
    # Keras resets it at the start of every fit, and numbers epochs across both phases.
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=params["patience"], restore_best_weights=True
    )
    callbacks = [stop, LiveMetrics(live=live), EpochLines(log=lambda line: print(line, flush=True))]
    head, history = fit_head(
        (train_features, train_labels), (val_features, val["labels"]), params, callbacks
    )
    epochs_run = len(history.epoch)

    if params["fine_tune_layers"] > 0:
        backbone.trainable = True
        for layer in backbone.layers[: -params["fine_tune_layers"]]:
            layer.trainable = False
        trainer = assemble(backbone, head, augmentation)
        compile_for_training(trainer, params["fine_tune_learning_rate"], params["label_smoothing"])
        # A nested MLflow run: the fine-tuning fit logs its own optimizer settings.
        with mlflow.start_run(run_name="fine-tune", nested=True):
            history = trainer.fit(
                train["images"],
                train["labels"],
                validation_data=(val["images"], val["labels"]),
                initial_epoch=epochs_run,
                epochs=epochs_run + params["fine_tune_epochs"],
                batch_size=batch_size,
                callbacks=callbacks,
                verbose=0,
            )
        epochs_run += len(history.epoch)

    layers = backbone_params["novelty_layers"]
    if params["fine_tune_layers"] > 0:  # the cached probes are the frozen backbone's
        probes = probe_extractor(backbone, layers)
        train_probes, val_probes = (
            probes.predict(split["images"], batch_size=batch_size, verbose=0)[1]
            for split in (train, val)
        )
    else:
        train_probes, val_probes = features["train"]["probes"], features["val"]["probes"]
    projection = novelty_projection(train_probes, val_probes, params["neither_quantile"])
    classifier = with_novelty(backbone, head, projection, layers)
    # Scored without compile(): the saved model then carries no optimizer state.
    val_scores = classifier.predict(val["images"], batch_size=batch_size, verbose=0)[:, PROBABILITY]
    summary = {
        "best/epoch": stop.best_epoch + 1,  # 1-based: the epoch whose weights the model holds
        "best/val_loss": float(keras.losses.BinaryCrossentropy()(val["labels"], val_scores)),
        "best/val_accuracy": float(np.mean((val_scores >= 0.5) == val["labels"])),
        "epochs_run": epochs_run,
    }
    return classifier, summary


def save_reproducibly(model: keras.Model, path: Path) -> None:
    """``model.save(path)``, the same bytes for the same model.

    Keras stamps the save time into ``metadata.json``, numbers shared objects in
    ``config.json`` by their memory address, and dates the zip's entries: all three become
    fixed values. Weights and config are otherwise Keras' own, and ``load_model`` reads it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / path.name
        model.save(saved)
        with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as target:
            for entry in source.infolist():
                content = source.read(entry)
                if entry.filename == "metadata.json":
                    metadata = dict(json.loads(content), date_saved="1970-01-01@00:00:00")
                    content = json.dumps(metadata).encode()
                elif entry.filename == "config.json":
                    content = json.dumps(_renumber_shared_objects(json.loads(content))).encode()
                fixed = zipfile.ZipInfo(entry.filename, date_time=(1980, 1, 1, 0, 0, 0))
                target.writestr(fixed, content, compress_type=entry.compress_type)


def _renumber_shared_objects(config, ids: dict | None = None):
    """``config`` with every ``shared_object_id`` replaced by its order of first appearance."""
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        return {
            key: ids.setdefault(value, len(ids))
            if key == "shared_object_id"
            else _renumber_shared_objects(value, ids)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_renumber_shared_objects(item, ids) for item in config]
    return config


@summarised("train")
@exits_in_one_line_without_weights("train")
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arrays_dir", type=Path, help="preprocess stage output")
    parser.add_argument("features_dir", type=Path, help="features stage output")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("live_dir", type=Path, help="dvclive metrics and plots")
    args = parser.parse_args(argv)

    all_params = load_params()
    params = all_params["train"]
    backbone_params = all_params["features"]
    images, features = (
        {split: dict(np.load(directory / f"{split}.npz")) for split in ("train", "val")}
        for directory in (args.arrays_dir, args.features_dir)
    )

    use_project_store()
    # Params, per-epoch metrics and optimizer settings come from autologging; the model
    # trained by fit() is only the head, so the full classifier is logged explicitly.
    mlflow.keras.autolog(log_models=False, log_datasets=False, silent=True)
    # `dvc exp run` (queued or not) exports the experiment name: the MLflow run gets the same
    # name, so runs and `dvc exp show` rows match.
    run_name = os.environ.get("DVC_EXP_NAME")
    with (
        mlflow.start_run(run_name=run_name),
        Live(str(args.live_dir), dvcyaml=False, save_dvc_exp=False) as live,
    ):
        mlflow.log_params(
            {
                f"{group}.{key}": value
                for group in ("features", "train")
                for key, value in all_params[group].items()
            }
        )
        classifier, summary = train_classifier(images, features, params, backbone_params, live)
        for name, value in summary.items():
            live.log_metric(name, value, plot=False)
        mlflow.log_metrics({name.replace("/", "_"): value for name, value in summary.items()})

        args.model_dir.mkdir(parents=True, exist_ok=True)
        model_path = args.model_dir / MODEL_FILE
        save_reproducibly(classifier, model_path)
        mlflow.set_tag(MODEL_SHA256_TAG, sha256_of(model_path))  # how evaluate/promote find it
        examples = images["val"]["images"][:2]
        signature = mlflow.models.infer_signature(examples, classifier.predict(examples, verbose=0))
        mlflow.keras.log_model(
            classifier, name="model", pip_requirements=SERVING_REQUIREMENTS, signature=signature
        )
    return (
        f"{summary['epochs_run']} epochs run, best epoch {summary['best/epoch']}, "
        f"val accuracy {summary['best/val_accuracy']:.3f} -> {args.model_dir}"
    )


if __name__ == "__main__":
    main()
