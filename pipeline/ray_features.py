"""The features stage's batches on a Ray cluster: Ray Data, one backbone per worker.

Each row of the dataset is one ``Batch`` of pipeline/features.py with its photos; an actor per
worker builds the ``ViewExtractor`` once and computes the rows it is given. Every batch carries
what fixes its result (its photos, and for an augmented view its draw of the augmentation), so
the features are the bytes the stage computes in process. The backbone's weights file is read
here, where the stage runs, and given to the workers: they need no Keras cache or download, and
they load exactly the file the stage would (and check ImageNet's digest as it does).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.backbone import imagenet_weights
from pipeline.cluster import connected
from pipeline.features import Batch, ViewExtractor
from pipeline.params import FeaturesParams
from pipeline.weights import IMAGENET_WEIGHTS_FILE, resolve_weights

INDEX, IMAGES, FEATURES, PROBES = "index", "images", "features", "probes"


class ViewWorker:
    """A Ray Data actor: the backbone, built once per worker; one row (batch) per call."""

    def __init__(
        self,
        params: FeaturesParams,
        image_size: int,
        batches: list[Batch],
        weights: bytes | None,
    ):
        from pipeline.logs import import_tensorflow_quietly

        import_tensorflow_quietly()
        local = Path(tempfile.mkdtemp(prefix="features-weights-"))
        try:
            if weights is not None and params.weights == "imagenet":
                # Where Keras' cache has it (pipeline/weights.py): loaded and digest-checked
                # as in the stage's process.
                (local / "models").mkdir()
                (local / "models" / IMAGENET_WEIGHTS_FILE).write_bytes(weights)
                os.environ["KERAS_HOME"] = str(local)
            elif weights is not None:
                path = local / Path(params.weights).name
                path.write_bytes(weights)
                params = dataclasses.replace(params, weights=str(path))
            self.extract = ViewExtractor(params, image_size)
        finally:
            shutil.rmtree(local, ignore_errors=True)  # loaded: the backbone holds the weights
        self.batches = batches

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (index,) = rows[INDEX]
        features, *probes = self.extract(self.batches[index], rows[IMAGES][0])
        # Every row has a probes column: empty, but for the plain view's.
        probes = probes[0] if probes else np.zeros((len(features), 0), features.dtype)
        return {INDEX: rows[INDEX], FEATURES: features[np.newaxis], PROBES: probes[np.newaxis]}


def weights_file(params: FeaturesParams) -> bytes | None:
    """The bytes of the weights file the backbone loads, as this process finds it; None for a
    random init."""
    setting = resolve_weights(params.weights)
    if setting is None:
        return None
    return (imagenet_weights() if setting == "imagenet" else Path(setting)).read_bytes()


def extract_on_cluster(
    batches: list[Batch],
    splits: dict[str, dict[str, np.ndarray]],
    params: FeaturesParams,
    image_size: int,
    address: str,
    log=print,
    workers: int | None = None,
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(index in ``batches``, outputs) of every batch, computed by ``workers`` actors (default:
    one per CPU of the cluster) on the cluster at ``address``."""
    with connected(address):
        import ray
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the stage logs its own progress lines
        context.execution_options.preserve_order = True
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its start and end lines
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        log(f"features: on the Ray cluster at {address}, {workers} workers")
        rows = [
            {INDEX: index, IMAGES: splits[batch.split]["images"][batch.start : batch.stop]}
            for index, batch in enumerate(batches)
        ]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        computed = dataset.map_batches(
            ViewWorker,
            fn_constructor_kwargs={
                "params": params,
                "image_size": image_size,
                "batches": batches,
                "weights": weights_file(params),
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            # The weights are a constructor argument in the object store, which a restarted
            # actor could not count on; a lost worker fails the stage instead.
            max_restarts=0,
        )
        for row in computed.iter_rows():
            features, probes = row[FEATURES], row[PROBES]
            yield int(row[INDEX]), [features, probes] if probes.shape[1] else [features]
