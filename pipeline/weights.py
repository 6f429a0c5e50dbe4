"""Where the backbone's ImageNet weights come from: Keras' cache, or a download Keras makes.

No TensorFlow here: the tests and the docs name the file without loading Keras.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.params import ParamsError
from pipeline.stage import StageError

# The file Keras' MobileNetV2 (alpha 1.0, 224 px, no top) looks for in its cache.
IMAGENET_WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


class BackboneUnavailable(StageError):
    """The ImageNet weights are neither in Keras' cache nor downloadable (offline)."""


def keras_models_dir() -> Path:
    """Where Keras looks for downloaded weights before fetching them."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def resolve_weights(setting: str) -> str | None:
    """Map the ``features.weights`` parameter to Keras' ``weights=`` argument."""
    if setting in ("imagenet", "none"):
        return None if setting == "none" else "imagenet"
    if not Path(setting).is_file():
        raise ParamsError(
            f"features.weights={setting!r}: expected 'imagenet', 'none' or a weights file path"
        )
    return setting


def unavailable(error: Exception) -> BackboneUnavailable:
    """What to say when Keras could not load the ImageNet weights (offline): Keras' own error
    names a URL, not where to put the file."""
    return BackboneUnavailable(
        f"the ImageNet MobileNetV2 weights are not in {keras_models_dir()}/ and cannot "
        f"be downloaded ({type(error).__name__}); put {IMAGENET_WEIGHTS_FILE} there "
        "(README: Running offline or from a local mirror)"
    )
