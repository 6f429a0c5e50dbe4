"""pipeline/features.py's plan of batches, and each augmented batch's random state: what lets
any worker compute any batch (the bytes on a cluster: tests/end_to_end/test_ray_features.py)."""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.backbone import build_augmentation
from pipeline.features import AugmentationDraws, Batch, plan
from pipeline.params import FeaturesParams
from tests.support.paths import PARAMS_FILE

PARAMS = dataclasses.replace(FeaturesParams.load(PARAMS_FILE), batch_size=4, augment_copies=2)


def test_the_plan_covers_every_view_of_every_photo_in_the_stages_order():
    batches = plan({"train": 6, "test": 3}, PARAMS)
    assert [(b.split, b.view, b.start, b.stop, b.draw) for b in batches] == [
        ("train", "plain", 0, 4, None),
        ("train", "plain", 4, 6, None),
        ("train", "flipped", 0, 4, None),
        ("train", "flipped", 4, 6, None),
        ("train", "augmented 1", 0, 4, 0),
        ("train", "augmented 1", 4, 6, 1),
        ("train", "augmented 2", 0, 4, 2),
        ("train", "augmented 2", 4, 6, 3),
        ("test", "plain", 0, 3, None),  # no augmented views of test photos
        ("test", "flipped", 0, 3, None),
    ]
    assert Batch("train", "plain", 4, 6).photos == 2


def test_an_augmented_batch_seeked_to_its_draw_is_the_one_drawn_in_order():
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 16, 16, 3)).astype("float32")
    sequential = build_augmentation(PARAMS.seed)
    in_order = [np.asarray(sequential(batch, training=True)) for batch in images]
    assert not np.array_equal(in_order[1], np.asarray(sequential(images[1], training=True)))
    alone = build_augmentation(PARAMS.seed)
    draws = AugmentationDraws(alone, 16)  # calls the augmentation itself, then rewinds
    for draw in (2, 0, 1):  # any order
        draws.seek(draw)
        np.testing.assert_array_equal(
            np.asarray(alone(images[draw], training=True)), in_order[draw]
        )
