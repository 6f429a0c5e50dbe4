"""The accuracy guard of the INT8 engine, on the real model the pipeline trains.

The INT8 export may serve (params.yaml ``serve.engine: openvino-int8``) only while it decides
as the f32 export does: on the test photos, labels equal except at most one photo and the ROC
AUC at most 0.005 lower; "neither" flagged on as many test photos and generated pictures
(evaluate's unlike_pictures), within one each. docs/pipeline.md, *INT8 engine*, has the table.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics

from pipeline.export import export_model
from pipeline.params import EvaluateParams, QuantizeParams, classes
from pipeline.quantize import calibration_set
from serving.contract import MODEL_FILE, NOVELTY, PROBABILITY, DecisionRule
from serving.engines import engine_of, load_engine
from stages.evaluate import score_in_chunks, unlike_pictures
from tests.support.paths import PIPELINE_PATHS

pytestmark = pytest.mark.slow


def test_the_int8_export_decides_as_the_f32_export(reproduced, tmp_path):
    workspace = reproduced.workspace
    params = workspace / "params.yaml"
    rule = DecisionRule(tuple(classes(params)), EvaluateParams.load(params).threshold)
    arrays = workspace / PIPELINE_PATHS["arrays_dir"]
    train, test = np.load(arrays / "train.npz"), np.load(arrays / "test.npz")
    keras_file = workspace / PIPELINE_PATHS["model_dir"] / MODEL_FILE
    calibration = calibration_set(train["images"], QuantizeParams.load(params))
    export_model(keras_file, tmp_path / "f32", "openvino")
    export_model(keras_file, tmp_path / "int8", "openvino-int8", calibration)
    assert engine_of(tmp_path / "int8") == "openvino-int8"

    unlike = unlike_pictures(test["images"].shape[1])
    found = {}
    for name in ("f32", "int8"):
        score = load_engine(tmp_path / name)
        tested, generated = score_in_chunks(score, test["images"]), score_in_chunks(score, unlike)
        found[name] = {
            "outputs": np.concatenate([tested, generated]),
            "labels": rule.predict(tested[:, PROBABILITY]),
            "auc": metrics.roc_auc_score(test["labels"], tested[:, PROBABILITY]),
            "neither_test": int(rule.neither(tested[:, NOVELTY]).sum()),
            "neither_generated": int(rule.neither(generated[:, NOVELTY]).sum()),
        }
    f32, int8 = found["f32"], found["int8"]
    differences = np.abs(f32["outputs"] - int8["outputs"]).max(axis=0)
    changed = int((f32["labels"] != int8["labels"]).sum())
    print(
        f"f32 / INT8 on {len(test['labels'])} test photos and {len(unlike)} generated pictures: "
        f"labels differ on {changed}; "
        + "; ".join(f"{key} {f32[key]:.4g} / {int8[key]:.4g}" for key in list(f32)[2:])
        + f"; largest score difference {differences[PROBABILITY]:.4f}, "
        f"novelty difference {differences[NOVELTY]:.4f}"
    )
    assert changed <= 1
    assert f32["auc"] - int8["auc"] <= 0.005
    assert abs(f32["neither_test"] - int8["neither_test"]) <= 1
    assert abs(f32["neither_generated"] - int8["neither_generated"]) <= 1
