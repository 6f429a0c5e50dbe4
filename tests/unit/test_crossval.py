"""Cross-validation on generated features: folds, recipes, the label-noise report, the stage."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import crossval, label_noise
from pipeline.params import CrossvalParams, FeaturesParams, TrainParams
from stages import crossval as crossval_stage
from tests.support.paths import PARAMS_FILE

FEATURES = 16
# The train stage's recipe, small and quick for generated features.
TRAIN_PARAMS = replace(
    TrainParams.load(PARAMS_FILE), seed=1, batch_size=16, epochs=40, patience=5, dropout=0.1
)
TRAIN_PARAMS = replace(TRAIN_PARAMS, learning_rate=0.01, label_smoothing=0.0)
PARAMS = CrossvalParams(
    folds=4,
    seed=0,
    recipes=["linear_probe", "head"],
    label_smoothing=0.1,
    fine_tune_layers=5,
    fine_tune_epochs=2,
    fine_tune_learning_rate=1e-4,
    noise_recipe="linear_probe",
    noise_confidence=0.9,
)
BACKBONE = FeaturesParams(
    seed=3, weights="none", batch_size=8, augment_copies=1, novelty_layers=["block_6_expand_relu"]
)
STOP_SHARE = 0.15  # as params.yaml's split.val_ratio


def setup(**overrides) -> crossval.Setup:
    """The recipes' setup, with crossval params overridden."""
    return crossval.Setup(TRAIN_PARAMS, replace(PARAMS, **overrides), BACKBONE, STOP_SHARE)


def photos(count: int, seed: int = 0, flipped_labels=()) -> dict[str, np.ndarray]:
    """Features of two well-separated classes; ``flipped_labels`` rows carry the wrong label."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    centre = np.where(labels[:, None], 1.5, -1.5)

    def view():
        return (centre + rng.normal(size=(count, FEATURES))).astype(np.float32)

    given = labels.copy()
    given[list(flipped_labels)] = 1 - given[list(flipped_labels)]
    return {
        "plain": view(),
        "flipped": view(),
        "augmented": np.stack([view(), view()]),
        "labels": given,
        "paths": np.array([f"data/raw/x/{i:08d}.jpg" for i in range(count)]),
    }


def test_folds_are_stratified_and_keep_copies_of_one_picture_together():
    labels = np.arange(40) % 2
    groups = [f"hash{i // 2}" for i in range(40)]  # rows 2k and 2k+1 are copies
    held_out = crossval.folds(labels, groups, 4, seed=0)
    assert sorted(np.concatenate(held_out).tolist()) == list(range(40))  # each row once
    for rows in held_out:
        assert {i // 2 for i in rows} == {i // 2 for i in rows if i % 2 == 0}
        assert set(rows ^ 1) == set(rows)  # a copy is held out with its twin
        assert labels[rows].mean() == pytest.approx(0.5, abs=0.2)


def test_recipes_are_scored_out_of_fold_and_mislabelled_photos_are_listed():
    data = photos(36, flipped_labels=[5, 10])
    groups = [str(i) for i in range(36)]
    recipes = ["linear_probe", "head_flip"]  # head_flip trains the head recipe's head
    # Each fold trains a model: fewer folds, a faster test.
    metrics, out_of_fold = crossval.cross_validate(data, groups, setup(folds=2, recipes=recipes))
    for name in recipes:
        assert len(metrics[name]["fold_accuracies"]) == 2
        # Only the two flipped labels can be wrong on such separated classes.
        assert metrics[name]["accuracy"] == pytest.approx(34 / 36, abs=0.03)
        assert not np.isnan(out_of_fold[name]).any()
    rows = label_noise.confident_contradictions(data["labels"], out_of_fold["linear_probe"], 0.9)
    assert sorted(rows.tolist()) == [5, 10]


def test_unknown_recipes_are_refused_before_any_work():
    with pytest.raises(ValueError, match="unknown \\['svm'\\]"):
        crossval.check_recipes(replace(PARAMS, recipes=["linear_probe", "svm"]))
    with pytest.raises(ValueError, match="noise_recipe 'head' is not in"):
        crossval.check_recipes(replace(PARAMS, recipes=["linear_probe"], noise_recipe="head"))


def test_main_writes_metrics_and_a_reviewable_noise_report(tmp_path, monkeypatch):
    features_dir, arrays_dir = tmp_path / "features", tmp_path / "arrays"
    features_dir.mkdir()
    arrays_dir.mkdir()
    split_rows = []
    for split, (count, seed) in {"train": (32, 1), "val": (16, 2)}.items():
        data = photos(count, seed, flipped_labels=[3] if split == "val" else [])
        data["paths"] = np.array([f"data/raw/x/{split}{i}.jpg" for i in range(count)])
        np.savez(features_dir / f"{split}.npz", **data)
        images = np.full((count, 24, 24, 3), 128, dtype=np.uint8)
        np.savez(arrays_dir / f"{split}.npz", images=images, labels=data["labels"])
        split_rows += [(path, split, f"h{split}{i}") for i, path in enumerate(data["paths"])]
    with open(tmp_path / "split.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "sha256"])
        writer.writerows([path, "x", split, digest] for path, split, digest in split_rows)
    params = {
        "classes": ["grass", "dandelion"],
        "split": {"seed": 0, "val_ratio": STOP_SHARE, "test_ratio": 0.15},
        "features": BACKBONE.to_dict(),
        "train": TRAIN_PARAMS.to_dict(),
        "crossval": replace(PARAMS, recipes=["linear_probe"]).to_dict(),
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)

    crossval_stage.main(["split.csv", "arrays", "features", "out"])

    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert set(metrics) == {"linear_probe"}
    assert set(metrics["linear_probe"]) == {"accuracy", "accuracy_sd", "fold_accuracies"}
    with open(tmp_path / "out/label_noise.csv") as handle:
        (listed,) = list(csv.DictReader(handle))
    assert listed["path"] == "data/raw/x/val3.jpg" and listed["recipe"] == "linear_probe"
    assert float(listed["other_class_probability"]) >= 0.9
    sheet = Image.open(tmp_path / "out/label_noise.png")
    cell = label_noise.THUMBNAIL
    assert sheet.size == (4 * cell, cell + label_noise.caption_height(2))


@pytest.mark.slow  # about 30 s: trains a backbone per fold
def test_fine_tuning_is_cross_validated_on_the_photos():
    """The one recipe that reads images: tiny generated photos and a random-init backbone."""
    from pipeline.features import extract_features

    rng = np.random.default_rng(0)
    labels = np.arange(24) % 2
    base = np.where(labels[:, None], [230, 200, 30], [40, 150, 40])[:, None, None, :]
    images = np.clip(base + rng.integers(-40, 40, (24, 32, 32, 3)), 0, 255).astype(np.uint8)
    split = {"images": images, "labels": labels, "paths": np.array([str(i) for i in range(24)])}
    data = extract_features({"train": split}, BACKBONE)["train"]
    data["images"] = images
    fine_tuned = setup(recipes=["fine_tune"], noise_recipe="fine_tune")
    metrics, out_of_fold = crossval.cross_validate(data, [str(i) for i in range(24)], fine_tuned)
    assert len(metrics["fine_tune"]["fold_accuracies"]) == PARAMS.folds
    assert out_of_fold["fine_tune"].shape == (24,) and not np.isnan(out_of_fold["fine_tune"]).any()


def test_only_tensorflow_s_retracing_warning_is_dropped_and_only_while_folds_train():
    """fine_tune's one trace per fold is expected; TensorFlow's other warnings still show."""
    logger, records = logging.getLogger("tensorflow"), []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    retracing = "5 out of the last 7 calls to %s triggered tf.function retracing."
    try:
        with crossval.retracing_expected():
            logger.warning(retracing, "<f>")
            logger.warning("Compiled the loaded model, but the compiled metrics are not built.")
        logger.warning(retracing, "<g>")  # outside cross-validation: shown
    finally:
        logger.removeHandler(handler)
    shown = [record.getMessage()[:30] for record in records]
    assert shown == ["Compiled the loaded model, but", "5 out of the last 7 calls to <"]
    assert logger.filters == []
