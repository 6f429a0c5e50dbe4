"""The backbone's ImageNet weights: which file, where it comes from, and whether the one found
holds those weights.

Keras looks for the file in its cache and downloads it only if it is missing, without checking
what it finds or fetches; pipeline/backbone.py loads it into the backbone and checks the loaded
tensors here, so that a missing, unreadable or wrong file ends a stage in one line naming the
cause. No TensorFlow here: the tests and the docs name the file without loading Keras.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pipeline.hashing import file_sha256
from pipeline.params import ParamsError
from pipeline.stage import StageError

# The file Keras' MobileNetV2 (alpha 1.0, 224 px, no top) looks for in its cache, and where Keras
# downloads it from (keras/src/applications/mobilenet_v2.py).
IMAGENET_WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
IMAGENET_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
    + IMAGENET_WEIGHTS_FILE
)
# What the features depend on is the file's tensors, not its bytes: weights_digest of the
# backbone's weights once Keras has loaded the file (the same at every input size). Verified:
# the offline copy the committed dvc.lock was built with (../shared/weights; sha256
# 71e4c4ec...232c, 9,421,704 bytes, re-saved with Keras 3's legacy HDF5 writer) gives this
# digest, loaded by path or as weights="imagenet", at 224, 96 and 32 px. Not verified: the file
# at IMAGENET_WEIGHTS_URL (no internet on the build machine; Keras publishes no checksum; its
# bytes differ: 9,406,464 bytes by public download logs). The offline copy's README says it holds
# the same source tensors as the official conversion, so the official file should give this
# digest; if it does not, its features would differ from the committed ones anyway, and the
# check is right to stop the stage. The README's offline section quotes the URL and the digest
# (tests/unit/test_backbone.py keeps it in step).
IMAGENET_WEIGHTS_DIGEST = "8b7f934811db52508708ed2f59dab258abe8a5de6c9fae5fd3ab9e4398022312"
OFFLINE_HELP = "README: Running offline or from a local mirror"


class BackboneUnavailable(StageError):
    """The ImageNet weights are missing (and cannot be downloaded), wrong or unreadable."""


def keras_models_dir() -> Path:
    """Where Keras looks for downloaded weights before fetching them."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def imagenet_weights_path() -> Path:
    """Where the ImageNet weights file belongs: in Keras' cache."""
    return keras_models_dir() / IMAGENET_WEIGHTS_FILE


def resolve_weights(setting: str) -> str | None:
    """Map the ``features.weights`` parameter to Keras' ``weights=`` argument."""
    if setting in ("imagenet", "none"):
        return None if setting == "none" else "imagenet"
    if not Path(setting).is_file():
        raise ParamsError(
            f"features.weights={setting!r}: expected 'imagenet', 'none' or a weights file path"
        )
    return setting


def root_cause(error: BaseException) -> str:
    """The first error of ``error``'s chain, in one line: Keras wraps a refused connection in
    an ``Exception`` whose text repeats the URL."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    # An OSError's text repeats its file name; its strerror says what went wrong.
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    first_line = next(iter(text.splitlines()), "")
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def weights_digest(tensors: Iterable[np.ndarray]) -> str:
    """SHA-256 over the tensors in their order: each one's shape (``repr`` of the tuple), then its
    values as little-endian float32, C order. Of a model, ``(w.numpy() for w in model.weights)``."""
    digest = hashlib.sha256()
    for tensor in tensors:
        array = np.asarray(tensor)
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return digest.hexdigest()


def missing(path: Path, error: Exception) -> BackboneUnavailable:
    """The weights are not at ``path`` and downloading them failed with ``error``."""
    return BackboneUnavailable(
        f"the ImageNet backbone weights are missing: no {path}, and downloading "
        f"{IMAGENET_WEIGHTS_URL} failed ({root_cause(error)}); put that file there "
        f"({OFFLINE_HELP})"
    )


def unreadable(path: Path, error: Exception) -> BackboneUnavailable:
    """Keras cannot load ``path`` into the backbone: not HDF5, truncated, another shape..."""
    return BackboneUnavailable(
        f"the ImageNet backbone weights {path} are unreadable ({root_cause(error)}); "
        f"replace the file ({OFFLINE_HELP})"
    )


def check_loaded(path: Path, tensors: Iterable[np.ndarray]) -> None:
    """BackboneUnavailable unless the tensors Keras loaded from ``path`` are the pinned weights
    (IMAGENET_WEIGHTS_DIGEST); the file's sha256 only helps tell which file it is."""
    found = weights_digest(tensors)
    if found != IMAGENET_WEIGHTS_DIGEST:
        raise BackboneUnavailable(
            f"the ImageNet backbone weights {path} are not the expected weights: tensor digest "
            f"{found[:16]}..., expected {IMAGENET_WEIGHTS_DIGEST[:16]}... (file sha256 "
            f"{file_sha256(path)}); replace the file ({OFFLINE_HELP})"
        )
