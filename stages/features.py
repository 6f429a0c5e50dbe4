"""Features stage: the frozen backbone's features of every photo, computed once and cached.

Training a head on frozen features gives the same model as running the frozen backbone in
every epoch, so the backbone's work is done here, once per change of the photos or of these
parameters; the train stage and every ``dvc exp run`` sweep over head parameters reuse it.
What each split's ``<split>.npz`` holds: pipeline/features.py.
"""

from __future__ import annotations

import numpy as np

from pipeline.cluster import ray_address
from pipeline.logs import import_tensorflow_quietly
from pipeline.params import FeaturesParams
from pipeline.splits import FEATURE_SPLITS
from pipeline.stage import arguments, summarised


@summarised("features")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "arrays_dir", "features_dir")
    params = FeaturesParams.load()
    import_tensorflow_quietly()
    from pipeline.features import extract_features  # TensorFlow: after its logging is set

    splits = {split: dict(np.load(args.arrays_dir / f"{split}.npz")) for split in FEATURE_SPLITS}
    log = lambda line: print(line, flush=True)  # noqa: E731
    # On the Ray cluster at RAY_ADDRESS if set (the same bytes), else in this process.
    features = extract_features(splits, params, log=log, address=ray_address())
    args.features_dir.mkdir(parents=True, exist_ok=True)
    for split, arrays in features.items():
        np.savez(args.features_dir / f"{split}.npz", **arrays)
    photos = sum(len(arrays["labels"]) for arrays in features.values())
    return f"{len(features)} splits, {photos:,} photos -> {args.features_dir}"


if __name__ == "__main__":
    main()
