"""Preprocess stage: arrays and labels per split (decoding itself: test_contract.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.hashing import file_sha256
from pipeline.splits import PRODUCTION_TEST, SPLITS, SplitRow, write_split
from stages import preprocess
from tests.support.images import make_image


def test_preprocess_split_maps_labels_to_class_indices(tmp_path):
    paths = []
    for i, color in enumerate([(250, 220, 0), (30, 160, 30)]):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(make_image(color=color))
        paths.append(str(path))
    arrays = preprocess.preprocess_split(paths, ["dandelion", "grass"], ["grass", "dandelion"], 16)
    assert arrays["images"].shape == (2, 16, 16, 3)
    assert arrays["labels"].tolist() == [1, 0]
    assert arrays["paths"].tolist() == paths


def test_unknown_label_is_an_error(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(make_image())
    with pytest.raises(ValueError, match=r"labels \['tulip'\] are not in params 'classes'"):
        preprocess.preprocess_split([str(path)], ["tulip"], ["grass", "dandelion"], 16)


def test_every_split_gets_its_file_an_empty_one_too(tmp_path, monkeypatch):
    """production_test.npz exists before any reviewed photo, so evaluate can depend on it."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        yaml.safe_dump({"classes": ["grass", "dandelion"], "preprocess": {"image_size": 16}})
    )
    rows = []
    for i, split in enumerate(("train", "val", "test")):
        path = Path(f"{i}.jpg")
        path.write_bytes(make_image(seed=i))
        rows.append(SplitRow(str(path), "grass", split, file_sha256(path)))
    write_split(rows, Path("split.csv"))
    preprocess.main(["split.csv", "arrays"])
    assert sorted(p.name for p in Path("arrays").iterdir()) == [f"{s}.npz" for s in sorted(SPLITS)]
    empty = np.load(f"arrays/{PRODUCTION_TEST}.npz")
    assert empty["images"].shape == (0, 16, 16, 3) and empty["labels"].shape == (0,)
    assert empty["paths"].dtype.kind == "U"  # str, as a split with photos has
    assert np.load("arrays/train.npz")["paths"].tolist() == ["0.jpg"]


def test_a_photo_that_is_not_the_split_file_s_stops_the_stage(tmp_path):
    rows = []
    for name, color in (("same", (250, 220, 0)), ("changed", (30, 160, 30)), ("gone", (0, 0, 9))):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(make_image(color=color))
        rows.append(SplitRow(str(path), "grass", "train", file_sha256(path)))
    preprocess.check_photos(rows)  # as split wrote them
    (tmp_path / "changed.jpg").write_bytes(make_image(color=(1, 2, 3)))
    (tmp_path / "gone.jpg").unlink()
    with pytest.raises(preprocess.StageError) as refused:
        preprocess.check_photos(rows)
    message = str(refused.value)
    assert message.startswith("2 photos are not those of the split file")
    assert "changed.jpg is not the photo of sha256" in message and "gone.jpg is missing" in message
    assert "same.jpg" not in message and "dvc pull" in message
