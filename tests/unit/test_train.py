"""Train stage on tiny generated images (random init, 32 px) so it runs in seconds.

The features of the tiny photos, and one training on them, are computed once for the module:
building MobileNetV2 is most of each test's time.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import keras
import mlflow
import numpy as np
import pytest
import yaml
from dvclive import Live

from pipeline import features, training
from pipeline.export import export_model
from pipeline.hashing import file_sha256
from pipeline.keras_io import save_reproducibly
from pipeline.novelty import novelty_projection
from pipeline.params import FeaturesParams, TrainParams
from pipeline.tracking import training_run
from pipeline.weights import resolve_weights
from serving.contract import MODEL_FILE, PREDICTIONS_FILE
from stages import evaluate, train
from stages import features as features_stage
from tests.support.paths import PARAMS_FILE

BACKBONE = FeaturesParams(
    seed=3,
    weights="none",
    batch_size=8,
    augment_copies=2,
    novelty_layers=["block_6_expand_relu", "block_10_expand_relu"],
)
CLASSES = ["grass", "dandelion"]  # class index 1 is the positive class, as in params.yaml
# The train stage's recipe, for 3 epochs on tiny photos.
PARAMS = dataclasses.replace(
    TrainParams.load(PARAMS_FILE), seed=1, batch_size=8, epochs=3, patience=2, dropout=0.2
)
PARAMS = dataclasses.replace(
    PARAMS, learning_rate=0.001, label_smoothing=0.0, neither_quantile=0.9, fine_tune_layers=0
)


def tiny_split(count: int, seed: int) -> dict[str, np.ndarray]:
    """Yellow-ish images are class 1, green-ish class 0."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    base = np.where(labels[:, None], [230, 200, 30], [40, 150, 40])[:, None, None, :]
    images = np.clip(base + rng.integers(-40, 40, (count, 32, 32, 3)), 0, 255).astype(np.uint8)
    return {
        "images": images,
        "labels": labels,
        "paths": np.array([f"img{i}.jpg" for i in range(count)]),
    }


def tiny_images() -> dict[str, dict[str, np.ndarray]]:
    return {"train": tiny_split(16, 0), "val": tiny_split(8, 1)}


def run_training(tmp_path, cached, backbone=BACKBONE, **overrides):
    """Train on ``cached`` (features of tiny_images()) as if ``backbone`` had computed them."""
    keras.backend.clear_session()  # layer names restart, as in each `dvc repro` process
    with Live(str(tmp_path / "live"), dvcyaml=False, save_dvc_exp=False) as live:
        return training.train_classifier(
            tiny_images(), cached, dataclasses.replace(PARAMS, **overrides), backbone, live
        )


@pytest.fixture(scope="module")
def extraction() -> tuple[dict, list[str]]:
    """The features stage's output for tiny_images(), and the lines it logged (a progress line
    after every batch)."""
    lines: list[str] = []
    return features.extract_features(tiny_images(), BACKBONE, log=lines.append, every=0), lines


@pytest.fixture(scope="module")
def cached(extraction):
    """The features stage's output for tiny_images()."""
    return extraction[0]


@pytest.fixture(scope="module")
def trained(cached, tmp_path_factory):
    """(model, summary, dvclive directory) of one training with PARAMS."""
    directory = tmp_path_factory.mktemp("trained")
    model, summary = run_training(directory, cached)
    return model, summary, directory / "live"


def test_weights_setting_is_validated(tmp_path):
    assert resolve_weights("imagenet") == "imagenet"
    assert resolve_weights("none") is None
    weights_file = tmp_path / "backbone.h5"
    weights_file.write_bytes(b"")
    assert resolve_weights(str(weights_file)) == str(weights_file)
    with pytest.raises(ValueError, match="expected 'imagenet', 'none' or a weights file path"):
        resolve_weights("imagenet21k")


def test_features_hold_every_view(cached):
    for split, count in (("train", 16), ("val", 8)):
        assert cached[split]["plain"].shape == cached[split]["flipped"].shape
        assert cached[split]["augmented"].shape == (2, *cached[split]["plain"].shape)
        assert cached[split]["plain"].shape[0] == count
        # Random init and generated photos, yet each view is a different input to the backbone.
        assert not np.array_equal(cached[split]["plain"], cached[split]["flipped"])
        assert not np.array_equal(cached[split]["augmented"][0], cached[split]["augmented"][1])


def test_feature_progress_counts_every_view_of_every_photo_once(extraction):
    _, lines = extraction
    progress = [re.match(r"features: (\d+)/(\d+) photo views \((\w+): ([\w ]+)\)", line)
                for line in lines]  # fmt: skip
    counted = [(int(m[1]), int(m[2]), m[3], m[4]) for m in progress if m]
    total = 16 * 4 + 8 * 4  # train and val: plain, flipped and two augmented views each
    assert {count[1] for count in counted} == {total}
    done = [count[0] for count in counted]
    assert done == sorted(set(done)) and done[-1] == total
    views = [view for *_, split, view in counted if split == "val"]
    assert list(dict.fromkeys(views)) == ["plain", "flipped", "augmented 1", "augmented 2"]
    # A photo's views end on batch boundaries: 16 train photos in batches of 8.
    assert [c[0] for c in counted if c[2:] == ("train", "plain")] == [8, 16]


# Full tier, as the same training below: the pipeline run checks both again at full size (a
# second `dvc repro` elsewhere writes the same dvc.lock), and each costs seconds of TensorFlow.
@pytest.mark.slow
def test_features_are_reproducible(cached):
    again = features.extract_features(tiny_images(), BACKBONE)
    for split in ("train", "val"):
        for view in ("plain", "flipped", "augmented", "probes", "labels"):
            np.testing.assert_array_equal(cached[split][view], again[split][view])


def test_a_head_is_never_trained_on_another_backbones_features(tmp_path, cached):
    with pytest.raises(ValueError, match="rerun the features stage"):
        run_training(
            tmp_path, cached, backbone=dataclasses.replace(BACKBONE, seed=BACKBONE.seed + 1)
        )


def test_without_augmented_views_the_head_trains_on_the_photos_alone(tmp_path, cached):
    unaugmented = {"train": tiny_split(16, 0)}
    extracted = features.extract_features(
        unaugmented, dataclasses.replace(BACKBONE, augment_copies=0)
    )
    assert extracted["train"]["augmented"].shape == (0, *extracted["train"]["plain"].shape)
    # The same features as the module's, but for the augmented views it has and this lacks.
    np.testing.assert_array_equal(extracted["train"]["plain"], cached["train"]["plain"])
    photos_alone = {**cached, "train": {**cached["train"], **extracted["train"]}}
    training_features, labels = training.head_training_set(photos_alone["train"])
    assert training_features.shape == cached["train"]["plain"].shape and len(labels) == 16
    run_training(tmp_path, photos_alone, backbone=dataclasses.replace(BACKBONE, augment_copies=0))


def test_classifier_maps_pixels_to_a_probability_and_logs_curves(trained):
    model, summary, live = trained
    outputs = model.predict(tiny_split(4, 2)["images"], verbose=0)
    assert outputs.shape == (4, 2)  # probability and novelty (serving/contract.py)
    assert 1 <= summary["best/epoch"] <= summary["epochs_run"] <= PARAMS.epochs
    curve = (live / "plots" / "metrics" / "val" / "loss.tsv").read_text()
    rows = [line.split("\t") for line in curve.strip().splitlines()[1:]]  # step, loss
    assert len(rows) == summary["epochs_run"]
    # The model holds the weights of the best epoch: the one with the lowest val loss.
    losses = [float(loss) for _, loss in rows]
    assert summary["best/epoch"] == losses.index(min(losses)) + 1
    assert summary["best/val_loss"] == pytest.approx(min(losses), rel=1e-4)


def test_fine_tuning_continues_the_epoch_count_in_a_nested_run(tmp_path, cached, mlflow_store):
    mlflow.set_experiment("test")
    with mlflow.start_run() as parent:
        _, summary = run_training(
            tmp_path, cached, fine_tune_layers=5, fine_tune_epochs=2, patience=5
        )
    assert summary["epochs_run"] == PARAMS.epochs + 2
    assert PARAMS.epochs < summary["best/epoch"] <= PARAMS.epochs + 2  # a fine-tuned one
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert children["tags.mlflow.runName"].tolist() == ["fine-tune"]


@pytest.mark.slow
def test_the_same_training_gives_the_same_predictions_and_model_bytes(trained, cached, tmp_path):
    """Two trainings with one seed (distinct Python objects, saved at different times) predict
    the same and give one file."""
    sample = tiny_split(4, 3)["images"]
    first, _, _ = trained
    second, _ = run_training(tmp_path, cached)
    np.testing.assert_array_equal(
        first.predict(sample, verbose=0), second.predict(sample, verbose=0)
    )
    paths = [tmp_path / "first.keras", tmp_path / "second.keras"]
    for model, path in zip((first, second), paths, strict=True):
        save_reproducibly(model, path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    reloaded = keras.models.load_model(paths[0], compile=False)
    np.testing.assert_allclose(
        reloaded.predict(sample, verbose=0), second.predict(sample, verbose=0)
    )


# Full tier: the features, train and evaluate mains run again, at full size, in the pipeline run
# (which checks their outputs and MLflow runs too); here they cost seconds of TensorFlow.
@pytest.mark.slow
def test_train_and_evaluate_mains_write_model_metrics_and_mlflow_run(
    tmp_path, mlflow_store, monkeypatch
):
    data_dir = tmp_path / "arrays"
    data_dir.mkdir()
    for name, (count, seed) in {"train": (16, 0), "val": (8, 1), "test": (8, 2)}.items():
        np.savez(data_dir / f"{name}.npz", **tiny_split(count, seed))
    np.savez(data_dir / "production_test.npz", **tiny_split(0, 3))  # none reviewed yet
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "classes": CLASSES,
                "features": BACKBONE.to_dict(),
                "train": PARAMS.to_dict(),
                "evaluate": {"threshold": 0.5},
            }
        )
    )
    monkeypatch.chdir(tmp_path)

    features_stage.main([str(data_dir), "features"])
    train.main([str(data_dir), "features", "model", "results/train"])
    export_model(tmp_path / "model" / MODEL_FILE, tmp_path / "export", "keras")
    evaluate.main(
        [
            *("model", "export", str(data_dir / "test.npz")),
            *(str(data_dir / "production_test.npz"), "results/evaluate"),
        ]
    )

    # The model directory holds the model alone: no run id or time in a DVC output.
    assert [p.name for p in (tmp_path / "model").iterdir()] == [MODEL_FILE]
    train_metrics = json.loads((tmp_path / "results/train/metrics.json").read_text())
    assert set(train_metrics) == {"train", "val", "best", "epochs_run", "step"}
    assert set(train_metrics["best"]) == {"epoch", "val_loss", "val_accuracy"}
    evaluated = json.loads((tmp_path / "results/evaluate/metrics.json").read_text())
    assert set(evaluated) == {"test", "unlike"}
    test_metrics = evaluated["test"]
    assert set(test_metrics) == {"accuracy", "precision", "recall", "f1", "roc_auc"} | {
        "accuracy_low",
        "accuracy_high",
        "positive_share",
        "positive_share_low",
        "positive_share_high",
        "neither_share",
    }
    assert set(evaluated["unlike"]) == {"neither_share"}
    assert not (tmp_path / "results/evaluate" / evaluate.PRODUCTION_PREDICTIONS_FILE).exists()
    for name in ("confusion_matrix.json", "roc.json"):
        assert (tmp_path / "results/evaluate/plots/sklearn" / name).is_file()
    with open(tmp_path / "results/evaluate" / PREDICTIONS_FILE, newline="") as handle:
        assert handle.readline().strip() == ",".join(evaluate.PREDICTION_FIELDS)
        handle.seek(0)
        rows = list(csv.DictReader(handle))
    # One row per test photo, with its true label, and a decision that follows its score.
    assert [row["label"] for row in rows] == [CLASSES[i] for i in tiny_split(8, 2)["labels"]]
    assert [row["predicted"] for row in rows] == [
        CLASSES[float(row["score"]) >= 0.5] for row in rows
    ]
    # The reported metrics are those of these very rows.
    correct = [row["predicted"] == row["label"] for row in rows]
    assert test_metrics["accuracy"] == pytest.approx(np.mean(correct))

    # The run is found by the model's SHA-256, as evaluate and promote find it.
    run = training_run(file_sha256(tmp_path / "model" / MODEL_FILE))
    run_id = run.info.run_id
    assert run.data.params["train.dropout"] == "0.2"
    assert run.data.metrics["test_accuracy"] == pytest.approx(test_metrics["accuracy"])
    assert {"best_val_accuracy", "best_epoch", "epochs_run", "val_loss"} <= set(run.data.metrics)
    model_uri = f"runs:/{run_id}/model"
    reloaded = mlflow.keras.load_model(model_uri)
    assert reloaded.predict(tiny_split(2, 5)["images"], verbose=0).shape == (2, 2)


def test_novelty_is_the_mahalanobis_distance_in_units_of_the_val_threshold():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(12, 12))  # correlated features, as a backbone's are

    def photos(count, shift=0.0):
        return (rng.normal(size=(count, 12)) + shift) @ mixing

    train_features, val_features = photos(400), photos(60)
    weights, bias = novelty_projection(train_features, val_features, 0.95)
    novelty = lambda f: np.square(f @ weights + bias).sum(axis=1)  # noqa: E731
    # Unseen photos of the same kind are mostly under the threshold, others far above it.
    assert np.mean(novelty(photos(1000)) <= 1) > 0.85
    assert novelty(photos(100, shift=3.0)).min() > 1
    with pytest.raises(ValueError, match="neither_quantile must be between 0 and 1"):
        novelty_projection(train_features, val_features, 1.0)


def test_the_models_novelty_output_is_that_distance_of_its_probes(trained, cached):
    """The Keras layers compute what novelty_projection defines, from the cached probes."""
    model, _, _ = trained
    images = tiny_images()
    weights, bias = model.get_layer("novelty_whitening").get_weights()
    probes = cached["val"]["probes"]
    expected = np.square(probes @ weights + bias).sum(axis=1)
    outputs = model.predict(images["val"]["images"], verbose=0)
    np.testing.assert_allclose(outputs[:, 1], expected, rtol=1e-3)
