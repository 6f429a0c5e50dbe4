"""Features stage: the frozen backbone's features of every photo, computed once and cached.

Training a head on frozen features gives the same model as running the frozen backbone in
every epoch, so the backbone's work is done here, once per change of the photos or of these
parameters; the train stage and every ``dvc exp run`` sweep over head parameters reuse it.
Per split (``<split>.npz``):

- ``plain``: features of each photo as preprocessed;
- ``probes``: the pooled activations of the backbone's ``novelty_layers`` (the input of the
  model's novelty, its "neither" signal; stages/train.py);
- ``flipped``: of its mirror image (test-time flip averaging);
- ``augmented`` (train and val): ``augment_copies`` random views (flip, rotate, zoom) per
  photo, shape ``(copies, photos, features)``; cross-validation trains on val photos too;
- ``labels`` and ``paths``, as in the preprocess stage's arrays.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np

from stages.backbone import (
    assemble,
    build_augmentation,
    build_backbone,
    exits_in_one_line_without_weights,
    frozen_features,
    make_deterministic,
    probe_extractor,
    resolve_weights,
)
from stages.logs import PROGRESS_EVERY_SECONDS, Progress, summarised
from stages.params import load_params
from stages.split import SPLITS

AUGMENTED_SPLITS = ("train", "val")


class CountViews(keras.callbacks.Callback):
    """Advances ``progress`` by each batch's photos as ``predict()`` ends the batch."""

    def __init__(self, progress: Progress, photos: int, batch_size: int, detail: str):
        super().__init__()
        self.progress, self.detail = progress, detail
        self.photos, self.batch_size = photos, batch_size

    def on_predict_batch_end(self, batch: int, logs=None) -> None:
        in_batch = min(self.batch_size, self.photos - batch * self.batch_size)
        self.progress.advance(in_batch, self.detail)


def extract_features(
    splits: dict[str, dict[str, np.ndarray]],
    params: dict,
    log=print,
    every: float = PROGRESS_EVERY_SECONDS,
) -> dict[str, dict[str, np.ndarray]]:
    """Features of every split's ``images``; the same params give the same arrays.

    ``log`` gets a progress line at most every ``every`` seconds, and one per split.
    """
    make_deterministic(params["seed"])
    image_size = next(iter(splits.values()))["images"].shape[1]
    backbone = build_backbone(image_size, resolve_weights(params["weights"]))
    extractor = assemble(backbone)
    with_probes = probe_extractor(backbone, params["novelty_layers"])
    augmentation = build_augmentation(params["seed"])
    batch_size = params["batch_size"]
    views = {name: view_names(name, params["augment_copies"]) for name in splits}
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
            augmented = []
            for view in views[name][2:]:
                augmented.append(
                    frozen_features(
                        extractor,
                        images,
                        batch_size,
                        augmentation,
                        callbacks=counted(name, view, count),
                    )
                )
            out["augmented"] = np.stack(augmented) if augmented else out["plain"][np.newaxis][:0]
        features[name] = out
        log(
            f"features: {name}: {count} photos x {len(views[name])} views "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return features


def view_names(split: str, augment_copies: int) -> list[str]:
    """The views of each photo of ``split`` the stage computes, in order."""
    augmented = augment_copies if split in AUGMENTED_SPLITS else 0
    return ["plain", "flipped", *(f"augmented {i + 1}" for i in range(augmented))]


@summarised("features")
@exits_in_one_line_without_weights("features")
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("arrays_dir", type=Path, help="preprocess stage output")
    parser.add_argument("features_dir", type=Path)
    args = parser.parse_args(argv)

    params = load_params()["features"]
    splits = {split: dict(np.load(args.arrays_dir / f"{split}.npz")) for split in SPLITS}
    features = extract_features(splits, params, log=lambda line: print(line, flush=True))
    args.features_dir.mkdir(parents=True, exist_ok=True)
    for split, arrays in features.items():
        np.savez(args.features_dir / f"{split}.npz", **arrays)
    photos = sum(len(arrays["labels"]) for arrays in features.values())
    return f"{len(features)} splits, {photos:,} photos -> {args.features_dir}"


if __name__ == "__main__":
    main()
