"""The frozen backbone's features of every photo, in every view the training uses.

Per split: ``plain`` (each photo as preprocessed), ``probes`` (the pooled activations of the
backbone's ``novelty_layers``: novelty's input, pipeline/novelty.py), ``flipped`` (its mirror
image) and, for train and val, ``augmented``: ``augment_copies`` random views (flip, rotate,
zoom) per photo, shape ``(copies, photos, features)``; ``labels`` and ``paths`` as given.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from pipeline.backbone import (
    assemble,
    build_augmentation,
    build_backbone,
    frozen_features,
    make_deterministic,
    probe_extractor,
)
from pipeline.logs import PROGRESS_EVERY_SECONDS, Progress
from pipeline.params import FeaturesParams
from pipeline.weights import resolve_weights

AUGMENTED_SPLITS = ("train", "val")  # cross-validation trains on val photos too


class CountViews(keras.callbacks.Callback):
    """Advances ``progress`` by each batch's photos as ``predict()`` ends the batch."""

    def __init__(self, progress: Progress, photos: int, batch_size: int, detail: str):
        super().__init__()
        self.progress, self.detail = progress, detail
        self.photos, self.batch_size = photos, batch_size

    def on_predict_batch_end(self, batch: int, logs=None) -> None:
        in_batch = min(self.batch_size, self.photos - batch * self.batch_size)
        self.progress.advance(in_batch, self.detail)


def view_names(split: str, augment_copies: int) -> list[str]:
    """The views of each photo of ``split`` that are computed, in order."""
    augmented = augment_copies if split in AUGMENTED_SPLITS else 0
    return ["plain", "flipped", *(f"augmented {i + 1}" for i in range(augmented))]


def extract_features(
    splits: dict[str, dict[str, np.ndarray]],
    params: FeaturesParams,
    log=print,
    every: float = PROGRESS_EVERY_SECONDS,
) -> dict[str, dict[str, np.ndarray]]:
    """Features of every split's ``images``; the same params give the same arrays.

    ``log`` gets a progress line at most every ``every`` seconds, and one per split.
    """
    make_deterministic(params.seed)
    image_size = next(iter(splits.values()))["images"].shape[1]
    backbone = build_backbone(image_size, resolve_weights(params.weights))
    extractor = assemble(backbone)
    with_probes = probe_extractor(backbone, params.novelty_layers)
    augmentation = build_augmentation(params.seed)
    batch_size = params.batch_size
    views = {name: view_names(name, params.augment_copies) for name in splits}
    progress = Progress(
        "features",
        sum(len(arrays["images"]) * len(views[name]) for name, arrays in splits.items()),
        "photo views",
        every,
        log,
    )

    def counted(name: str, view: str, photos: int) -> list[keras.callbacks.Callback]:
        return [CountViews(progress, photos, batch_size, f"{name}: {view}")]

    features = {}
    for name, arrays in splits.items():
        started = time.perf_counter()
        images = arrays["images"]
        count = len(images)
        plain, probes = with_probes.predict(
            images, batch_size=batch_size, verbose=0, callbacks=counted(name, "plain", count)
        )
        flipped = frozen_features(
            extractor, images[:, :, ::-1], batch_size, callbacks=counted(name, "flipped", count)
        )
        out = {
            "plain": plain,
            "probes": probes,
            "flipped": flipped,
            "labels": arrays["labels"],
            "paths": arrays["paths"],
        }
        if name in AUGMENTED_SPLITS:
            augmented = [
                frozen_features(
                    extractor,
                    images,
                    batch_size,
                    augmentation,
                    callbacks=counted(name, view, count),
                )
                for view in views[name][2:]
            ]
            out["augmented"] = np.stack(augmented) if augmented else out["plain"][np.newaxis][:0]
        features[name] = out
        log(
            f"features: {name}: {count} photos x {len(views[name])} views "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return features
