"""Inference engines: what turns images into scores, in evaluate and in the service alike.

The export stage writes the trained Keras model into the export directory in the format of
``serve.engine``; evaluate and the service both load that directory with ``load_engine``, so
the scores evaluate reports are the scores the service returns, bit for bit.

- ``openvino``: the model converted to OpenVINO IR in f32: several times faster than Keras
  for one image (docs/benchmarks.md, *Inference engines*), and no TensorFlow in the serving
  image.
- ``openvino-int8`` (default): that IR quantized to INT8 after training by NNCF, calibrated
  on train photos (pipeline/quantize.py), with everything the novelty output reads kept f32;
  the scorer is the f32 IR's, and a bento needs only OpenVINO. Its decisions are held to the
  f32 export's on the real model by a test (docs/pipeline.md, *INT8 engine*).
- ``keras``: the Keras file itself, served by TensorFlow; kept so parity stays testable.

Only NumPy here; each engine's package is imported when that engine is loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from serving.contract import MODEL_FILE

ENGINES = ("openvino", "openvino-int8", "keras")
OPENVINO_FILE = "classifier.xml"  # with its weights in classifier.bin
OPENVINO_INT8_FILE = "classifier-int8.xml"  # with its weights in classifier-int8.bin
# The IR file of each OpenVINO engine; both are scored by the same code.
OPENVINO_FILES = {"openvino": OPENVINO_FILE, "openvino-int8": OPENVINO_INT8_FILE}
# What a bento serving each engine must install besides bentofile.yaml's packages; the package
# stage pins each from constraints.txt (bento builds run offline).
ENGINE_PACKAGES = {
    "openvino": ["openvino"],
    "openvino-int8": ["openvino"],  # NNCF quantizes at export; the IR needs only OpenVINO
    "keras": ["keras", "tensorflow-cpu"],
}

# Whether the service batches concurrent requests for the engine (docs/benchmarks.md,
# *Inference engines*; docs/serving.md): Keras scores an image in a batch much faster than
# alone, so batching raises its throughput. OpenVINO is as fast per image alone as in a batch,
# and the batcher's waiting window only added latency.
BATCHING = {"openvino": False, "openvino-int8": False, "keras": True}
# The BentoML service (bentofile.yaml `service`) a bento serving each engine runs, which the
# package stage sets from the model's engine. Without batching the engine runs in the HTTP
# front's own process; with it, the front calls a batching model service, since BentoML
# batches only between services (serving/service.py). Both fronts are named DandelionService.
SERVICES = {
    engine: f"serving.service:{'BatchingDandelionService' if batching else 'DandelionService'}"
    for engine, batching in BATCHING.items()
}

# (N, size, size, 3) uint8 -> (N, 2) float32: the PROBABILITY and NOVELTY columns (contract)
Scorer = Callable[[np.ndarray], np.ndarray]


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"serve.engine must be one of {list(ENGINES)}, not {engine!r}")
    return engine


def engine_of(directory: Path | str) -> str:
    """Which engine an export directory holds."""
    directory = Path(directory)
    for engine, name in OPENVINO_FILES.items():
        if (directory / name).is_file():
            return engine
    if (directory / MODEL_FILE).is_file():
        return "keras"
    raise FileNotFoundError(f"{directory} holds none of {[*OPENVINO_FILES.values(), MODEL_FILE]}")


def load_engine(directory: Path | str) -> Scorer:
    """The scorer for the model exported in ``directory``: its two outputs per image."""
    directory = Path(directory)
    engine = engine_of(directory)
    if engine in OPENVINO_FILES:
        return _openvino_scorer(directory / OPENVINO_FILES[engine])
    return _keras_scorer(directory / MODEL_FILE)


def openvino_input(image: np.ndarray) -> np.ndarray:
    """One (size, size, 3) uint8 image as the IR takes it: a batch of one, in float32. The
    INT8 export is calibrated on exactly this input (pipeline/quantize.py)."""
    return image[np.newaxis].astype(np.float32)


def _openvino_scorer(path: Path) -> Scorer:
    import openvino as ov

    # f32, not the CPU plugin's default: on CPUs with bfloat16 support OpenVINO would
    # otherwise compute in bf16 and move scores visibly (docs/serving.md, *Inference engine*).
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    output = compiled.output(0)
    lock = threading.Lock()  # one infer request: calls take turns

    def score(images: np.ndarray) -> np.ndarray:
        # One image per inference: on CPU that is as fast per image as a batch, and the
        # engine's buffers stay those of one image; a batch made it keep the buffers of the
        # whole batch for later calls (docs/serving.md, *Inference engine*).
        with lock:
            rows = [request.infer([openvino_input(image)])[output] for image in images]
        return np.asarray(rows, dtype=np.float32).reshape(len(images), 2)

    return score


def _keras_scorer(path: Path) -> Scorer:
    import keras

    model = keras.models.load_model(path, compile=False)

    def score(images: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict_on_batch(images), dtype=np.float32).reshape(len(images), 2)

    return score
