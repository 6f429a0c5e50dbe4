"""`dandelion replay` (pipeline/replay.py) on a small generated Keras model and a log the
prediction log wrote; the real model and bento are replayed in tests/end_to_end/test_replay.py."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from pipeline.replay import ReplayError, replay
from serving.contract import MODEL_FILE, MODEL_NAME, ModelCard, load_image
from serving.engines import load_engine
from serving.prediction_log import PredictionLog
from tests.support.images import make_image
from tests.support.paths import PARAMS_FILE

SIZE = 32


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """An export directory (Keras engine) of a small model with the contract's two outputs,
    on SIZE px images."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    probability = keras.layers.Dense(1, activation="sigmoid")(x)
    novelty = keras.layers.Dense(1, activation="softplus")(x)
    directory = tmp_path_factory.mktemp("export")
    model = keras.Model(inputs, keras.layers.Concatenate()([probability, novelty]))
    model.save(directory / MODEL_FILE)
    return directory


@pytest.fixture
def params(tmp_path) -> Path:
    """The project's params.yaml, for SIZE px images."""
    values = yaml.safe_load(PARAMS_FILE.read_text())
    values["preprocess"]["image_size"] = SIZE
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def photos() -> list[bytes]:
    return [make_image(color=(40 * n, 200 - 30 * n, 60), seed=n) for n in range(6)]


def expected(export: Path, photo: bytes, threshold: float) -> tuple[str, bool, float]:
    """The model's answer as a person would compute it: decode, score, threshold."""
    score, novelty = load_engine(export)(load_image(io.BytesIO(photo), SIZE)[None])[0]
    label = "dandelion" if np.float32(score) >= np.float32(threshold) else "grass"
    return label, bool(novelty > 1), float(score)


def write_log(directory: Path, export: Path, lying: int) -> list[dict]:
    """A log of the photos' answers (the one numbered ``lying`` with the other label), each
    photo kept but the last one's, and a shadow record beside the first."""
    log = PredictionLog(("files",), directory, keep_photos=True)
    log.start()
    records = []
    for number, photo in enumerate(photos()):
        label, neither, score = expected(export, photo, 0.5)
        if number == lying:
            label = {"grass": "dandelion", "dandelion": "grass"}[label]
        record = {
            "answer_id": f"answer-{number}",
            "photo_sha256": hashlib.sha256(photo).hexdigest(),
            "model_version": "champion0000000",
            "role": "champion",
            "shadow": False,
            "label": label,
            "neither": neither,
            "score": score,
        }
        records.append(record)
        log.record(record, photo if number < 5 else None)
        if number == 0:
            shadow = {**record, "model_version": "challenger00000", "role": "challenger"}
            records.append({**shadow, "shadow": True})
            log.record({**shadow, "shadow": True})  # its photo already given
    log.stop(10)
    return records


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_replay_with_an_export_writes_a_row_per_record(tmp_path, export, params):
    records = write_log(tmp_path / "log", export, lying=2)
    summary = replay(str(tmp_path / "log"), export, tmp_path / "replay.csv", params)

    rows = read_rows(tmp_path / "replay.csv")
    assert [row["answer_id"] for row in rows] == [record["answer_id"] for record in records]
    photo_of = {hashlib.sha256(photo).hexdigest(): photo for photo in photos()}
    for row, record in zip(rows, records, strict=True):
        photo = photo_of[record["photo_sha256"]]
        if record["answer_id"] == "answer-5":
            assert row["note"] == "no photo kept" and row["replayed_label"] == row["agree"] == ""
            continue
        label, neither, score = expected(export, photo, 0.5)
        assert (row["replayed_label"], row["replayed_neither"]) == (label, str(neither))
        assert float(row["replayed_score"]) == score
        assert row["agree"] == str(record["answer_id"] != "answer-2")
    assert summary.splitlines()[-1] == ("replayed 6, agreement 0.8333 (5/6), 1 without a photo")
    assert "logged by challenger00000: 1/1 agree" in summary
    assert "logged by champion0000000: 4/5 agree" in summary
    assert "not replayed: answer answer-5: no photo kept" in summary


def test_replay_with_a_bento_decides_with_its_card(tmp_path, export, params):
    write_log(tmp_path / "log", export, lying=-1)
    # Just past the score nearest 0.5, on its other side: that photo's label changes.
    scores = [expected(export, photo, 0.5)[2] for photo in photos()[:5]]
    nearest = min(scores, key=lambda score: abs(score - 0.5))
    threshold = nearest + 1e-6 if nearest >= 0.5 else nearest - 1e-6
    card = ModelCard(
        version="0123456789abcdef",
        model_sha256="0" * 64,
        engine="keras",
        dvc_md5="0" * 32 + ".dir",
        classes=["grass", "dandelion"],
        threshold=threshold,
        image_size=SIZE,
        serve={"max_upload_bytes": 10**6, "min_side": 8, "max_pixels": 10**6},
        train_params={},
        test_metrics={},
    )
    archive = tmp_path / "model.bento"
    with tarfile.open(archive, "w:xz") as tar:
        folder = f"models/{MODEL_NAME}/{card.version}"
        for name, data in (
            ("model.yaml", yaml.safe_dump({"name": MODEL_NAME, "metadata": card.to_metadata()})),
            (MODEL_FILE, (export / MODEL_FILE).read_bytes()),
        ):
            data = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    summary = replay(str(tmp_path / "log"), archive, tmp_path / "replay.csv")
    assert f"replayed with the bento {archive} ({MODEL_NAME}:{card.version})" in summary
    rows = [row for row in read_rows(tmp_path / "replay.csv") if not row["note"]]
    changed = [row for row in rows if row["agree"] == "False"]
    assert len(changed) >= 1
    for row in rows:
        assert row["replayed_label"] == (
            "dandelion" if float(row["score"]) >= threshold else "grass"
        )


def test_replay_refuses_what_it_cannot_read(tmp_path, export, params):
    with pytest.raises(ReplayError, match="no prediction log in"):
        replay(str(tmp_path / "nowhere"), export, tmp_path / "out.csv", params)
    write_log(tmp_path / "log", export, lying=-1)
    with pytest.raises(ReplayError, match="no such bento archive or export directory"):
        replay(str(tmp_path / "log"), tmp_path / "missing.bento", tmp_path / "out.csv")
    (tmp_path / "empty.bento").write_bytes(b"not a tar")
    with pytest.raises(ReplayError, match="is not a bento archive"):
        replay(str(tmp_path / "log"), tmp_path / "empty.bento", tmp_path / "out.csv")
