"""Engine benchmark: the trained model's speed and agreement with Keras in each serving engine.

After `dvc repro` (or `dvc pull`): exports data/model for each engine of serving/engines.py
(as the export stage does, INT8 calibrated on the same train photos), then times scoring the
test photos in batches of 1 and 32 on this machine's cores, and compares the scores with
Keras'.

    python -m benchmarks.engine_benchmark [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.export import export_model
from pipeline.params import QuantizeParams
from pipeline.quantize import calibration_set
from serving.contract import MODEL_FILE, PROBABILITY
from serving.engines import ENGINES, load_engine
from tests.support.paths import PIPELINE_PATHS, REPO_ROOT


def images_per_second(score, images: np.ndarray, batch: int, seconds: float) -> float:
    """Throughput of ``score`` on batches of ``batch`` test images, no HTTP."""
    chunk = images[:batch]
    score(chunk)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        score(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()

    keras_file = REPO_ROOT / PIPELINE_PATHS["model_dir"] / MODEL_FILE
    arrays = REPO_ROOT / PIPELINE_PATHS["arrays_dir"]
    test = np.load(arrays / "test.npz")["images"]
    calibration = calibration_set(np.load(arrays / "train.npz")["images"], QuantizeParams.load())
    scores, rows = {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for engine in ENGINES:
            export_model(keras_file, Path(scratch) / engine, engine, calibration)
            score = load_engine(Path(scratch) / engine)
            outputs = np.concatenate([score(image[None]) for image in test])
            scores[engine] = outputs[:, PROBABILITY]
            timings = [
                1000 / images_per_second(score, test, batch, args.seconds) for batch in (1, 32)
            ]
            rows.append((engine, *timings))
    print(f"{len(test)} test photos, {os.cpu_count()} CPUs; ms per image")
    print(f"{'engine':<13} {'batch 1':>8} {'batch 32':>9} {'max |diff| vs keras':>20}")
    for engine, one, many in rows:
        difference = np.abs(scores[engine] - scores["keras"]).max()
        print(f"{engine:<13} {one:>8.2f} {many:>9.2f} {difference:>20.2e}")


if __name__ == "__main__":
    main()
