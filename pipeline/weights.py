"""The backbone's ImageNet weights: which file, where it comes from, and whether the one found
is that file.

Keras looks for the file in its cache and downloads it only if it is missing, without checking
what it finds or fetches; pipeline/backbone.py checks it here first, so that a missing, wrong or
unreadable file ends a stage in one line naming the cause. No TensorFlow here: the tests and
the docs name the file without loading Keras.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.hashing import file_sha256
from pipeline.params import ParamsError
from pipeline.stage import StageError

# The file Keras' MobileNetV2 (alpha 1.0, 224 px, no top) looks for in its cache, where Keras
# downloads it from (keras/src/applications/mobilenet_v2.py), and the sha256 of the copy the
# committed features were computed from: another file would give other features. The README's
# offline section quotes the URL and the sha256 (tests/unit/test_backbone.py keeps it in step).
IMAGENET_WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
IMAGENET_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
    + IMAGENET_WEIGHTS_FILE
)
IMAGENET_WEIGHTS_SHA256 = "71e4c4ec4aa24c9c951b9265d6de42e1336dcf614c2214fa6a989208615e232c"
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


def missing(path: Path, error: Exception) -> BackboneUnavailable:
    """The weights are not at ``path`` and downloading them failed with ``error``."""
    return BackboneUnavailable(
        f"the ImageNet backbone weights are missing: no {path}, and downloading "
        f"{IMAGENET_WEIGHTS_URL} failed ({root_cause(error)}); put that file there, "
        f"sha256 {IMAGENET_WEIGHTS_SHA256} ({OFFLINE_HELP})"
    )


def unreadable(path: Path, error: Exception) -> BackboneUnavailable:
    return BackboneUnavailable(
        f"the ImageNet backbone weights {path} are unreadable ({root_cause(error)}); "
        f"replace the file ({OFFLINE_HELP})"
    )


def verified(path: Path) -> Path:
    """``path``, if it holds the pinned weights (IMAGENET_WEIGHTS_SHA256)."""
    try:
        found = file_sha256(path)
    except OSError as error:
        raise unreadable(path, error) from error
    if found != IMAGENET_WEIGHTS_SHA256:
        raise BackboneUnavailable(
            f"the ImageNet backbone weights {path} are not the expected file: sha256 "
            f"{found}, expected {IMAGENET_WEIGHTS_SHA256}; replace it ({OFFLINE_HELP})"
        )
    return path
