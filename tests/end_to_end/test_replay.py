"""`dandelion replay` on the pipeline's own model: a log of the 60 test photos, replayed with
the bento and with the export, agrees with what evaluate decided for each photo."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from serving.contract import MODEL_NAME
from serving.prediction_log import PredictionLog
from tests.support.paths import PIPELINE_PATHS
from tests.support.processes import dandelion
from tests.support.service import evaluated_predictions

pytestmark = pytest.mark.slow


def test_replay_agrees_with_evaluate_on_the_test_photos(reproduced, tmp_path):
    predictions = evaluated_predictions(reproduced.workspace)
    log = PredictionLog(("files",), tmp_path / "log", keep_photos=True)
    log.start()
    for number, prediction in enumerate(predictions):
        photo = Path(prediction.photo).read_bytes()
        label = prediction.predicted
        if number == 1:  # one answer logged wrong: replay must say so
            label = next(name for name in ("grass", "dandelion") if name != label)
        record = {
            "answer_id": f"answer-{number}",
            "photo_sha256": hashlib.sha256(photo).hexdigest(),
            "model_version": "evaluate",
            "role": "champion",
            "shadow": False,
            "label": label,
            "neither": prediction.novelty > 1,
            "score": prediction.score,
        }
        log.record(record, photo if number else None)  # the first one's photo not kept
    log.stop(30)

    for model in (PIPELINE_PATHS["bento_archive"], PIPELINE_PATHS["export_dir"]):
        out = tmp_path / f"{Path(model).name}.csv"
        result = dandelion(
            reproduced.workspace,
            "replay",
            str(tmp_path / "log"),
            "--with",
            model,
            "--out",
            str(out),
            env=reproduced.env,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[-1] == "replayed 59, agreement 0.9831 (58/59), 1 without a photo"
        assert "not replayed: answer answer-0: no photo kept" in result.stdout
        if model.endswith(".bento"):
            assert f"({MODEL_NAME}:" in lines[0]
        with open(out, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [row["answer_id"] for row in rows] == [f"answer-{n}" for n in range(60)]
        assert [row["agree"] for row in rows[:3]] == ["", "False", "True"]
        for row, prediction in zip(rows[1:], predictions[1:], strict=True):
            assert row["replayed_label"] == prediction.predicted
            # evaluate writes scores with 6 decimals
            assert abs(float(row["replayed_score"]) - prediction.score) <= 5e-7
