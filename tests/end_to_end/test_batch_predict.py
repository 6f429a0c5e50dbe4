"""`dandelion predict-batch` on the reproduced pipeline's export: every test photo gets the
answer the served bento gives it over `POST /predict`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support.processes import dandelion
from tests.support.ray_cluster import without_ray
from tests.support.service import served_answers, split_photos

pytestmark = pytest.mark.slow
# The fields of a /predict answer that a batch row has too (not answer_id, random per answer,
# nor the bento's model_version: an export has no card).
ANSWER_FIELDS = ("label", "confidence", "probabilities", "neither", "novelty")


def test_every_test_photo_gets_the_answer_of_post_predict(reproduced, service, tmp_path):
    photos = tmp_path / "photos"
    for label, path in split_photos(reproduced.workspace):
        (photos / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, photos / label / Path(path).name)
    out = tmp_path / "predictions.parquet"
    # As a user runs it in the project's root: data/export, params.yaml; in this process.
    result = dandelion(
        reproduced.workspace,
        *("predict-batch", str(photos), "--out", str(out)),
        env=without_ray(reproduced.env),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"60 files of {photos}: 60 answered (" in result.stdout
    assert "0 unreadable (none)" in result.stdout
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 60
    answers = served_answers(service.url, [str(photos / row["path"]) for row in rows])
    for row, answer in zip(rows, answers, strict=True):
        assert row["error"] is None
        assert {key: row[key] for key in ANSWER_FIELDS} == {
            key: answer[key] for key in ANSWER_FIELDS
        }, row["path"]
