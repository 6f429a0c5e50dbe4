"""Post-training INT8 quantization of the OpenVINO IR with NNCF: the ``openvino-int8`` engine.

NNCF runs the f32 IR on calibration photos, sets each quantized activation's range from what
it sees, and writes 8-bit weights. The photos come from the train split only
(``calibration_set``), drawn by ``quantize.seed``, and go through the IR's own input as the
scorer feeds it (serving/engines.py ``openvino_input``).

Everything the NOVELTY output reads stays f32 (an NNCF ignored scope): the backbone up to the
last of ``features.novelty_layers``, and the novelty branch itself. The novelty score is a
Mahalanobis distance, which magnifies the rounding of those activations in the directions the
train photos barely vary in; quantized, it moved enough to flip "neither" on 3 of the 24
generated pictures (docs/pipeline.md, *INT8 engine*). The classifier's own layers after that
point are INT8.

The same IR and calibration photos give the same bytes in every fresh process, on 1 or 2
threads (docs/pipeline.md): NNCF collects its statistics with OpenVINO in f32, and in order.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.params import QuantizeParams
from serving.contract import NOVELTY
from serving.engines import openvino_input


def calibration_set(train_images: np.ndarray, params: QuantizeParams) -> np.ndarray:
    """``params.calibration_photos`` of ``train_images``, drawn without replacement by
    ``params.seed``, in their split order."""
    if params.calibration_photos > len(train_images):
        raise ValueError(
            f"quantize.calibration_photos is {params.calibration_photos}, but the train split "
            f"holds only {len(train_images)} photos"
        )
    rng = np.random.default_rng(params.seed)
    chosen = rng.choice(len(train_images), params.calibration_photos, replace=False)
    return train_images[np.sort(chosen)]


def check_calibration(calibration: np.ndarray | None, image_shape: tuple[int, ...]) -> None:
    """A clear error unless ``calibration`` is uint8 images of ``image_shape``, at least one."""
    if calibration is None:
        raise ValueError(
            "the openvino-int8 export needs calibration images (train photos): none were given"
        )
    calibration = np.asarray(calibration)
    if calibration.dtype != np.uint8 or calibration.shape[1:] != tuple(image_shape):
        raise ValueError(
            f"calibration must be uint8 images of shape (N, {', '.join(map(str, image_shape))}), "
            f"not {calibration.dtype} of shape {calibration.shape}"
        )
    if not len(calibration):
        raise ValueError("calibration holds no image: the openvino-int8 export needs some")


def novelty_operations(model) -> list[str]:
    """The names of every operation the IR's NOVELTY output depends on (constants and the
    input excepted). The model ends in one Concatenate of its two columns (contract)."""
    (result,) = model.get_results()
    concat = result.input(0).get_source_output().get_node()
    if concat.get_type_name() != "Concat" or len(concat.inputs()) <= NOVELTY:
        raise ValueError(
            "the model's output is not the concatenation of its probability and novelty "
            f"columns (serving/contract.py), but a {concat.get_type_name()}"
        )
    names: set[str] = set()
    pending = [concat.input(NOVELTY).get_source_output().get_node()]
    while pending:
        node = pending.pop()
        if node.get_type_name() in ("Constant", "Parameter") or node.get_friendly_name() in names:
            continue
        names.add(node.get_friendly_name())
        pending.extend(port.get_source_output().get_node() for port in node.inputs())
    return sorted(names)


def quantize(model, calibration: np.ndarray):
    """The f32 OpenVINO ``model`` with INT8 weights and activations, calibrated on every image
    of ``calibration``, its novelty path left in f32."""
    import nncf

    nncf.set_log_level(logging.WARNING)  # not one INFO line per quantizer it skips
    return nncf.quantize(
        model,
        nncf.Dataset(list(calibration), openvino_input),
        subset_size=len(calibration),  # all of them, not NNCF's default of 300 at most
        ignored_scope=nncf.IgnoredScope(names=novelty_operations(model)),
    )
