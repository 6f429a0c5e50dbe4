"""The frozen MobileNetV2 backbone, shared by features, training and cross-validation.

Features (pipeline/features.py) and the served classifier (pipeline/training.py) are built from
the same functions here, so the features a head is trained on are exactly what the assembled
classifier computes before its head.
"""

from __future__ import annotations

from pathlib import Path

import keras
import tensorflow as tf

from pipeline.weights import (
    IMAGENET_WEIGHTS_FILE,
    IMAGENET_WEIGHTS_URL,
    check_loaded,
    imagenet_weights_path,
    missing,
    unreadable,
)


def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and force deterministic TF kernels."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def imagenet_weights() -> Path:
    """The ImageNet weights file in Keras' cache, downloaded into it first if it is missing;
    BackboneUnavailable if it cannot be. Not checked yet: build_backbone checks what it loads."""
    path = imagenet_weights_path()
    if not path.exists():
        try:
            # Into the cache Keras itself reads; Keras would use /tmp if it does not exist yet.
            path.parent.mkdir(parents=True, exist_ok=True)
            path = Path(
                keras.utils.get_file(
                    IMAGENET_WEIGHTS_FILE,
                    IMAGENET_WEIGHTS_URL,
                    cache_dir=str(path.parent.parent),
                    cache_subdir=path.parent.name,
                )
            )
        except Exception as error:  # offline, refused, 404, read-only cache...
            raise missing(path, error) from error
    return path


def build_backbone(image_size: int, weights: str | None) -> keras.Model:
    """MobileNetV2 without its top, pooled; ``weights`` as Keras takes them (resolve_weights).

    ImageNet weights load by path from the file Keras' ``"imagenet"`` would load, and the loaded
    tensors are checked against the pinned digest (pipeline/weights.py) before the backbone is
    used: on this very model, so the check only adds hashing its 2.3 M floats."""
    path = imagenet_weights() if weights == "imagenet" else None
    backbone = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3),
        include_top=False,
        weights=None if path else weights,
        pooling="avg",
    )
    if path:
        try:
            with path.open("rb"):  # a directory, or no permission: the OS's words, not h5py's
                pass
            backbone.load_weights(path)
        except Exception as error:  # not HDF5, truncated, another architecture...
            raise unreadable(path, error) from error
        check_loaded(path, (weight.numpy() for weight in backbone.weights))
    return backbone


def unfreeze_top(backbone: keras.Model, layers: int) -> None:
    """Make the top ``layers`` layers of the backbone trainable, and freeze all the others."""
    backbone.trainable = True
    for layer in backbone.layers[:-layers]:
        layer.trainable = False


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
    activations of its inner ``layers``, concatenated (novelty's input; pipeline/novelty.py).

    Inner layers, because the last one's features hardly tell a photo of noise or a flat
    colour from a photo of a field (docs/pipeline.md, "Neither"); mid-level ones do.
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
