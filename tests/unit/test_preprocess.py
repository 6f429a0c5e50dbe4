"""Preprocess stage: arrays and labels per split (decoding itself: test_contract.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.hashing import file_sha256, sha256_of
from pipeline.shards import SplitPhotos, write_shards
from pipeline.splits import PRODUCTION_TEST, SPLITS, SplitRow, write_split
from serving.contract import load_image
from stages import preprocess
from tests.support.images import make_image


def test_preprocess_split_maps_labels_to_class_indices(tmp_path):
    """A photo of the raw shards and a reviewed photo on disk, each decoded as the service
    decodes an upload."""
    raw, reviewed = make_image(color=(250, 220, 0)), make_image(color=(30, 160, 30))
    write_shards([("dandelion/0.jpg", raw)], tmp_path / "raw", shard_photos=10)
    (tmp_path / "reviewed.jpg").write_bytes(reviewed)
    paths = [str(tmp_path / "raw" / "dandelion" / "0.jpg"), str(tmp_path / "reviewed.jpg")]
    photos = SplitPhotos(tmp_path / "raw")
    arrays = preprocess.preprocess_split(
        photos, paths, ["dandelion", "grass"], ["grass", "dandelion"], 16
    )
    assert arrays["images"].shape == (2, 16, 16, 3)
    assert arrays["images"].tolist() == [
        load_image(io.BytesIO(photo), 16).tolist() for photo in (raw, reviewed)
    ]
    assert arrays["labels"].tolist() == [1, 0]
    assert arrays["paths"].tolist() == paths


def test_unknown_label_is_an_error(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(make_image())
    with pytest.raises(ValueError, match=r"labels \['tulip'\] are not in params 'classes'"):
        preprocess.preprocess_split(
            SplitPhotos(tmp_path / "raw"), [str(path)], ["tulip"], ["grass", "dandelion"], 16
        )


def test_every_split_gets_its_file_an_empty_one_too(tmp_path, monkeypatch):
    """production_test.npz exists before any reviewed photo, so evaluate can depend on it."""
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        yaml.safe_dump({"classes": ["grass", "dandelion"], "preprocess": {"image_size": 16}})
    )
    photos = [(f"grass/{i}.jpg", make_image(seed=i)) for i in range(3)]
    write_shards(photos, Path("raw"), shard_photos=2)
    rows = [
        SplitRow(f"raw/{name}", "grass", split, sha256_of(data))
        for (name, data), split in zip(photos, ("train", "val", "test"), strict=True)
    ]
    write_split(rows, Path("split.csv"))
    preprocess.main(["split.csv", "raw", "arrays"])
    assert sorted(p.name for p in Path("arrays").iterdir()) == [f"{s}.npz" for s in sorted(SPLITS)]
    empty = np.load(f"arrays/{PRODUCTION_TEST}.npz")
    assert empty["images"].shape == (0, 16, 16, 3) and empty["labels"].shape == (0,)
    assert empty["paths"].dtype.kind == "U"  # str, as a split with photos has
    assert np.load("arrays/train.npz")["paths"].tolist() == ["raw/grass/0.jpg"]


def test_a_photo_that_is_not_the_split_file_s_stops_the_stage(tmp_path):
    """Reviewed photos (files) and raw ones (in the shards) alike."""
    rows, raw = [], []
    for name, color in (("changed", (30, 160, 30)), ("same", (250, 220, 0)), ("gone", (0, 0, 9))):
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(make_image(color=color))
        rows.append(SplitRow(str(path), "grass", "train", file_sha256(path)))
        raw.append((f"grass/raw-{name}.jpg", make_image(color=color)))
        rows.append(
            SplitRow(str(tmp_path / "raw" / raw[-1][0]), "grass", "train", file_sha256(path))
        )
    write_shards(raw, tmp_path / "raw", shard_photos=10)
    photos = SplitPhotos(tmp_path / "raw")
    preprocess.check_photos(photos, rows)  # as split wrote them
    (tmp_path / "changed.jpg").write_bytes(make_image(color=(1, 2, 3)))
    (tmp_path / "gone.jpg").unlink()
    raw[0] = (raw[0][0], make_image(color=(1, 2, 3)))
    write_shards(raw[:2], tmp_path / "raw", shard_photos=10)
    photos = SplitPhotos(tmp_path / "raw")
    for kept in (rows[0::2], rows[1::2]):  # the reviewed photos, the raw ones
        with pytest.raises(preprocess.StageError) as refused:
            preprocess.check_photos(photos, kept)
        message = str(refused.value)
        assert message.startswith("2 photos are not those of the split file")
        changed, same, gone = (Path(row.path).name for row in kept)
        assert f"{changed} is not the photo of sha256" in message
        assert f"{gone} is missing" in message
        assert same not in message and "dvc pull" in message


def test_a_raw_dir_of_one_file_per_photo_stops_the_stage_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        yaml.safe_dump({"classes": ["grass", "dandelion"], "preprocess": {"image_size": 16}})
    )
    Path("raw/grass").mkdir(parents=True)
    Path("raw/grass/0.jpg").write_bytes(make_image())
    write_split(
        [SplitRow("raw/grass/0.jpg", "grass", "train", file_sha256("raw/grass/0.jpg"))],
        Path("split.csv"),
    )
    with pytest.raises(SystemExit) as stopped:
        preprocess.main(["split.csv", "raw", "arrays"])
    assert str(stopped.value.code).startswith(
        "preprocess failed: raw holds photos one file each (grass/...), the layout before shards"
    )
