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
NO_DRAW = -1  # a row's draw of a plain or flipped view (a column holds one type)


def batch_row(index: int, batch: Batch, images: np.ndarray) -> dict:
    """A dataset row: the batch (what it computes) and its photos."""
    fields = dataclasses.asdict(batch)
    fields["draw"] = NO_DRAW if batch.draw is None else batch.draw
    return {INDEX: index, IMAGES: images, **fields}


def row_batch(rows: dict[str, np.ndarray]) -> Batch:
    """The ``Batch`` of a one-row batch of the dataset."""
    draw = int(rows["draw"][0])
    return Batch(
        split=str(rows["split"][0]),
        view=str(rows["view"][0]),
        start=int(rows["start"][0]),
        stop=int(rows["stop"][0]),
        draw=None if draw == NO_DRAW else draw,
    )


class ViewWorker:
    """A Ray Data actor: the backbone, built once per worker; one row (batch) per call."""

    def __init__(
        self,
        params: FeaturesParams,
        image_size: int,
        weights: list,
    ):
        """``weights``: [the reference of the weights file's bytes in the object store], or []
        for a random init (a reference in a list: Ray leaves it to the actor to fetch)."""
        import ray

        from pipeline.logs import import_tensorflow_quietly

        import_tensorflow_quietly()
        weights = ray.get(weights[0]) if weights else None
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

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features, *probes = self.extract(row_batch(rows), rows[IMAGES][0])
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
            batch_row(index, batch, splits[batch.split]["images"][batch.start : batch.stop])
            for index, batch in enumerate(batches)
        ]
        weights = weights_file(params)
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        computed = dataset.map_batches(
            ViewWorker,
            fn_constructor_kwargs={
                "params": params,
                "image_size": image_size,
                "weights": [] if weights is None else [ray.put(weights)],
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
        )
        for row in computed.iter_rows():
            features, probes = row[FEATURES], row[PROBES]
            yield int(row[INDEX]), [features, probes] if probes.shape[1] else [features]
