"""Export: the trained Keras model in the format of the engine that will serve it.

``openvino`` converts the model to OpenVINO IR with Keras' own exporter; ``openvino-int8``
quantizes that IR to INT8 on calibration photos (pipeline/quantize.py); ``keras`` copies the
Keras file. Each gives the same bytes in every fresh process, so ``dvc.lock`` stays
reproducible.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from pipeline.logs import import_tensorflow_quietly
from serving.contract import MODEL_FILE
from serving.engines import OPENVINO_FILE, OPENVINO_INT8_FILE, check_engine


def work_around_openvino_on_python_3_13() -> None:
    """OpenVINO's TensorFlow frontend (2026.4.1 and older) runs ``exec("import tensorflow")``
    then ``exec("del tensorflow")`` in one function. Since Python 3.13 (PEP 667) each exec sees
    a fresh copy of the function's locals, so the second raises NameError and every Keras
    export fails. Where it does, compute the same answer without exec (same IR bytes)."""
    from openvino.frontend.tensorflow import utils

    original = utils.get_environment_setup
    if getattr(original, "works_around_pep_667", False):
        return

    def get_environment_setup(framework: str) -> dict:
        try:
            return original(framework)
        except NameError:
            import tensorflow

            return {
                "python_version": ".".join(map(str, sys.version_info[:3])),
                "tensorflow": utils.get_imported_module_version(tensorflow),
                "sys_platform": sys.platform,
            }

    get_environment_setup.works_around_pep_667 = True
    utils.get_environment_setup = get_environment_setup


def export_model(
    keras_file: Path, out_dir: Path, engine: str, calibration: np.ndarray | None = None
) -> None:
    """Write ``keras_file`` for ``engine`` into the (emptied) ``out_dir``. ``openvino-int8``
    needs ``calibration``: uint8 train photos of the model's input shape (ValueError else)."""
    check_engine(engine)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    if engine == "keras":
        shutil.copyfile(keras_file, out_dir / MODEL_FILE)
        return
    import_tensorflow_quietly()
    import keras

    model = keras.models.load_model(keras_file, compile=False)
    if engine == "openvino-int8":
        from pipeline.quantize import check_calibration

        check_calibration(calibration, model.input_shape[1:])  # before the conversion's work
    # Keras exports a model it has traced: call it once on an input of its shape.
    model(np.zeros((1, *model.input_shape[1:]), dtype=np.float32))
    if sys.version_info >= (3, 13):
        work_around_openvino_on_python_3_13()
    if engine == "openvino":
        model.export(str(out_dir / OPENVINO_FILE), format="openvino", verbose=False)
        return
    import openvino as ov

    from pipeline.quantize import quantize

    with tempfile.TemporaryDirectory() as scratch:
        f32_file = Path(scratch) / OPENVINO_FILE
        model.export(str(f32_file), format="openvino", verbose=False)
        quantized = quantize(ov.Core().read_model(f32_file), calibration)
        # As Keras writes the f32 IR: serialize keeps what is not INT8 in f32 (save_model
        # would compress it to f16).
        ov.serialize(quantized, str(out_dir / OPENVINO_INT8_FILE))
