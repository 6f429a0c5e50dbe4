"""Features throughput: photo views per second in process, and on a local Ray cluster with 1
and with 2 workers (pipeline/ray_features.py).

Reads the preprocess stage's arrays (after `dvc repro` or `dvc pull`), takes up to ``--photos``
photos of each split, and runs the features computation three ways on the same input, with the
params of params.yaml. The cluster is a local `ray start --head` (2 CPUs, token authentication
on, loopback; tests/support/ray_cluster.py), stopped at the end. Each way's wall time includes
building the backbone (per worker on the cluster), as a stage run pays it; every way must give
the same arrays. Run it on a quiet machine: the load average is printed before and after.

    KERAS_HOME=... python -m benchmarks.ray_throughput [--arrays data/preprocessed] [--photos 400]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.logs import import_tensorflow_quietly
from pipeline.params import FeaturesParams
from pipeline.splits import FEATURE_SPLITS
from tests.support.paths import PARAMS_FILE, PIPELINE_PATHS, REPO_ROOT
from tests.support.ray_cluster import local_ray_cluster

WORKERS = (1, 2)


def load_splits(arrays_dir: Path, photos: int) -> dict[str, dict[str, np.ndarray]]:
    splits = {split: dict(np.load(arrays_dir / f"{split}.npz")) for split in FEATURE_SPLITS}
    return {name: {k: v[:photos] for k, v in arrays.items()} for name, arrays in splits.items()}


def timed(extract, splits, params, **where) -> tuple[float, dict]:
    started = time.perf_counter()
    features = extract(splits, params, log=lambda line: None, **where)
    return time.perf_counter() - started, features


def same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[s][k], b[s][k]) for s in a for k in a[s])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=Path, default=REPO_ROOT / PIPELINE_PATHS["arrays_dir"])
    parser.add_argument("--photos", type=int, default=400, help="at most this many per split")
    args = parser.parse_args()
    import_tensorflow_quietly()
    from pipeline.features import extract_features, plan

    params = FeaturesParams.load(PARAMS_FILE)
    splits = load_splits(args.arrays, args.photos)
    counts = {name: len(arrays["images"]) for name, arrays in splits.items()}
    views = sum(batch.photos for batch in plan(counts, params))
    print(f"input: {counts} photos, {views} photo views, batch size {params.batch_size}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    seconds, expected = timed(extract_features, splits, params)
    rows.append(("in process", seconds, True))
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as root:
        with local_ray_cluster(Path(root)) as cluster:
            os.environ.update(cluster.auth)  # this process is the cluster's client
            for workers in WORKERS:
                seconds, computed = timed(
                    extract_features, splits, params, address=cluster.address, workers=workers
                )
                rows.append(
                    (
                        f"Ray, {workers} worker{'s' * (workers > 1)}",
                        seconds,
                        same(computed, expected),
                    )
                )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'where':<16} {'seconds':>8} {'views/s':>8}  same arrays")
    for where, seconds, identical in rows:
        print(f"{where:<16} {seconds:8.1f} {views / seconds:8.1f}  {identical}")
    if not all(identical for *_, identical in rows):
        raise SystemExit("the features differ between the ways they were computed")


if __name__ == "__main__":
    main()
