"""Cross-validation stage: which training recipe generalises, measured without the test split.

Opt-in (``dvc repro crossval/dvc.yaml``), separate from the pipeline that builds the served
model. Every recipe of ``crossval.recipes`` is trained on k-1 of ``crossval.folds`` folds of
the train and val photos and scored on the held-out one (pipeline/crossval.py); the metrics
file gives every recipe's fold accuracies, mean and standard deviation. The test split is never
read here: it stays the final, single check of the chosen model.

The out-of-fold scores of ``crossval.noise_recipe`` become the label-noise report: every
photo whose score for the other class is at least ``crossval.noise_confidence``, as a CSV and
a contact sheet to review (pipeline/label_noise.py).
"""

from __future__ import annotations

import json

import numpy as np

from pipeline.label_noise import confident_contradictions, write_noise_report
from pipeline.logs import import_tensorflow_quietly
from pipeline.params import CrossvalParams, FeaturesParams, SplitParams, TrainParams, classes
from pipeline.splits import read_split
from pipeline.stage import arguments, summarised


@summarised("crossval")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "split_csv", "arrays_dir", "features_dir", "out_dir")
    import_tensorflow_quietly()
    from pipeline import crossval  # TensorFlow: after its logging is set

    setup = crossval.Setup(
        TrainParams.load(),
        CrossvalParams.load(),
        FeaturesParams.load(),
        SplitParams.load().val_ratio,
    )
    crossval.check_recipes(setup.crossval)  # before minutes of work, not after
    splits = crossval.POOLED_SPLITS
    photos = crossval.pooled({s: dict(np.load(args.features_dir / f"{s}.npz")) for s in splits})
    hashes = {row.path: row.sha256 for row in read_split(args.split_csv)}
    groups = [hashes[str(path)] for path in photos["paths"]]
    images = np.concatenate([np.load(args.arrays_dir / f"{s}.npz")["images"] for s in splits])
    if crossval.IMAGE_RECIPES & set(setup.crossval.recipes):
        photos["images"] = images

    metrics, out_of_fold = crossval.cross_validate(
        photos, groups, setup, log=lambda line: print(line, flush=True)
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    recipe, confidence = setup.crossval.noise_recipe, setup.crossval.noise_confidence
    rows = confident_contradictions(photos["labels"], out_of_fold[recipe], confidence)
    write_noise_report(args.out_dir, photos, images, rows, out_of_fold[recipe], classes(), recipe)
    return (
        f"{len(setup.crossval.recipes)} recipes x {setup.crossval.folds} folds; {len(rows)} of "
        f"{len(images)} photos contradicted at >= {confidence} by {recipe} -> {args.out_dir}"
    )


if __name__ == "__main__":
    main()
