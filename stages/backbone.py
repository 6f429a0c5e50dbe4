"""The frozen MobileNetV2 backbone, shared by the features and train stages.

Features (stages/features.py) and the served classifier (stages/train.py) are built from the
same functions here, so the features a head is trained on are exactly what the assembled
classifier computes before its head.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf


def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and force deterministic TF kernels."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


IMAGENET_WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


class BackboneUnavailable(RuntimeError):
    """The ImageNet weights are neither in Keras' cache nor downloadable (offline)."""


def keras_models_dir() -> Path:
    """Where Keras looks for downloaded weights before fetching them."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def exits_in_one_line_without_weights(stage: str) -> Callable[[Callable], Callable]:
    """For a stage's main(): end with one line, not a traceback, when the weights are missing
    offline."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapped(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except BackboneUnavailable as exc:
                sys.exit(f"{stage} failed: {exc}")

        return wrapped

    return decorate


def resolve_weights(setting: str) -> str | None:
    """Map the ``weights`` parameter to Keras' ``weights=`` argument."""
    if setting in ("imagenet", "none"):
        return None if setting == "none" else "imagenet"
    if not Path(setting).is_file():
        raise ValueError(
            f"features.weights={setting!r}: expected 'imagenet', 'none' or a weights file path"
        )
    return setting


def build_backbone(image_size: int, weights: str | None) -> keras.Model:
    try:
        return keras.applications.MobileNetV2(
            input_shape=(image_size, image_size, 3),
            include_top=False,
            weights=weights,
            pooling="avg",
        )
    except Exception as exc:  # offline: Keras' own error names a URL, not where to put the file
        if weights != "imagenet":
            raise
        raise BackboneUnavailable(
            f"the ImageNet MobileNetV2 weights are not in {keras_models_dir()}/ and cannot "
            f"be downloaded ({type(exc).__name__}); put {IMAGENET_WEIGHTS_FILE} there "
            "(README: Running offline or from a local mirror)"
        ) from exc


def build_augmentation(seed: int) -> keras.Sequential:
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, seed=seed),
            keras.layers.RandomZoom(0.1, seed=seed),
        ],
        name="augmentation",
    )


def assemble(
    backbone: keras.Model,
    head: keras.Model | None = None,
    augmentation: keras.Sequential | None = None,
) -> keras.Model:
    """Raw RGB pixels (0-255) -> [augmentation] -> backbone features -> [head probability]."""
    inputs = keras.Input(backbone.input_shape[1:])
    x = augmentation(inputs) if augmentation is not None else inputs
    x = features_of(x, backbone)
    outputs = head(x) if head is not None else x
    return keras.Model(inputs, outputs, name="dandelion_vs_grass")


def backbone_range(pixels):
    """Raw RGB pixels (0-255) scaled as MobileNetV2 expects them, to [-1, 1]."""
    return keras.layers.Rescaling(1 / 127.5, offset=-1)(pixels)


def features_of(pixels, backbone: keras.Model):
    """The backbone's pooled features of raw RGB pixels (0-255), as a Keras tensor."""
    # BatchNorm in inference mode, even when fine-tuning.
    return backbone(backbone_range(pixels), training=False)


def features_and_probes(pixels, backbone: keras.Model, layers: list[str]):
    """Keras tensors, from one pass of the backbone: its pooled features, and the pooled
    activations of its inner ``layers``, concatenated (novelty's input; stages/train.py).

    Inner layers, because the last one's features hardly tell a photo of noise or a flat
    colour from a photo of a field (measured: docs/pipeline.md, "Neither"); mid-level ones do.
    """
    probe = keras.Model(
        backbone.input,
        [*(backbone.get_layer(name).output for name in layers), backbone.output],
        name="backbone_with_probes",
    )
    *inner, features = probe(backbone_range(pixels), training=False)
    pooled = [keras.layers.GlobalAveragePooling2D()(activations) for activations in inner]
    return features, keras.layers.Concatenate()(pooled) if len(pooled) > 1 else pooled[0]


def probe_extractor(backbone: keras.Model, layers: list[str]) -> keras.Model:
    """Pixels -> [pooled features, concatenated inner-layer probes]."""
    inputs = keras.Input(backbone.input_shape[1:])
    return keras.Model(inputs, list(features_and_probes(inputs, backbone, layers)))


def frozen_features(
    extractor: keras.Model,
    images: np.ndarray,
    batch_size: int,
    augmentation: keras.Sequential | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> np.ndarray:
    """The extractor's features of ``images``, optionally of a random augmented view;
    ``callbacks`` see the prediction's batches (progress)."""
    if augmentation is not None:
        images = np.concatenate(
            [
                augmentation(images[start : start + batch_size].astype("float32"), training=True)
                for start in range(0, len(images), batch_size)
            ]
        )
    return extractor.predict(images, batch_size=batch_size, verbose=0, callbacks=callbacks)
