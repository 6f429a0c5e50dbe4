"""The INT8 export (pipeline/quantize.py), on a small generated Keras model.

Its accuracy against the f32 export on the real model is tests/end_to_end/test_quantization.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import keras
import numpy as np
import openvino as ov
import pytest

from pipeline.export import export_model
from pipeline.params import QuantizeParams
from pipeline.quantize import calibration_set, novelty_operations
from serving.contract import MODEL_FILE, NOVELTY, PROBABILITY
from serving.engines import OPENVINO_INT8_FILE, engine_of, load_engine
from tests.support.paths import REPO_ROOT


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """Shaped as train builds the real model: the novelty column reads a mid-level layer's
    pooled activations, and the probability goes on through more layers."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    middle = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu")(middle)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    probability = keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.GlobalAveragePooling2D()(x)
    )
    novelty = keras.layers.Dense(1, activation="softplus")(
        keras.layers.GlobalAveragePooling2D()(middle)
    )
    outputs = keras.layers.Concatenate()([probability, novelty])
    path = tmp_path_factory.mktemp("model") / MODEL_FILE
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def calibration():
    return np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exports(keras_file, calibration, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    export_model(keras_file, root / "f32", "openvino")
    export_model(keras_file, root / "int8", "openvino-int8", calibration)
    return root / "f32", root / "int8"


def test_the_int8_export_is_quantized_but_its_novelty_path_is_f32(exports):
    f32_dir, int8_dir = exports
    assert engine_of(int8_dir) == "openvino-int8"
    assert sorted(path.name for path in int8_dir.iterdir()) == [
        "classifier-int8.bin",
        OPENVINO_INT8_FILE,
    ]
    model = ov.Core().read_model(int8_dir / OPENVINO_INT8_FILE)
    quantizers = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert quantizers  # the two convolutions after the novelty's layer
    untouched = set(novelty_operations(model))
    for quantizer in quantizers:
        readers = {
            port.get_node().get_friendly_name() for port in quantizer.output(0).get_target_inputs()
        }
        assert not readers & untouched


def test_the_int8_export_scores_through_load_engine_as_f32_does(exports):
    images = np.random.default_rng(2).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    f32, int8 = (load_engine(directory)(images) for directory in exports)
    assert int8.dtype == np.float32 and int8.shape == (len(images), 2)
    np.testing.assert_allclose(int8[:, NOVELTY], f32[:, NOVELTY], rtol=1e-5)
    difference = np.abs(int8[:, PROBABILITY] - f32[:, PROBABILITY])
    assert 0 < difference.max() <= 0.05  # quantized, and close


def test_the_int8_export_without_right_calibration_is_a_clear_error(keras_file, tmp_path):
    with pytest.raises(ValueError, match="needs calibration images"):
        export_model(keras_file, tmp_path / "x", "openvino-int8")
    floats = np.zeros((4, 32, 32, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, 32, 32, 3\), not float32"):
        export_model(keras_file, tmp_path / "x", "openvino-int8", floats)
    with pytest.raises(ValueError, match=r"shape \(N, 32, 32, 3\), not uint8 of shape \(4, 8"):
        export_model(keras_file, tmp_path / "x", "openvino-int8", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="holds no image"):
        export_model(
            keras_file, tmp_path / "x", "openvino-int8", np.zeros((0, 32, 32, 3), np.uint8)
        )


def test_calibration_set_is_the_seed_s_draw_from_the_photos_it_is_given():
    # Each image is its own index, so the draw can be read off the result.
    train = np.arange(30, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    params = QuantizeParams(calibration_photos=10, seed=7)
    chosen = calibration_set(train, params)
    assert np.array_equal(chosen, calibration_set(train, params))
    indices = chosen[:, 0, 0, 0].tolist()
    assert len(chosen) == 10 and len(set(indices)) == 10 and indices == sorted(indices)
    assert set(indices) <= set(range(30))
    other = calibration_set(train, QuantizeParams(calibration_photos=10, seed=8))
    assert not np.array_equal(chosen, other)
    assert np.array_equal(calibration_set(train, QuantizeParams(30, 7)), train)
    with pytest.raises(
        ValueError, match="calibration_photos is 31, but the train split holds only 30"
    ):
        calibration_set(train, QuantizeParams(31, 7))


@pytest.mark.slow
def test_the_int8_export_is_byte_identical_from_fresh_processes(keras_file, calibration, tmp_path):
    """dvc.lock must not change between clean runs, as for the f32 export (test_engines.py).
    One process on one core, one on all: NNCF's statistics come from OpenVINO's threads."""
    np.save(tmp_path / "calibration.npy", calibration)
    code = (
        "import sys, numpy as np; from pathlib import Path; "
        "from pipeline.export import export_model; "
        "export_model(Path(sys.argv[1]), Path(sys.argv[2]), 'openvino-int8', np.load(sys.argv[3]))"
    )
    exports = [
        subprocess.Popen(
            [*prefix, sys.executable, "-c", code, str(keras_file), str(tmp_path / run)]
            + [str(tmp_path / "calibration.npy")],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run, prefix in (("a", ["taskset", "-c", "0"]), ("b", []))
    ]
    errors = [export.communicate(timeout=300)[1] for export in exports]
    for export, stderr in zip(exports, errors, strict=True):
        assert export.returncode == 0, stderr[-2000:]
    digests = [
        {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in out.iterdir()}
        for out in (tmp_path / "a", tmp_path / "b")
    ]
    assert digests[0] == digests[1]
    assert set(digests[0]) == {OPENVINO_INT8_FILE, "classifier-int8.bin"}
