"""Preprocess stage: arrays and labels per split (decoding itself: test_contract.py)."""

from __future__ import annotations

import pytest

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
