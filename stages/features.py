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
from stages.params import load_params
from stages.split import SPLITS

AUGMENTED_SPLITS = ("train", "val")


def extract_features(
    splits: dict[str, dict[str, np.ndarray]], params: dict, log=print
) -> dict[str, dict[str, np.ndarray]]:
    """Features of every split's ``images``; the same params give the same arrays."""
    make_deterministic(params["seed"])
    image_size = next(iter(splits.values()))["images"].shape[1]
    backbone = build_backbone(image_size, resolve_weights(params["weights"]))
    extractor = assemble(backbone)
    with_probes = probe_extractor(backbone, params["novelty_layers"])
    augmentation = build_augmentation(params["seed"])
    batch_size = params["batch_size"]
    features = {}
    for name, arrays in splits.items():
        started = time.perf_counter()
        images = arrays["images"]
        plain, probes = with_probes.predict(images, batch_size=batch_size, verbose=0)
        out = {
            "plain": plain,
            "probes": probes,
            "flipped": frozen_features(extractor, images[:, :, ::-1], batch_size),
            "labels": arrays["labels"],
            "paths": arrays["paths"],
        }
        if name in AUGMENTED_SPLITS:
            views = [
                frozen_features(extractor, images, batch_size, augmentation)
                for _ in range(params["augment_copies"])
            ]
            out["augmented"] = np.stack(views) if views else out["plain"][np.newaxis][:0]
        features[name] = out
        view_count = 2 + (params["augment_copies"] if name in AUGMENTED_SPLITS else 0)
        log(
            f"features: {name}: {len(images)} photos x {view_count} views "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return features


@exits_in_one_line_without_weights("features")
def main(argv: list[str] | None = None) -> None:
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


if __name__ == "__main__":
    main()
