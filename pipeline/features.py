"""The frozen backbone's features of every photo, in every view the training uses.

Per split: ``plain`` (each photo as preprocessed), ``probes`` (the pooled activations of the
backbone's ``novelty_layers``: novelty's input, pipeline/novelty.py), ``flipped`` (its mirror
image) and, for train and val, ``augmented``: ``augment_copies`` random views (flip, rotate,
zoom) per photo, shape ``(copies, photos, features)``; ``labels`` and ``paths`` as given.

The work is a list of ``Batch``es (a split's view of ``batch_size`` photos), each computed
alone by ``ViewExtractor``: in this process, or on a Ray cluster's workers when an address is
given (pipeline/ray_features.py). A batch's augmented view draws from the random state the
augmentation has at that batch when the batches run one after another, so the arrays are the
same bytes however many workers compute them, in whatever order.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import keras
import numpy as np

from pipeline.backbone import (
    assemble,
    build_augmentation,
    build_backbone,
    make_deterministic,
    probe_extractor,
)
from pipeline.logs import PROGRESS_EVERY_SECONDS, Progress
from pipeline.params import FeaturesParams
from pipeline.weights import resolve_weights

AUGMENTED_SPLITS = ("train", "val")  # cross-validation trains on val photos too
PLAIN, FLIPPED = "plain", "flipped"


def view_names(split: str, augment_copies: int) -> list[str]:
    """The views of each photo of ``split`` that are computed, in order."""
    augmented = augment_copies if split in AUGMENTED_SPLITS else 0
    return [PLAIN, FLIPPED, *(f"augmented {i + 1}" for i in range(augmented))]


@dataclass(frozen=True)
class Batch:
    """One view of photos ``start:stop`` of a split; ``draw``: for an augmented view, how many
    augmented batches come before it in ``plan``'s order (the augmentation's random state)."""

    split: str
    view: str
    start: int
    stop: int
    draw: int | None = None

    @property
    def photos(self) -> int:
        return self.stop - self.start


def plan(counts: dict[str, int], params: FeaturesParams) -> list[Batch]:
    """Every batch of every view of every split, in the order the stage has always run them."""
    batches, draws = [], 0
    for split, count in counts.items():
        for view in view_names(split, params.augment_copies):
            for start in range(0, count, params.batch_size):
                stop = min(start + params.batch_size, count)
                draw = None if view in (PLAIN, FLIPPED) else draws
                draws += draw is not None
                batches.append(Batch(split, view, start, stop, draw))
    return batches


class AugmentationDraws:
    """Sets the augmentation's random state to what it is at its ``draw``-th call.

    Each random layer's seed generator advances by the same step at every call (Keras'
    ``SeedGenerator.next``, ordered), so the state at any call is the first plus draws x step.
    """

    def __init__(self, augmentation: keras.Sequential, image_size: int):
        self.generators = [
            value
            for layer in augmentation.layers
            for value in vars(layer).values()
            if isinstance(value, keras.random.SeedGenerator)
        ]
        self.first = self.states()
        probe = np.zeros((1, image_size, image_size, 3), "float32")
        augmentation(probe, training=True)
        after_one = self.states()
        augmentation(probe, training=True)
        self.steps = [one - first for one, first in zip(after_one, self.first, strict=True)]
        again = [two - one for two, one in zip(self.states(), after_one, strict=True)]
        if not all(np.array_equal(a, b) for a, b in zip(again, self.steps, strict=True)):
            raise RuntimeError("the augmentation's random state does not advance evenly per call")
        self.seek(0)

    def states(self) -> list[np.ndarray]:
        return [np.array(keras.ops.convert_to_numpy(g.state.value)) for g in self.generators]

    def seek(self, draw: int) -> None:
        for generator, first, step in zip(self.generators, self.first, self.steps, strict=True):
            generator.state.assign(first + draw * step)


class ViewExtractor:
    """The backbone, built once; computes any one ``Batch`` of views."""

    def __init__(self, params: FeaturesParams, image_size: int):
        make_deterministic(params.seed)
        backbone = build_backbone(image_size, resolve_weights(params.weights))
        self.extractor = assemble(backbone)
        self.with_probes = probe_extractor(backbone, params.novelty_layers)
        self.augmentation = build_augmentation(params.seed)
        self.draws = AugmentationDraws(self.augmentation, image_size)

    def __call__(self, batch: Batch, images: np.ndarray) -> list[np.ndarray]:
        """``[features, probes]`` of the plain view of ``images`` (the batch's photos), or
        ``[features]`` of its other view."""
        if batch.view == PLAIN:
            return [np.asarray(out) for out in self.with_probes.predict_on_batch(images)]
        if batch.view == FLIPPED:
            images = images[:, :, ::-1]
        else:
            self.draws.seek(batch.draw)
            images = np.asarray(self.augmentation(images.astype("float32"), training=True))
        return [np.asarray(self.extractor.predict_on_batch(images))]


def in_order(results: Iterable[tuple[int, list[np.ndarray]]]) -> Iterator[list[np.ndarray]]:
    """Each batch's outputs in plan order, whatever order ``results`` (index, outputs) come in."""
    waiting, following = {}, 0
    for index, outputs in results:
        waiting[index] = outputs
        while following in waiting:
            yield waiting.pop(following)
            following += 1


def extract_features(
    splits: dict[str, dict[str, np.ndarray]],
    params: FeaturesParams,
    log=print,
    every: float = PROGRESS_EVERY_SECONDS,
    address: str | None = None,
    workers: int | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Features of every split's ``images``; the same params give the same arrays.

    On the Ray cluster at ``address`` if given (pipeline/cluster.py), by ``workers`` actors
    (default: one per CPU of the cluster), else in this process.
    ``log`` gets a progress line at most every ``every`` seconds, and one per split.
    """
    image_size = next(iter(splits.values()))["images"].shape[1]
    batches = plan({name: len(arrays["images"]) for name, arrays in splits.items()}, params)
    progress = Progress(
        "features", sum(batch.photos for batch in batches), "photo views", every, log
    )
    if address is None:
        extract = ViewExtractor(params, image_size)
        results = (
            (index, extract(batch, splits[batch.split]["images"][batch.start : batch.stop]))
            for index, batch in enumerate(batches)
        )
    else:
        from pipeline.ray_features import extract_on_cluster

        results = extract_on_cluster(batches, splits, params, image_size, address, log, workers)

    outputs: dict[tuple[str, str], list[list[np.ndarray]]] = {}
    started = time.perf_counter()
    for index, batch_outputs in enumerate(in_order(results)):
        batch = batches[index]
        outputs.setdefault((batch.split, batch.view), []).append(batch_outputs)
        progress.advance(batch.photos, f"{batch.split}: {batch.view}")
        if index + 1 == len(batches) or batches[index + 1].split != batch.split:
            views = view_names(batch.split, params.augment_copies)
            log(
                f"features: {batch.split}: {batch.stop} photos x {len(views)} views "
                f"in {time.perf_counter() - started:.1f} s"
            )
            started = time.perf_counter()
    return {name: split_features(name, arrays, outputs, params) for name, arrays in splits.items()}


def split_features(
    name: str,
    arrays: dict[str, np.ndarray],
    outputs: dict[tuple[str, str], list[list[np.ndarray]]],
    params: FeaturesParams,
) -> dict[str, np.ndarray]:
    """One split's arrays from its batches' outputs (keys in the order the .npz has them)."""

    def joined(view: str, output: int = 0) -> np.ndarray:
        return np.concatenate([batch[output] for batch in outputs[name, view]])

    out = {
        "plain": joined(PLAIN),
        "probes": joined(PLAIN, 1),
        "flipped": joined(FLIPPED),
        "labels": arrays["labels"],
        "paths": arrays["paths"],
    }
    if name in AUGMENTED_SPLITS:
        augmented = [joined(view) for view in view_names(name, params.augment_copies)[2:]]
        out["augmented"] = np.stack(augmented) if augmented else out["plain"][np.newaxis][:0]
    return out
