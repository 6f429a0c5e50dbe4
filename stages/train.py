"""Train stage: MobileNetV2 transfer learning in two phases.

1. Frozen backbone: its features are computed once (plus ``augment_copies`` augmented views
   of every training image), and only the new head is trained on them. This is the same
   model as running the frozen backbone inside every epoch, at a fraction of the cost.
2. Optional fine-tuning of the top ``fine_tune_layers`` backbone layers end to end, with
   augmentation in the model and a small learning rate (Keras' transfer-learning recipe).

Per-epoch metrics go to dvclive (learning curves for ``dvc plots``) and the run (params,
metrics, model) to MLflow. The model directory holds the model alone: the MLflow run finds
it by the model file's SHA-256 (tag ``model_sha256``), so no run id enters a DVC output.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import zipfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback

from serving.contract import MODEL_FILE, MODEL_SHA256_TAG, sha256_of
from stages.params import load_params
from stages.tracking import use_project_store

# Stated rather than inferred: MLflow's inference re-imports the model in a subprocess.
SERVING_REQUIREMENTS = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"]


def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and force deterministic TF kernels."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def resolve_weights(setting: str) -> str | None:
    """Map ``train.weights`` to Keras' ``weights=`` argument."""
    if setting in ("imagenet", "none"):
        return None if setting == "none" else "imagenet"
    if not Path(setting).is_file():
        raise ValueError(
            f"train.weights={setting!r}: expected 'imagenet', 'none' or a weights file path"
        )
    return setting


def build_backbone(image_size: int, weights: str | None) -> keras.Model:
    return keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3),
        include_top=False,
        weights=weights,
        pooling="avg",
    )


def build_augmentation(seed: int) -> keras.Sequential:
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
        ],
        name="augmentation",
    )


def build_head(feature_size: int, dropout: float) -> keras.Model:
    inputs = keras.Input((feature_size,))
    hidden = keras.layers.Dropout(dropout)(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(hidden)
    return keras.Model(inputs, outputs, name="head")


def assemble(
    backbone: keras.Model,
    head: keras.Model | None = None,
    augmentation: keras.Sequential | None = None,
) -> keras.Model:
    """Raw RGB pixels (0-255) -> [augmentation] -> backbone features -> [head probability]."""
    inputs = keras.Input(backbone.input_shape[1:])
    x = augmentation(inputs) if augmentation is not None else inputs
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)  # MobileNetV2 expects [-1, 1]
    x = backbone(x, training=False)  # keep BatchNorm in inference mode, even when fine-tuning
    outputs = head(x) if head is not None else x
    return keras.Model(inputs, outputs, name="dandelion_vs_grass")


def frozen_features(
    extractor: keras.Model,
    images: np.ndarray,
    batch_size: int,
    augmentation: keras.Sequential | None = None,
) -> np.ndarray:
    if augmentation is not None:
        images = np.concatenate(
            [
                augmentation(images[start : start + batch_size].astype("float32"), training=True)
                for start in range(0, len(images), batch_size)
            ]
        )
    return extractor.predict(images, batch_size=batch_size, verbose=0)


class LiveMetrics(DVCLiveCallback):
    """dvclive's Keras callback, naming validation metrics ``val/...`` (dvclive says
    ``eval/...``) so that they cannot be mistaken for evaluate's ``test/...`` metrics."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None):
        for metric, value in (logs or {}).items():
            split, name = ("val", metric[4:]) if metric.startswith("val_") else ("train", metric)
            self.live.log_metric(f"{split}/{name}", value)
        self.live.next_step()


def compile_for_training(model: keras.Model, learning_rate: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="binary_crossentropy",
        metrics=["accuracy"],
    )


def train_classifier(train: dict, val: dict, params: dict, live: Live) -> tuple[keras.Model, dict]:
    """Train on ``train``/``val`` arrays (``images``, ``labels``); return the model and summary."""
    make_deterministic(params["seed"])
    image_size = train["images"].shape[1]
    backbone = build_backbone(image_size, resolve_weights(params["weights"]))
    backbone.trainable = False
    augmentation = build_augmentation(params["seed"])
    extractor = assemble(backbone)
    batch_size = params["batch_size"]

    views = [frozen_features(extractor, train["images"], batch_size)] + [
        frozen_features(extractor, train["images"], batch_size, augmentation)
        for _ in range(params["augment_copies"])
    ]
    train_features = np.concatenate(views)
    train_labels = np.tile(train["labels"], len(views))
    val_features = frozen_features(extractor, val["images"], batch_size)

    head = build_head(train_features.shape[1], params["dropout"])
    compile_for_training(head, params["learning_rate"])

    # Each fit's EarlyStopping restores the weights of that fit's best epoch (lowest val loss);
    # Keras resets it at the start of every fit, and numbers epochs across both phases.
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=params["patience"], restore_best_weights=True
    )
    callbacks = [stop, LiveMetrics(live=live)]

    history = head.fit(
        train_features,
        train_labels,
        validation_data=(val_features, val["labels"]),
        epochs=params["epochs"],
        batch_size=batch_size,
        callbacks=callbacks,
        verbose=2,
    )
    epochs_run = len(history.epoch)

    if params["fine_tune_layers"] > 0:
        backbone.trainable = True
        for layer in backbone.layers[: -params["fine_tune_layers"]]:
            layer.trainable = False
        trainer = assemble(backbone, head, augmentation)
        compile_for_training(trainer, params["fine_tune_learning_rate"])
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
                verbose=2,
            )
        epochs_run += len(history.epoch)

    classifier = assemble(backbone, head)
    # Scored without compile(): the saved model then carries no optimizer state.
    val_scores = classifier.predict(val["images"], batch_size=batch_size, verbose=0).ravel()
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data_dir", type=Path, help="preprocess stage output")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("live_dir", type=Path, help="dvclive metrics and plots")
    args = parser.parse_args(argv)

    params = load_params()["train"]
    train, val = (dict(np.load(args.data_dir / f"{split}.npz")) for split in ("train", "val"))

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
        mlflow.log_params({f"train.{key}": value for key, value in params.items()})
        classifier, summary = train_classifier(train, val, params, live)
        for name, value in summary.items():
            live.log_metric(name, value, plot=False)
        mlflow.log_metrics({name.replace("/", "_"): value for name, value in summary.items()})

        args.model_dir.mkdir(parents=True, exist_ok=True)
        model_path = args.model_dir / MODEL_FILE
        save_reproducibly(classifier, model_path)
        mlflow.set_tag(MODEL_SHA256_TAG, sha256_of(model_path))  # how evaluate/promote find it
        examples = val["images"][:2]
        signature = mlflow.models.infer_signature(examples, classifier.predict(examples, verbose=0))
        mlflow.keras.log_model(
            classifier, name="model", pip_requirements=SERVING_REQUIREMENTS, signature=signature
        )
    print(
        f"train: {summary['epochs_run']} epochs run, best epoch {summary['best/epoch']}, "
        f"val accuracy {summary['best/val_accuracy']:.3f}"
    )


if __name__ == "__main__":
    main()
