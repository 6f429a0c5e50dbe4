"""Inference engines and the export stage, on a small generated Keras model.

The parity of the real model (OpenVINO against Keras on the 60 test photos) is checked in
tests/end_to_end/test_service.py, on the pipeline's own output.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from pipeline.export import export_model
from serving.contract import MODEL_FILE
from serving.engines import OPENVINO_FILE, engine_of, load_engine
from tests.support.paths import REPO_ROOT


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """A small convolutional classifier on 32 px uint8 images with the contract's two outputs
    (probability, novelty), as train builds the real one."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    probability = keras.layers.Dense(1, activation="sigmoid")(x)
    novelty = keras.layers.Dense(1, activation="softplus")(x)
    outputs = keras.layers.Concatenate()([probability, novelty])
    path = tmp_path_factory.mktemp("model") / MODEL_FILE
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)


def test_openvino_export_scores_as_keras_does(keras_file, images, tmp_path):
    export_model(keras_file, tmp_path / "openvino", "openvino")
    export_model(keras_file, tmp_path / "keras", "keras")
    assert engine_of(tmp_path / "openvino") == "openvino"
    assert engine_of(tmp_path / "keras") == "keras"
    assert (tmp_path / "openvino" / OPENVINO_FILE).with_suffix(".bin").is_file()

    openvino_scores = load_engine(tmp_path / "openvino")(images)
    keras_scores = load_engine(tmp_path / "keras")(images)
    assert openvino_scores.dtype == keras_scores.dtype == np.float32
    assert openvino_scores.shape == (len(images), 2)
    assert np.abs(openvino_scores - keras_scores).max() <= 1e-5
    # A batch scores each image as it would alone (the engine runs them one by one), so the
    # service may group requests freely.
    one_by_one = np.concatenate(
        [load_engine(tmp_path / "openvino")(image[None]) for image in images]
    )
    assert np.array_equal(one_by_one, openvino_scores)


@pytest.mark.slow
def test_export_is_byte_identical_from_fresh_processes(keras_file, tmp_path):
    """dvc.lock must not change between clean runs: the converted files are the same bytes.

    Each export in a fresh process, as `dvc repro` runs the stage (an export in a process that
    has converted other models may name things differently). Both run at once. Full tier: two
    TensorFlow processes, and the pipeline run's second `dvc repro` checks it at full size."""
    code = (
        "import sys; from pathlib import Path; from pipeline.export import export_model; "
        "export_model(Path(sys.argv[1]), Path(sys.argv[2]), 'openvino')"
    )
    exports = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(keras_file), str(tmp_path / run)],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run in ("a", "b")
    ]
    errors = [export.communicate(timeout=300)[1] for export in exports]  # both finish first
    for export, stderr in zip(exports, errors, strict=True):
        assert export.returncode == 0, stderr[-2000:]
    digests = [
        {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in out.iterdir()}
        for out in (tmp_path / "a", tmp_path / "b")
    ]
    assert digests[0] == digests[1] and set(digests[0]) == {"classifier.xml", "classifier.bin"}


def test_an_unknown_engine_or_an_empty_export_is_a_clear_error(keras_file, tmp_path):
    with pytest.raises(
        ValueError, match=r"must be one of \['openvino', 'openvino-int8', 'keras'\]"
    ):
        export_model(keras_file, tmp_path / "x", "tensorrt")
    with pytest.raises(
        FileNotFoundError, match="holds none of .'classifier.xml', 'classifier-int8"
    ):
        engine_of(tmp_path)
